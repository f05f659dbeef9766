"""MACE in its own environment (``.venv-mace``: e3nn 0.4.4) beside CHGNet and SevenNet (e3nn >=
0.5) in one ``latentray run``; MACE's latents against its own ``get_descriptors``.

The model is built here with MACE's own constructor (random weights, no download) by the
MACE environment's interpreter, which also computes the references.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
MACE_PYTHON = ROOT / ".venv-mace" / "bin" / "python"
N_STRUCTURES = 20

# run by the MACE environment: build a small MACE model, save it, compute the references
BUILD_AND_REFERENCE = """
import os, sys, warnings
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
warnings.simplefilter("ignore")
import numpy as np, torch
from ase.io import read
from e3nn import o3
from mace import modules
from mace.calculators import MACECalculator
from mace.tools import utils

out, structures, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
z_table = utils.AtomicNumberTable(list(range(1, 95)))
block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
model = modules.ScaleShiftMACE(
    r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
    interaction_cls_first=block, num_interactions=2, num_elements=len(z_table),
    hidden_irreps=o3.Irreps("16x0e+16x1o"), MLP_irreps=o3.Irreps("8x0e"),
    atomic_energies=np.zeros(len(z_table)), avg_num_neighbors=10.0, atomic_numbers=z_table.zs,
    correlation=2, gate=torch.nn.functional.silu, atomic_inter_scale=1.0, atomic_inter_shift=0.0)
torch.save(model, os.path.join(out, "small.model"))
calc = MACECalculator(model_paths=os.path.join(out, "small.model"), device="cpu",
                      default_dtype="float64")
frames = read(structures, index=f":{n}")
descriptors = np.concatenate([calc.get_descriptors(a, invariants_only=True) for a in frames])
# ll: the last readout's hidden activations, from its own modules on MACE's node features
readout = calc.models[0].readouts[-1]
hidden = []
for a in frames:
    batch = calc._atoms_to_batch(a)
    feats = calc.models[0](batch.to_dict())["node_feats"][:, -16:]
    hidden.append(readout.non_linearity(readout.linear_1(feats)).detach().numpy())
np.savez(os.path.join(out, "reference.npz"), descriptors=descriptors,
         ll=np.concatenate(hidden), n_atoms=[len(a) for a in frames])
"""


@pytest.fixture(scope="module")
def mace_run(tmp_path_factory):
    if not MACE_PYTHON.exists():
        pytest.skip(f"{MACE_PYTHON} missing: `make family-envs` builds MACE's environment")
    root = tmp_path_factory.mktemp("mace")
    mad = ROOT / "latentray" / "data" / "mad-val-1000.xyz"
    subprocess.run([str(MACE_PYTHON), "-c", BUILD_AND_REFERENCE, str(root), str(mad),
                    str(N_STRUCTURES)], check=True, capture_output=True, text=True)
    config = root / "mixed.yaml"
    config.write_text(f"""
output: {root / "out"}
datasets: [{{name: mad, path: builtin:mad-val-1000, limit: {N_STRUCTURES}}}]
models:
  - {{id: mace-small, family: mace, checkpoint: {root / "small.model"}, layers: [bb1, bb2, ll],
     dtype: float64}}
  - {{id: chgnet-0.3.0, family: chgnet, checkpoint: "0.3.0", layers: [bb]}}
  - {{id: sevennet-0, family: sevenn, checkpoint: 7net-0, layers: [bb]}}
environments:
  mace: {{python: {MACE_PYTHON}}}
extraction: {{shard_size: 10}}
analyses: {{n_test: 200, layers: [bb], metrics: [gfre], order_metrics: [], baselines: []}}
""")
    assert main(["run", str(config), "--quiet"]) == 0
    yield root
    import ray

    ray.shutdown()


def test_every_family_version_is_recorded(mace_run):
    assert_family_versions_recorded(mace_run / "out")


def test_mace_latents_equal_its_own_get_descriptors(mace_run):
    reference = np.load(mace_run / "reference.npz")
    ours = layer_matrices(mace_run / "out", "mace-small")
    assert sorted(ours) == ["bb1", "bb2", "ll"]
    n_atoms = int(reference["n_atoms"].sum())
    np.testing.assert_allclose(np.hstack([ours["bb1"], ours["bb2"]]), reference["descriptors"],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours["ll"], reference["ll"], rtol=1e-6, atol=1e-6)
    assert ours["bb1"].shape == (n_atoms, 16) and ours["ll"].shape == (n_atoms, 8)


def test_one_run_mixes_families_from_conflicting_environments(mace_run):
    run = json.loads((mace_run / "out" / "run.json").read_text())
    assert [m["id"] for m in run["provenance"]["models"]] == ["mace-small", "chgnet-0.3.0",
                                                               "sevennet-0"]
    results = pd.read_csv(mace_run / "out" / "results" / "reconstruction.csv")
    pairs = set(zip(results.source, results.target))
    assert ("mace-small", "sevennet-0") in pairs and ("sevennet-0", "mace-small") in pairs
    assert results.value.notna().all()
    assert_one_gfre_equals_skmatter(mace_run / "out", "mace-small", "sevennet-0")
    assert_one_gfre_equals_skmatter(mace_run / "out", "chgnet-0.3.0", "mace-small")
    # the driver's environment has no MACE: it only ran in the actors
    assert subprocess.run([sys.executable, "-c", "import mace"],
                          capture_output=True).returncode != 0


PERIODICITY = """
import os, sys, warnings
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import numpy as np
from ase.io import read
from mace.calculators import MACECalculator
from latentray.models import load_adapter

path, given, out = sys.argv[2:5]
calc = MACECalculator(model_paths=path, device="cpu", default_dtype="float64")
model = load_adapter("mace", path, dtype="float64")
flat = {}
for k, atoms in enumerate(read(given, ":")):
    try:
        flat[f"{k}/own"] = calc.get_descriptors(atoms, invariants_only=True)
    except Exception as e:  # what MACE's own calculator does not take
        flat[f"{k}/own_error"] = np.array(f"{type(e).__name__}: {e}")
    ours = model.forward([model.prepare(atoms)], ["bb1", "bb2"])
    flat[f"{k}/ours"] = np.hstack([ours["bb1"], ours["bb2"]])
np.savez(out, **flat)
"""


def _run_periodicity(mace_run, name: str, frames):
    """Ours and MACE's own ``get_descriptors`` on ``frames``, in ``.venv-mace``: the npz,
    after checking that MACE's own calculator took every frame."""
    from ase.io import write

    root = mace_run / name
    root.mkdir()
    write(root / "given.traj", frames)
    done = subprocess.run([str(MACE_PYTHON), "-c", PERIODICITY, str(ROOT),
                           str(mace_run / "small.model"), str(root / "given.traj"),
                           str(root / "out.npz")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(root / "out.npz")
    assert not [k for k in got.files if k.endswith("own_error")], \
        {k: str(got[k]) for k in got.files if k.endswith("own_error")}
    return got


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
def test_mace_takes_slabs_wires_and_molecules_as_its_own_calculator(mace_run, build):
    """MACE's own neighbour list is periodic along ``pbc`` only: bb1 | bb2 equal its own
    ``get_descriptors`` on the structure as given (no cell vector along the open axes), in
    a vacuum cell and with open-axis vectors of 4 A, and all three agree; the 4 A cell made
    periodic everywhere is another graph."""
    atoms = build()
    short = _short_open_vectors(atoms)
    everywhere = short.copy()
    everywhere.pbc = True
    got = _run_periodicity(mace_run, build.__name__.strip("_"),
                           [atoms, _in_vacuum(atoms), short, everywhere])
    for k in range(4):
        assert got[f"{k}/ours"].shape[0] == len(atoms)
        np.testing.assert_allclose(got[f"{k}/ours"], got[f"{k}/own"], rtol=1e-6, atol=1e-6)
    for k in (1, 2):
        np.testing.assert_allclose(got[f"{k}/ours"], got["0/ours"], atol=1e-6)
    assert np.abs(got["3/ours"] - got["0/ours"]).max() > 1e-2


def test_mace_takes_isolated_atoms_as_its_own_calculator(mace_run):
    """An atom with no neighbour within the cutoff, through MACE's own ``get_descriptors``: bb1
    | bb2 of ours equal it, finite, for a single atom, an atom 15 A from a bonded pair in a
    periodic box and two atoms 12 A apart without a cell."""
    from test_periodicity import _isolated

    frames = _isolated()
    got = _run_periodicity(mace_run, "isolated", frames)
    for k, atoms in enumerate(frames):
        assert got[f"{k}/ours"].shape[0] == len(atoms) and np.isfinite(got[f"{k}/ours"]).all()
        np.testing.assert_allclose(got[f"{k}/ours"], got[f"{k}/own"], rtol=1e-6, atol=1e-6)
