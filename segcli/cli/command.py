"""The edges every subcommand shares, as Click command classes: how usage errors look, which
values are refused before a command runs, how help shows flags, and what a closed stdout does."""

from __future__ import annotations

import inspect
import math
import os
import signal
import sys
from typing import Any, NoReturn, Sequence

from typer.core import TyperCommand, TyperGroup

from segcli.text import escaped

try:  # Typer >= 0.2x carries its own copy of Click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError as ClickUsageError
except ImportError:  # older Typer uses Click itself
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError as ClickUsageError


class _FlagsShowNoType:
    """Help lists an on/off flag (`--resume`, `--flip/--no-flip`, `--help`) without a `<bool>`
    after it, which would read as if it took a value."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.get_params(ctx):
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        super().format_help(ctx, formatter)


class SegcliCommand(_FlagsShowNoType, TyperCommand):
    """A subcommand (`@app.command(cls=SegcliCommand)`). Before it runs, values no option can
    mean are refused as usage errors: an empty string (`--out "$UNSET"`), a number that is not
    finite (`nan`, `inf`, `1e400`), an integer beyond 64 bits. Each option's own range is checked
    by its engine."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.short_help is None and self.help:
            # `segcli --help` lists the first paragraph; as one line, not broken where the docstring is.
            self.short_help = " ".join(inspect.cleandoc(self.help).split("\n\n")[0].split())

    def invoke(self, ctx: Any) -> Any:
        for param in self.params:
            problem = _value_problem(ctx.params.get(param.name))
            if problem is not None:
                raise ClickUsageError(f"{_param_label(param)} {problem}", ctx)
        return super().invoke(ctx)


def _param_label(param: Any) -> str:
    """`--out` for an option, `SOURCE` for an argument: as the user typed or read it in help."""
    if param.param_type_name == "argument":
        return (param.metavar or param.name).rstrip(".").upper()
    return next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])


def _value_problem(value: object) -> str | None:
    if isinstance(value, (list, tuple)):
        return next((problem for problem in map(_value_problem, value) if problem is not None), None)
    if isinstance(value, str) and not value.strip():
        return "is empty"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 < value < 2**63:
        return f"{value} is out of range"
    return None


class SegcliGroup(_FlagsShowNoType, TyperGroup):
    """The `segcli` command itself: what every subcommand shares at the edges.

    - A usage error (unknown subcommand or flag, missing option, a value of the wrong type) is
      one plain line, `segcli: error: ... Try 'segcli predict --help' for help.`, exit code 2,
      instead of Click's usage block and rich box: cron logs and `2>err.txt` get one line.
    - When the reader of stdout goes away (`segcli predict photos | head`), segcli ends as Unix
      tools do, killed by SIGPIPE (status 141 in the shell), after its own clean-up has run.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # the caller handles Click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as error:  # plain `segcli`: the help (rich has printed it already)
            if error.format_message().strip():
                error.show()
            sys.exit(error.exit_code)
        except ClickException as error:
            print(f"segcli: error: {usage_error_text(error)}", file=sys.stderr)
            sys.exit(error.exit_code)
        # Typer returns the code of a `typer.Exit`, or the command's own return value (None).
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # here, so that a closed pipe is noticed while it can be handled
            return result
        except BrokenPipeError:
            _end_by_sigpipe()


def usage_error_text(error: ClickException) -> str:
    """Click's message and its help hint as one line: `No such option: --bogus. Try 'segcli
    predict --help' for help.` (a value with a newline in it cannot split the line)."""
    # Click writes odd characters of a value as escapes already; any left (a newline) become escapes too.
    message = " ".join(escaped(part, backslashes=False) for part in error.format_message().splitlines() if part.strip())
    context = getattr(error, "ctx", None) if isinstance(error, ClickUsageError) else None
    if context is not None and context.command.get_help_option(context) is not None:
        message = f"{message.rstrip('.')}. Try '{context.command_path} {context.help_option_names[0]}' for help."
    return message


def _end_by_sigpipe() -> NoReturn:
    """End the process as a tool killed by SIGPIPE, the Unix convention for a reader that stopped
    reading: no message, and status 141 (128 + SIGPIPE) in the shell."""
    sys.stderr.flush()
    # Nothing more can reach the reader; this keeps Python from failing to flush stdout at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + 13)  # where there is no SIGPIPE to die of, its exit status
