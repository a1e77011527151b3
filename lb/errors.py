"""Operational errors: what the CLI and the daemon report in one line.

A bad config, a missing interface, a failed syscall or an unreachable daemon
is the operator's to fix and gets a message, not a traceback; any other
exception is a bug in xdplb and keeps its traceback.
"""

from __future__ import annotations

from loader import BpfError

from .api import ApiError
from .config import ConfigError

OPERATIONAL: tuple[type[BaseException], ...] = (ApiError, BpfError, ConfigError, OSError)


def is_operational(e: BaseException) -> bool:
    # The Kubernetes client's and urllib3's errors (an API server that is
    # down or refuses us) are the operator's too; matched by module so that
    # the CLI does not import the client to check.
    return isinstance(e, OPERATIONAL) or type(e).__module__.startswith(("kubernetes.", "urllib3."))


def describe(e: BaseException) -> str:
    """The error as a message. An OSError names its path(s) rather than
    Python's "[Errno N] ..." form."""
    if isinstance(e, OSError) and e.strerror:
        paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {e.strerror}" if paths else e.strerror
    return str(e)


def problems(e: BaseException) -> list[str]:
    """The problems a config or API error lists, when there are several
    (one alone is in the message)."""
    errors = list(getattr(e, "errors", None) or [])
    return errors if len(errors) > 1 else []


def headline(e: BaseException) -> str:
    """describe(), without the list of problems that follows it when there
    are several (problems() gives them, to print one per line)."""
    text = describe(e)
    if problems(e):
        text = text.splitlines()[0].rstrip(":")
    return text
