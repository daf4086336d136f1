"""A real Label Studio server for the loop tests and benchmarks/label_studio_loop.py: started on
127.0.0.1 with a fresh data folder (SQLite), one user and a known token, stopped at the end.

The server: `label-studio` from env SEGCLI_LABEL_STUDIO_BIN, else PATH, else ./.ls-venv (it lives
in a venv of its own; .ci/run makes it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "segcli-test-token-0123456789"
STARTUP_TIMEOUT_S = 300  # first start migrates a fresh SQLite database: ~1 min on 2 busy cores


def label_studio_bin() -> str | None:
    candidates = [os.environ.get("SEGCLI_LABEL_STUDIO_BIN"), shutil.which("label-studio"),
                  str(ROOT / ".ls-venv" / "bin" / "label-studio")]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


class Server:
    def __init__(self, url: str, data_dir: Path) -> None:
        self.url, self.data_dir = url, data_dir

    def api(self, method: str, path: str, body=None):
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def tasks(self, project_id: int) -> list[dict]:
        return self.api("GET", f"/api/tasks?project={project_id}&page_size=1000&fields=all")["tasks"]


class ServerFailed(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log."""


@contextlib.contextmanager
def running_label_studio(binary: str, data_dir: Path) -> Iterator[Server]:
    """Start the server, wait until it answers with the token, yield it; always stop it."""
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": "/", "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}
    log = open(data_dir / "server.log", "wb")
    process = subprocess.Popen(
        [binary, "start", "--no-browser", "--data-dir", str(data_dir), "--internal-host", "127.0.0.1",
         "--port", str(port), "--username", "annotator@example.com", "--password", "segcli-test-pass",
         "--user-token", TOKEN, "--enable-legacy-api-token"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"label-studio exited with {process.returncode} while starting: "
                                   f"{(data_dir / 'server.log').read_text(errors='replace')[-1500:]}")
            try:
                Server(url, data_dir).api("GET", "/api/current-user/whoami")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise ServerFailed(f"label-studio did not answer within {STARTUP_TIMEOUT_S} s: "
                                       f"{(data_dir / 'server.log').read_text(errors='replace')[-1500:]}") from None
                time.sleep(1)
        yield Server(url, data_dir)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
