"""Errors a user can cause, each mapped to one documented exit code.

The CLI catches `SegcliError` and prints its message as one line on stderr; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    SOME_INPUTS_FAILED = 1  # the run finished, but some inputs could not be read
    USAGE = 2  # bad flag, missing path, invalid argument (click's own code for usage errors)
    MODEL = 3  # weights could not be found, downloaded, verified or loaded; a server or cluster unreachable
    INTERRUPTED = 130  # Ctrl-C: output written so far is valid


class SegcliError(Exception):
    """An error caused by the user's input or environment, reported as one line."""

    exit_code: ExitCode = ExitCode.USAGE


class UsageError(SegcliError):
    exit_code = ExitCode.USAGE


class WeightsError(SegcliError):
    exit_code = ExitCode.MODEL


class ServiceError(SegcliError):
    """A server or cluster the command needs cannot be reached, refused us, or failed."""

    exit_code = ExitCode.MODEL  # 3, as for weights that cannot be had: the run cannot start
