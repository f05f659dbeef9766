"""MatterSim in its own environment (``.venv-mattersim``), beside CHGNet in one ``latentray run``;
its latents against MatterSim's own ASE calculator.

The model is built with MatterSim's own constructor and saved by its own ``Potential.save``
(random weights, no download) by the MatterSim environment's interpreter, which also computes
the references: ``MatterSimCalculator`` one structure at a time, with forward hooks on the M3GNet
blocks and on the last layers of the gated energy readout while it computes the energy.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import (assert_family_versions_recorded, assert_one_gfre_equals_skmatter,
                     layer_matrices)
from latentray.cli import main
from test_periodicity import _in_vacuum, _molecule, _short_open_vectors, _slab, _wire

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MATTERSIM_PYTHON = ROOT / ".venv-mattersim" / "bin" / "python"
N_STRUCTURES = 12

HOOKED_CALCULATOR = """
import os, sys, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
from ase.io import read
from mattersim.forcefield.m3gnet.m3gnet import M3Gnet
from mattersim.forcefield.potential import MatterSimCalculator, Potential


def reference(path, frames):
    \"\"\"Every layer from MatterSimCalculator, one structure at a time, by forward hooks.\"\"\"
    potential = Potential.from_checkpoint(path, device="cpu", load_training_state=False)
    m = potential.model
    seen = {"bb1": [], "bb2": [], "g": [], "sigma": []}
    for k, block in enumerate(m.graph_conv):
        block.register_forward_hook(
            lambda mod, a, o, k=k: seen[f"bb{k + 1}"].append(o[0].detach().numpy().copy()))
    for b in ("g", "sigma"):
        getattr(m.final, b)[-1].register_forward_pre_hook(
            lambda mod, a, b=b: seen[b].append(a[0].detach().numpy().copy()))
    calc = MatterSimCalculator(potential, device="cpu")
    for a in frames:
        a = a.copy()
        a.calc = calc
        a.get_potential_energy()
    return dict(bb1=np.concatenate(seen["bb1"]), bb2=np.concatenate(seen["bb2"]),
                ll=np.hstack([np.concatenate(seen["g"]), np.concatenate(seen["sigma"])]))
"""

BUILD_AND_REFERENCE = HOOKED_CALCULATOR + """
out, structures, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = M3Gnet(num_blocks=2, units=16, max_l=2, max_n=3, cutoff=5.0, threebody_cutoff=4.0,
               device="cpu")
path = os.path.join(out, "small-mattersim.pth")
Potential(model, device="cpu").save(path)
np.savez(os.path.join(out, "reference.npz"), **reference(path, read(structures, index=f":{n}")))
"""


@pytest.fixture(scope="module")
def mattersim_run(tmp_path_factory):
    if not MATTERSIM_PYTHON.exists():
        pytest.skip(f"{MATTERSIM_PYTHON} missing: `make family-envs` builds MatterSim's "
                    "environment")
    root = tmp_path_factory.mktemp("mattersim")
    mad = ROOT / "latentray" / "data" / "mad-val-1000.xyz"
    subprocess.run([str(MATTERSIM_PYTHON), "-c", BUILD_AND_REFERENCE, str(root), str(mad),
                    str(N_STRUCTURES)], check=True, capture_output=True, text=True)
    config = root / "mixed.yaml"
    config.write_text(f"""
output: {root / "out"}
datasets: [{{name: mad, path: builtin:mad-val-1000, limit: {N_STRUCTURES}}}]
models:
  - {{id: mattersim-small, family: mattersim, checkpoint: {root / "small-mattersim.pth"},
     layers: [all]}}
  - {{id: chgnet-0.3.0, family: chgnet, checkpoint: "0.3.0", layers: [bb]}}
environments:
  mattersim: {{python: {MATTERSIM_PYTHON}}}
extraction: {{shard_size: 5}}
analyses: {{n_test: 100, layers: [bb], metrics: [gfre], order_metrics: [], baselines: []}}
""")
    assert main(["run", str(config), "--quiet"]) == 0
    yield root
    import ray

    ray.shutdown()


def test_every_family_version_is_recorded(mattersim_run):
    assert_family_versions_recorded(mattersim_run / "out")


def test_mattersim_latents_equal_its_own_calculator(mattersim_run):
    reference = np.load(mattersim_run / "reference.npz")
    ours = layer_matrices(mattersim_run / "out", "mattersim-small")
    assert sorted(ours) == ["bb1", "bb2", "ll"]
    for layer in ours:
        np.testing.assert_allclose(ours[layer], reference[layer], rtol=1e-5, atol=1e-6)
    assert ours["bb2"].shape[1] == 16 and ours["ll"].shape[1] == 32


def test_mattersim_is_compared_with_chgnet(mattersim_run):
    results = pd.read_csv(mattersim_run / "out" / "results" / "reconstruction.csv")
    pairs = set(zip(results.source, results.target))
    assert {("mattersim-small", "chgnet-0.3.0"), ("chgnet-0.3.0", "mattersim-small")} <= pairs
    assert results.value.notna().all()
    assert_one_gfre_equals_skmatter(mattersim_run / "out", "mattersim-small", "chgnet-0.3.0")


def test_float64_is_refused(mattersim_run):
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from latentray.models import load_adapter
try:
    load_adapter("mattersim", {str(mattersim_run / "small-mattersim.pth")!r}, dtype="float64")
except ValueError as e:
    assert "float32" in str(e), e
else:
    raise AssertionError("float64 accepted")
"""
    done = subprocess.run([str(MATTERSIM_PYTHON), "-c", script], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]


PERIODICITY = HOOKED_CALCULATOR + """
sys.path.insert(0, sys.argv[1])
from latentray.models import load_adapter

path, given, closed, out = sys.argv[2:6]
model = load_adapter("mattersim", path)
flat = {f"reference/{layer}": v for layer, v in reference(path, read(closed, ":")).items()}
for k, atoms in enumerate(read(given, ":")):
    for layer, values in model.forward([model.prepare(atoms)], ["all"]).items():
        flat[f"{k}/{layer}"] = values
np.savez(out, **flat)
"""


def _run_periodicity(mattersim_run, name: str, given, closed):
    """Every layer of ours on ``given`` and of MatterSim's own calculator on ``closed``
    (``reference/LAYER``, the frames' rows one after another), in ``.venv-mattersim``."""
    from ase.io import write

    root = mattersim_run / name
    root.mkdir()
    write(root / "given.traj", given)
    write(root / "closed.traj", closed)
    done = subprocess.run([str(MATTERSIM_PYTHON), "-c", PERIODICITY, str(ROOT),
                           str(mattersim_run / "small-mattersim.pth"), str(root / "given.traj"),
                           str(root / "closed.traj"), str(root / "out.npz")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(root / "out.npz")


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
def test_mattersim_takes_slabs_wires_and_molecules(mattersim_run, build):
    """MatterSim treats any periodic cell as periodic along all three axes. The structure
    in a vacuum cell made periodic along every axis (20 A between images across an open
    axis, more than its 5 A cutoff) has the partly periodic structure's graph: every layer of
    ours equals MatterSim's own calculator on it, for the structure as given (no cell vector
    along the open axes), in a vacuum cell and with open-axis vectors of 4 A (a molecule: as
    given, no cell, through its own calculator too). The 4 A cell made periodic everywhere is
    another graph."""
    atoms = build()
    closed = _in_vacuum(atoms)
    closed.pbc = True
    short = _short_open_vectors(atoms)
    everywhere = short.copy()
    everywhere.pbc = True
    got = _run_periodicity(mattersim_run, build.__name__.strip("_"),
                           [atoms, _in_vacuum(atoms), short, everywhere],
                           [closed] + ([atoms] if not atoms.pbc.any() else []))
    n = len(atoms)
    for layer in ("bb1", "bb2", "ll"):
        theirs = got[f"reference/{layer}"]
        if not atoms.pbc.any():  # the molecule itself, through its own calculator
            assert theirs.shape[0] == 2 * n
            np.testing.assert_allclose(theirs[n:], theirs[:n], atol=1e-5, err_msg=layer)
        for k in range(3):
            np.testing.assert_allclose(got[f"{k}/{layer}"], theirs[:n], rtol=1e-5, atol=1e-5,
                                       err_msg=f"variant {k}, {layer}")
    assert np.abs(got["3/bb1"] - got["reference/bb1"][:n]).max() > 1e-2


def test_mattersim_takes_isolated_atoms_as_its_own_calculator(mattersim_run):
    """An atom with no neighbour within the cutoff, through MatterSim's own calculator: every
    layer of ours equals it, finite, for a single atom, an atom 15 A from a bonded pair in a
    periodic box and two atoms 12 A apart without a cell."""
    from test_periodicity import _isolated

    frames = _isolated()
    got = _run_periodicity(mattersim_run, "isolated", frames, frames)
    ends = np.cumsum([len(atoms) for atoms in frames])
    for layer in ("bb1", "bb2", "ll"):
        theirs = np.split(got[f"reference/{layer}"], ends[:-1])
        for k, atoms in enumerate(frames):
            ours = got[f"{k}/{layer}"]
            assert ours.shape[0] == len(atoms) and np.isfinite(ours).all()
            np.testing.assert_allclose(ours, theirs[k], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{atoms.get_chemical_formula()}, {layer}")
