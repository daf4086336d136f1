"""The `segcli` command. One module per subcommand, each a thin Typer function that parses,
validates and calls its engine; importing them registers them on the shared app."""

from segcli.cli.app import app, fail
from segcli.cli import predict  # noqa: F401  (registers the subcommand)
from segcli.cli import train  # noqa: F401
from segcli.cli import evaluate  # noqa: F401
from segcli.cli import export  # noqa: F401
from segcli.cli import merge  # noqa: F401
from segcli.cli import review  # noqa: F401
from segcli.cli import labeling  # noqa: F401  (push, pull)
from segcli.cli import quantize  # noqa: F401


def main() -> None:
    app()


__all__ = ["app", "fail", "main"]
