"""What the benchmarks say about the machine they ran on, and the peak memory of a process."""

from __future__ import annotations

import os
import platform


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
    """This process's peak resident memory in GB (``VmHWM``: this program image only, not
    its parent's memory at the fork, which ``ru_maxrss`` would include)."""
    from latentray.extraction.worker import peak_rss_gb as peak

    return peak()
