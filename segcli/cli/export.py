"""`segcli export`: parse and validate flags, then hand over to its engine."""

from __future__ import annotations

from segcli.cli.app import EXIT_CODES_HELP, app, fail  # noqa: F401
