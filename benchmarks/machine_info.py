"""What the benchmarks say about the machine they ran on, and the peak memory of a process."""

from __future__ import annotations

import os
import platform
import resource


def describe(**versions: str) -> dict:
    """CPU model, cores, RAM (GB), Python version, and the given package versions."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        ram = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram / 1e9,
            "python": platform.python_version(), **versions}


def peak_rss_gb() -> float:
    """This process's peak resident memory (``ru_maxrss``, KiB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
