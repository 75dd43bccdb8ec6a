"""The machine a measurement ran on, and how busy it was with anything else meanwhile."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def machine_line(threads_note: str) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
               platform.processor())
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {threads_note}"


def _busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (all cores) since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU-seconds of this process and of its children that have ended (measurement workers)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# Other processes may use this share of the machine's CPU time during a run before it is marked contended.
CONTENDED_SHARE = 0.05


class Contention:
    """How busy the machine was with anything else while a measurement ran: the load average before,
    and the CPU time the rest of the machine used during the run (all busy CPU time, from
    /proc/stat, less this process's and its finished children's). A run where others took more
    than CONTENDED_SHARE of the machine is marked contended: its absolute times are not to be trusted."""

    def __init__(self) -> None:
        self.load_before = list(os.getloadavg())
        self.start_wall = time.time()
        self.start_busy, self.start_own = _busy_seconds(), _own_seconds()

    def summary(self) -> dict:
        wall = time.time() - self.start_wall
        others = max(0.0, (_busy_seconds() - self.start_busy) - (_own_seconds() - self.start_own))
        share = others / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
        return {"load_before": [round(v, 2) for v in self.load_before], "load_after": [round(v, 2) for v in os.getloadavg()],
                "others_cpu_s": round(others, 1), "others_share": round(share, 3), "contended": share > CONTENDED_SHARE,
                "wall_s": round(wall, 1)}


def contention_line(summary: dict) -> str:
    verdict = "CONTENDED: other work took" if summary["contended"] else "uncontended: other work took"
    return (f"Machine load: {verdict} {summary['others_share']:.1%} of the CPU time during the run "
            f"({summary['others_cpu_s']} CPU-s over {summary['wall_s']} s); load average before {summary['load_before']}, "
            f"after {summary['load_after']}.")
