"""Finding "the next" executable of a name on PATH, after the shim that is running."""

from __future__ import annotations

import os
import shutil
import sys


class NotFound(RuntimeError):
    """No other executable of that name on PATH."""


def candidates(name: str, path: str) -> list[str]:
    """Every executable called `name` on `path`, in PATH order."""
    found = []
    for folder in path.split(os.pathsep):
        exe = os.path.join(folder or ".", name)
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            found.append(exe)
    return found


def this_executable(argv0: str, path: str) -> str:
    """The running shim's own file (argv[0] as typed, resolved through PATH when it has no slash)."""
    if os.sep not in argv0:
        argv0 = shutil.which(argv0, path=path) or argv0
    return os.path.realpath(argv0)


def next_on_path(name: str, argv0: str | None = None, path: str | None = None) -> str:
    """The first `name` on PATH after this shim (or the first that is not this shim)."""
    path = os.environ.get("PATH", "") if path is None else path
    me = this_executable(argv0 or sys.argv[0], path)
    found = candidates(name, path)
    real = [os.path.realpath(f) for f in found]
    after = real.index(me) + 1 if me in real else 0
    for exe, resolved in list(zip(found, real))[after:]:
        if resolved != me:
            return exe
    raise NotFound(f"no {name} on PATH besides this shim ({me}); PATH={path}")
