"""Tests marked ``gpu`` need a CUDA device: deselected (and reported) where torch sees none,
unless asked for with ``-m gpu``."""

from __future__ import annotations

import pytest

_DESELECTED = pytest.StashKey[int]()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu or "gpu" in (config.option.markexpr or "") or _cuda_available():
        return
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    config.stash[_DESELECTED] = len(gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.stash.get(_DESELECTED, 0)
    if n:
        terminalreporter.write_line(f"{n} gpu test(s) deselected: torch sees no CUDA device "
                                    "on this machine (they run wherever it does)")
