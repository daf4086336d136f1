"""A small Label Studio REST client on urllib: the handful of endpoints push and pull need.

Plain HTTP rather than label-studio-sdk: the SDK pulls in pydantic, httpx and a generated client
of hundreds of endpoints (and tracks the server's API version closely), for six calls. So the
core stays lean and `segcli push/pull` need no extra. Every failure becomes one SegcliError line:
a server that cannot be reached or dies mid-call, and a refused token, exit 3; a missing project
or a request the server rejects, exit 2.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from segcli.errors import ServiceError, UsageError


class ServerError(ServiceError):
    """The labeling server cannot be reached, refused the token, or failed (exit code 3)."""


class LabelStudio:
    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"--label-studio {url!r} is not an http(s) URL such as http://localhost:8080")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Authorization": f"Token {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = _detail(error)
            if error.code in (401, 403):
                raise ServerError(f"Label Studio at {self.url} refused the token ({error.code}{detail}); "
                                  "give an access token from Account & Settings with --token") from None
            if error.code == 404:
                raise UsageError(f"Label Studio at {self.url} has no {path} (404{detail})") from None
            if error.code >= 500:
                raise ServerError(f"Label Studio at {self.url} failed on {method} {path} ({error.code}{detail})") from None
            raise UsageError(f"Label Studio at {self.url} rejected {method} {path} ({error.code}{detail})") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServerError(f"cannot reach Label Studio at {self.url}: {reason}") from None
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise ServerError(f"{self.url}{path} answered with something other than JSON; "
                              "is --label-studio the server's base URL?") from None

    def check(self) -> None:
        """Fails with one line unless the server answers and takes the token."""
        self.request("GET", "/api/current-user/whoami")

    def project(self, name: str) -> dict[str, Any] | None:
        """The project with this id or title, or None."""
        if name.isdigit():
            try:
                return self.request("GET", f"/api/projects/{name}")
            except UsageError:
                return None
        page = 1
        while True:
            answer = self.request("GET", "/api/projects", query={"title": name, "page": page, "page_size": 100})
            projects = answer.get("results", []) if isinstance(answer, dict) else answer
            for project in projects:
                if project.get("title") == name:
                    return project
            if not isinstance(answer, dict) or not answer.get("next"):
                return None
            page += 1

    def create_project(self, title: str, label_config: str) -> dict[str, Any]:
        return self.request("POST", "/api/projects", {"title": title, "label_config": label_config})

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """Every task of the project, with its annotations (page by page)."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            try:
                answer = self.request("GET", "/api/tasks", query={"project": project_id, "page": page,
                                                                  "page_size": 500, "fields": "all"})
            except UsageError:
                if page > 1:  # past the last page
                    return tasks
                raise
            batch = answer.get("tasks", []) if isinstance(answer, dict) else answer
            tasks.extend(batch)
            total = answer.get("total") if isinstance(answer, dict) else None
            if not batch or (total is not None and len(tasks) >= total):
                return tasks
            page += 1

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> None:
        # One request is one database transaction on the server: a batch lands whole or not at all.
        self.request("POST", f"/api/projects/{project_id}/import", tasks)

    def annotations(self, task_id: int) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/tasks/{task_id}/annotations")


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read().decode("utf-8", "replace")
        body = json.loads(text)
        message = body.get("detail") or body.get("validation_errors") or body
    except Exception:
        return ""
    return f": {str(message)[:200]}".replace("\n", " ")
