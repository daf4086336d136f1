"""`segcli push` and `segcli pull`: the annotation loop with Label Studio (segcli.labeling)."""

from __future__ import annotations

from typing import Optional

import typer

from segcli.cli.app import EXIT_CODES_HELP, app, run_engine
from segcli.cli.command import SegcliCommand

SERVER = typer.Option(..., "--label-studio", help="Label Studio's base URL, e.g. http://localhost:8080.")
PROJECT = typer.Option(..., "--project", help="Project title (created by push if missing) or id.")
TOKEN = typer.Option(..., "--token", envvar="LABEL_STUDIO_API_KEY",
                     help="Access token (Account & Settings; env LABEL_STUDIO_API_KEY).")


@app.command(cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def push(
    predictions: str = typer.Argument(..., metavar="PRED", help="COCO predictions from segcli predict --out FILE.json."),
    label_studio: str = SERVER,
    project: str = PROJECT,
    token: str = TOKEN,
    review: Optional[str] = typer.Option(None, "--review", help="Review CSV (segcli review): push in its order."),
    top: Optional[int] = typer.Option(None, "--top", help="Only the first N images of --review (the worst)."),
    images: Optional[str] = typer.Option(None, "--images", help="Folder the file_names are relative to (default: .)."),
    image_url_prefix: Optional[str] = typer.Option(None, "--image-url-prefix",
                                                   help="Images at PREFIX + file_name instead of the server's local files."),
    document_root: str = typer.Option("/", "--document-root",
                                      help="The server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (local files)."),
    shape: str = typer.Option("polygon", "--shape", help="Pre-annotations as polygon (editable vertices) or brush (masks)."),
    model_version: str = typer.Option("segcli", "--model-version", help="The predictions' model_version."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    """Push images with their predictions as pre-annotated tasks into a Label Studio project;
    safe to rerun (images already there are not added again)."""
    from segcli.labeling.label_studio import PushOptions, push as run_push, say

    options = PushOptions(url=label_studio, project=project, token=token, predictions=predictions, review=review,
                          top=top, images=images, image_url_prefix=image_url_prefix, document_root=document_root,
                          shape=shape, model_version=model_version)
    log = (lambda _: None) if quiet else say
    result = run_engine(lambda: run_push(options, log), "tasks imported so far stay; rerun to add the rest")
    if not quiet:
        say(f"project {result.project_id}: added {result.added} tasks, {result.already} were there already")
    print(result.project_id)


@app.command(cls=SegcliCommand, epilog=EXIT_CODES_HELP)
def pull(
    label_studio: str = SERVER,
    project: str = PROJECT,
    token: str = TOKEN,
    out: str = typer.Option(..., "--out", "-o", help="COCO file to write (for segcli train --coco)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on stderr."),
) -> None:
    """Pull the tasks a person finished in a Label Studio project as a COCO dataset file."""
    from segcli.labeling.label_studio import pull as run_pull, say

    result = run_engine(lambda: run_pull(label_studio, project, token, out), "nothing was written")
    if not quiet:
        skipped = ", ".join(f"{count} {why}" for why, count in result.skipped.items()) or "none"
        say(f"wrote {result.images} images, {result.annotations} annotations to {out}; skipped: {skipped}")
