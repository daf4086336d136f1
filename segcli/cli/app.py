"""The Typer app shared by every subcommand, and the one way commands report a SegcliError.

Exit codes (also in the README and --help):
  0 success · 1 some inputs failed (the rest were processed) · 2 usage error ·
  3 model or weights error · 130 interrupted (output written so far is valid)
"""

from __future__ import annotations

import sys

import typer

from segcli.errors import SegcliError

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 some inputs failed (the rest were processed); 2 usage error; "
    "3 model or weights error; 130 interrupted (output written so far is valid)."
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=f"Annotate images with instance segmentation masks (Mask R-CNN). {EXIT_CODES_HELP}",
)

def fail(error: SegcliError) -> None:
    print(f"segcli: error: {error}", file=sys.stderr)
    raise typer.Exit(int(error.exit_code))

@app.callback()
def _root() -> None:
    """Subcommands: predict, train, eval, export."""
