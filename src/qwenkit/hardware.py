"""Facts about this machine that engines and the planner size themselves by.

Contract: pure reads of the OS (no side effects); each function falls back to a safe answer where the
information is missing (containers, non-Linux).
"""

from __future__ import annotations

import os
from pathlib import Path


def usable_cpus() -> list[int]:
    """CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the usable CPUs (hyper-threads of one core count once)."""
    cores: set[tuple[str, str]] = set()
    for cpu in usable_cpus():
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(usable_cpus())
        cores.add((package, core))
    return max(1, len(cores))
