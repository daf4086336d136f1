"""`segcli push` and `segcli pull` against a Label Studio server (segcli.labeling.client).

push: the images of a predictions file (all, or the worst --top N of a review CSV) become tasks
with their detections as pre-annotations. Tasks are keyed by the image's file_name (kept in the
task's data as `segcli_file`): a rerun lists the project's keys first and imports only the missing
images, so a push that was cut off (the server died, Ctrl-C) is finished by running it again, and a
finished one adds nothing.

pull: the tasks a person finished (an annotation that was not skipped) as a COCO dataset file that
`segcli train --coco` reads; tasks without an annotation and skipped ones are counted, not written.
"""

from __future__ import annotations

import csv
import json
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from segcli.atomic import atomic_write
from segcli.errors import UsageError
from segcli.labeling.client import LabelStudio, ServerError
from segcli.writers.label_studio import (config_categories, labeling_config, results_to_coco,
                                         tasks_from_coco)

BATCH = 100  # tasks per import request: one transaction each on the server


@dataclass
class PushOptions:
    url: str
    project: str
    token: str
    predictions: str
    review: str | None = None
    top: int | None = None
    images: str | None = None  # folder the file_names are relative to (local files)
    image_url_prefix: str | None = None
    document_root: str = "/"  # the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    shape: str = "polygon"
    model_version: str = "segcli"


@dataclass
class PushResult:
    project_id: int
    created: bool
    added: int
    already: int


@dataclass
class PullResult:
    images: int
    annotations: int
    skipped: dict[str, int] = field(default_factory=dict)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UsageError(f"{what} {path!r} does not exist") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{what} {path!r} cannot be read as JSON: {error}") from None


def review_files(path: str, top: int | None) -> list[str]:
    """The file names of a review CSV in rank order (the first `top`), each image once."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise UsageError(f"--review {path!r} cannot be read: {error.strerror or error}") from None
    if rows and "file" not in rows[0]:
        raise UsageError(f"--review {path!r} is not a segcli review CSV (no 'file' column)")
    rows.sort(key=lambda row: int(row.get("rank") or 0))
    files: list[str] = []
    for row in rows:
        name = row["file"] if not row.get("frame") else f"{row['file']}#{row['frame']}"
        if name not in files:
            files.append(name)
    return files[:top] if top is not None else files


def _image_url(options: PushOptions) -> Callable[[str], str]:
    if options.image_url_prefix:
        prefix = options.image_url_prefix
        return lambda name: prefix + urllib.parse.quote(name)
    root = Path(options.document_root).resolve()
    base = Path(options.images or ".").resolve()

    def local(name: str) -> str:
        path = (base / name).resolve()
        try:
            relative = path.relative_to(root)
        except ValueError:
            raise UsageError(f"image {str(path)!r} is outside --document-root {str(root)!r} "
                             "(the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)") from None
        return "/data/local-files/?d=" + urllib.parse.quote(relative.as_posix())
    return local


def _check_reachable(server: LabelStudio, url: str) -> None:
    """Label Studio must be able to show the images: try the first one before importing anything."""
    full = url if urllib.parse.urlparse(url).scheme else server.url + url
    request = urllib.request.Request(full, method="GET", headers={"Authorization": f"Token {server.token}"})
    try:
        with urllib.request.urlopen(request, timeout=server.timeout) as response:
            response.read(1)
    except Exception as error:  # HTTPError, URLError, timeouts: all say the same to the user
        reason = getattr(error, "code", None) or getattr(error, "reason", error)
        raise ServerError(f"Label Studio cannot load image {full} ({reason}); serve the images with "
                          "--image-url-prefix, or start the server with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
                          "and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT above --images") from None


def _local_storage(server: LabelStudio, project_id: int, folder: Path) -> None:
    """Local files are served only under a local storage of the project: add one for the folder."""
    storages = server.request("GET", "/api/storages/localfiles", query={"project": project_id}) or []
    if any(Path(s.get("path", "")) == folder for s in storages):
        return
    server.request("POST", "/api/storages/localfiles",
                   {"project": project_id, "path": str(folder), "title": "segcli images", "use_blob_urls": True})


def push(options: PushOptions, log: Callable[[str], None] = lambda _: None) -> PushResult:
    if options.top is not None and options.top < 1:
        raise UsageError(f"--top must be 1 or more, got {options.top}")
    if options.shape not in ("polygon", "brush"):
        raise UsageError(f"--shape must be polygon or brush, got {options.shape!r}")
    coco = _read_json(options.predictions, "the predictions file")
    if not isinstance(coco, dict) or "images" not in coco:
        raise UsageError(f"{options.predictions!r} is not a COCO file (predict with --out FILE.json)")
    wanted = review_files(options.review, options.top) if options.review else None
    if wanted is None and options.top is not None:
        raise UsageError("--top needs --review CSV (the ranking it takes the worst images of)")
    known = {image["file_name"] for image in coco["images"]}
    if wanted is not None:
        missing = [name for name in wanted if name not in known]
        if missing:
            raise UsageError(f"--review names {missing[0]!r}, which {options.predictions!r} does not hold")
    server = LabelStudio(options.url, options.token)
    server.check()
    names = [category["name"] for category in coco.get("categories", [])]
    project = server.project(options.project)
    created = project is None
    if project is None:
        if options.project.isdigit():
            raise UsageError(f"Label Studio at {server.url} has no project {options.project}")
        project = server.create_project(options.project, labeling_config(names))
        log(f"created project {project['id']} {options.project!r}")
    else:
        missing_labels = [name for name in names if name not in config_categories(project.get("label_config", ""))]
        if missing_labels:
            raise UsageError(f"project {options.project!r} has no label {missing_labels[0]!r}; "
                             "push to a new project or add the label to its config")
    project_id = int(project["id"])
    present = {task.get("data", {}).get("segcli_file") for task in server.tasks(project_id)}
    keep = set(wanted) if wanted is not None else known
    todo = keep - present
    url_of = _image_url(options)
    if not options.image_url_prefix and todo:
        _local_storage(server, project_id, Path(options.images or ".").resolve())
    tasks = tasks_from_coco(coco, url_of, options.shape, options.model_version, todo)
    order = {name: i for i, name in enumerate(wanted or [])}
    tasks.sort(key=lambda task: order.get(task["data"]["segcli_file"], 0))
    if tasks:
        _check_reachable(server, tasks[0]["data"]["image"])
    for start in range(0, len(tasks), BATCH):
        server.import_tasks(project_id, tasks[start:start + BATCH])
        log(f"imported {min(start + BATCH, len(tasks))}/{len(tasks)} tasks")
    return PushResult(project_id, created, len(tasks), len(keep & present))


def pull(url: str, project_name: str, token: str, out: str) -> PullResult:
    if Path(out).is_dir():
        raise UsageError(f"--out {out!r} is a folder; give a file name such as annotations.json")
    server = LabelStudio(url, token)
    server.check()
    project = server.project(project_name)
    if project is None:
        raise UsageError(f"Label Studio at {server.url} has no project {project_name!r}")
    names = config_categories(project.get("label_config", ""))
    tasks = server.tasks(int(project["id"]))
    finished, skipped = [], {"not annotated yet": 0, "skipped by the annotator": 0}
    for task in tasks:
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if annotations:
            latest = max(annotations, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
            finished.append((task, latest["result"]))
        elif task.get("annotations"):
            skipped["skipped by the annotator"] += 1
        else:
            skipped["not annotated yet"] += 1
    coco = results_to_coco(finished, names)
    with atomic_write(out, "w") as handle:
        json.dump(coco, handle)
    return PullResult(len(coco["images"]), len(coco["annotations"]), {k: v for k, v in skipped.items() if v})


def say(line: str) -> None:
    print(f"segcli: {line}", file=sys.stderr)
