"""The Typer app shared by every subcommand, and the one way commands report a SegcliError.

Exit codes (also in the README and --help):
  0 success · 1 some inputs failed (the rest were processed) · 2 usage error ·
  3 model or weights error · 130 interrupted (output written so far is valid) ·
  SIGPIPE (141 in the shell) when the reader of stdout went away

Subcommands are `@app.command(cls=SegcliCommand, ...)` (segcli.cli.command: usage errors as one
line, values no option can mean refused before the command runs).
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import typer

from segcli import __version__
from segcli.cli.command import SegcliGroup
from segcli.errors import ExitCode, SegcliError
from segcli.text import escaped

T = TypeVar("T")

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 some inputs failed (the rest were processed); 2 usage error; "
    "3 model or weights error; 130 interrupted (output written so far is valid)."
)

app = typer.Typer(
    name="segcli",
    cls=SegcliGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=f"Annotate images with instance segmentation masks (Mask R-CNN). {EXIT_CODES_HELP}",
)


def fail(error: SegcliError) -> None:
    # Messages quote values with repr() at times, which escapes already: only what is left (a
    # newline in a path) is escaped here, so that the error stays one line.
    print(f"segcli: error: {escaped(error, backslashes=False)}", file=sys.stderr)
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


def _show_version(value: bool) -> None:
    if value:
        print(f"segcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print the version of segcli and exit."),
) -> None:
    """Subcommands: predict, train, eval, export, merge, review."""
