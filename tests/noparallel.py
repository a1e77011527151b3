"""The numba functions of lb that open a parallel region, and a guard that
replaces them by ones that fail: for the tests of the paths that must never
enter one (a parallel region stalls for milliseconds when another core is
busy; see lb/maglev.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import lb.maglev  # noqa: F401  (the module with numba code; others found once imported)


def parallel_functions() -> dict[tuple[str, str], object]:
    """(module, name) -> module every numba dispatcher compiled with
    parallel=True in the lb modules imported so far."""
    out = {}
    for modname, mod in list(sys.modules.items()):
        if modname != "lb" and not modname.startswith("lb."):
            continue
        for name, obj in vars(mod).items():
            opts = getattr(obj, "targetoptions", None)
            if isinstance(opts, dict) and opts.get("parallel") and getattr(obj, "__module__", None) == modname:
                out[(modname, name)] = mod
    return out


@contextmanager
def forbid_parallel_regions() -> Iterator[list[str]]:
    """Meanwhile, calling any of parallel_functions() raises AssertionError;
    yields the list of the ones that were called (in case a caller swallows
    the error)."""
    called: list[str] = []
    found = parallel_functions()
    assert found, "no parallel numba function found: the guard would guard nothing"
    with pytest.MonkeyPatch.context() as mp:
        for (modname, name), mod in found.items():
            def refuse(*_a, _what=f"{modname}.{name}", **_k):
                called.append(_what)
                raise AssertionError(f"{_what}: a numba parallel region on a small path")

            mp.setattr(mod, name, refuse)
        yield called
