"""The machine line every benchmark report carries."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_line(threads_note: str) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
               platform.processor())
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, {threads_note}"
