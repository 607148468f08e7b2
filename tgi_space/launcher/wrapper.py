"""`text-generation-launcher` shim: takes `--speculate-mode {space,sdsat,none}`, hands the rest to the real launcher.

The mode reaches the shards through the environment (`SPECULATE_MODE` and `TGI_SPACE_SPECULATE_MODE`), which TGI's launcher
copies into every shard it starts. Every other argument goes to the real launcher unchanged;
the real launcher is the next `text-generation-launcher` on PATH (or `TGI_SPACE_REAL_LAUNCHER`).
"""

from __future__ import annotations

import os
import sys

from tgi_space.config import SPECULATE_MODES
from tgi_space.launcher.path import NotFound, next_on_path

FLAG = "--speculate-mode"
GUARD = "TGI_SPACE_LAUNCHER_WRAPPED"  # set before exec: a second pass means the shim found itself


class UsageError(ValueError):
    """A bad --speculate-mode / SPECULATE_MODE."""


def split_args(args: list[str], env: dict[str, str]) -> tuple[str | None, list[str]]:
    """(mode, the other arguments in order); the flag wins over SPECULATE_MODE; the last flag wins."""
    mode, rest, i = env.get("TGI_SPACE_SPECULATE_MODE") or env.get("SPECULATE_MODE") or None, [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # everything after belongs to the launcher untouched
            rest += args[i:]
            break
        if arg == FLAG:
            if i + 1 >= len(args):
                raise UsageError(f"{FLAG} needs a value: {' | '.join(SPECULATE_MODES)}")
            mode, i = args[i + 1], i + 2
            continue
        if arg.startswith(FLAG + "="):
            mode = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if mode is not None:
        mode = mode.strip().lower()
        if mode not in SPECULATE_MODES:
            raise UsageError(f"{FLAG} / SPECULATE_MODE must be one of {', '.join(SPECULATE_MODES)}, got {mode!r}")
    return mode, rest


def plan(argv: list[str], env: dict[str, str]) -> tuple[str, list[str], dict[str, str]]:
    """(executable, argv, environment) to exec; raises UsageError or NotFound."""
    if env.get(GUARD):
        raise NotFound(f"the launcher shim ran twice ({GUARD} is set): PATH leads back to it")
    mode, rest = split_args(argv[1:], env)
    real = env.get("TGI_SPACE_REAL_LAUNCHER") or next_on_path("text-generation-launcher", argv[0], env.get("PATH", ""))
    child_env = dict(env, **{GUARD: "1"})
    if mode is not None:  # both names: the shard reads TGI_SPACE_SPECULATE_MODE first
        child_env["SPECULATE_MODE"] = child_env["TGI_SPACE_SPECULATE_MODE"] = mode
    return real, [real, *rest], child_env


def main() -> None:
    """Console entry point: exec the real launcher (this process is replaced)."""
    try:
        real, args, env = plan(sys.argv, dict(os.environ))
    except (UsageError, NotFound) as err:
        print(f"text-generation-launcher (tgi-space shim): {err}", file=sys.stderr)
        sys.exit(2)
    if "--help" in args or "-h" in args:
        print(f"tgi-space: {FLAG} {{{','.join(SPECULATE_MODES)}}} (env SPECULATE_MODE) is also accepted here.\n",
              file=sys.stderr)
    os.execve(real, args, env)


if __name__ == "__main__":
    main()
