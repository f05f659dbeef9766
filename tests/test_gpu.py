"""Latents on a CUDA device against the same model on the CPU (marker ``gpu``).

These run wherever torch sees a CUDA device; elsewhere ``conftest.py`` deselects them and
says so at the end of the run (``pytest -m gpu`` runs them anyway, and then fails without
CUDA). The README says where they last ran.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import read

from latentray.datasets import resolve_paths
from latentray.models import load_adapter

pytestmark = pytest.mark.gpu

CASES = [("chgnet", "0.3.0", None), ("chgnet", "r2scan", None), ("sevenn", "7net-0", None),
         ("sevenn", "7net-mf-0", "R2SCAN"), ("sevenn", "7net-l3i5", None)]


def _structures(n: int = 8):
    """Real MAD structures of up to 50 atoms with elements SevenNet-0 knows."""
    frames = read(resolve_paths("builtin:mad-val-1000")[0], index=":200")
    return [a for a in frames if len(a) <= 50 and not {84, 85, 86, 87, 88} & set(a.numbers)][:n]


@pytest.mark.parametrize("family, checkpoint, modality", CASES)
def test_latents_on_cuda_equal_the_cpus(family, checkpoint, modality):
    pytest.importorskip(family)
    frames = _structures()
    cpu = load_adapter(family, checkpoint, modality=modality, device="cpu")
    cuda = load_adapter(family, checkpoint, modality=modality, device="cuda")
    a = cpu.forward([cpu.prepare(x) for x in frames], ["all"])
    b = cuda.forward([cuda.prepare(x) for x in frames], ["all"])
    assert list(a) == list(b)
    for layer in a:
        assert b[layer].dtype == np.float32 and b[layer].shape == a[layer].shape
        np.testing.assert_allclose(b[layer], a[layer], rtol=1e-5, atol=1e-5, err_msg=layer)
