"""CPU threads for torch: the physical cores this process may run on, never more.

Hyper-threads share a core's vector units, and OpenMP threads that outnumber the free cores spin
and wait for each other: on a busy 2-core machine the default (one thread per logical CPU) ran
about 25x slower than one thread. The server's own threads (event loop, tokenizer threads)
mostly wait, so they are not subtracted.
"""

from __future__ import annotations

import os
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")


def usable_cpus() -> set[int]:
    """Logical CPUs this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None, sys_cpu: Path = SYS_CPU) -> int:
    """Distinct (package, core) pairs among `cpus`; the logical count where the topology is unknown."""
    cpus = usable_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def default_num_threads() -> int:
    """torch intra-op threads when --num-threads is not given."""
    return physical_cores()
