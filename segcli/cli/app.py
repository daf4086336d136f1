"""The Typer app shared by every subcommand, and the one way commands report a SegcliError.

Exit codes (also in the README and --help):
  0 success · 1 some inputs failed (the rest were processed) · 2 usage error ·
  3 model or weights error · 130 interrupted (output written so far is valid)
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import typer

from segcli.errors import ExitCode, SegcliError

T = TypeVar("T")

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


def run_engine(call: Callable[[], T], kept_on_interrupt: str) -> T:
    """Run a subcommand's engine: a SegcliError becomes its one line and exit code; Ctrl-C exits
    130 after saying what the interrupted run kept (`kept_on_interrupt`)."""
    try:
        return call()
    except SegcliError as error:
        fail(error)
    except KeyboardInterrupt:
        print(f"segcli: interrupted; {kept_on_interrupt}", file=sys.stderr)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


@app.callback()
def _root() -> None:
    """Subcommands: predict, train, eval, export, review."""
