"""DIEP (latentray.models.diep) in its own environment (``.venv-diep``), against DIEP's own ASE
calculator, on the model the ``diep`` package ships (``diep-matpes-r2scan``).

The DIEP environment's interpreter computes everything in one run (no Ray): the references
come from ``DIEPCalculator`` (what ``diep.pretrained.make_calculator`` returns), one structure
at a time, with forward hooks on the unmodified model's blocks (``graph_layers``) and on the
last Linear of both branches of its gated energy readout (``final_layer.gated``) while it
computes the energy; the adapter's layers are computed on the same structures, batched and
one at a time. The comparisons are made here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_periodicity import _in_vacuum, _isolated, _molecule, _short_open_vectors, _slab, _wire

ROOT = Path(__file__).resolve().parents[1]
DIEP_PYTHON = ROOT / ".venv-diep" / "bin" / "python"
MAD = ROOT / "latentray" / "data" / "mad-val-1000.xyz"
LAYERS = ["bb1", "bb2", "bb3", "ll"]
# MAD structure 835, CoPoSrY (none of the first 100 has an element DIEP lacks; Po is the
# first of the five it lacks, Po to Ra)
LACKING = 835

SCRIPT = """
import json, os, sys, time, warnings
import numpy as np, torch
from ase.io import read
from torch import nn

sys.path.insert(0, sys.argv[1])
mad, cases_path, out = sys.argv[2:5]
from diep.pretrained import DEFAULT_MODEL_DIR, make_calculator
from latentray.models import StructureError, load_adapter
from latentray.models.base import file_sha256

torch.set_num_threads(1)
model = load_adapter("diep", "diep-matpes-r2scan")
calc = make_calculator()  # the released model, DIEPCalculator
own = calc.potential.model
seen = {}


def keep(key, value):
    seen.setdefault(key, []).append(value.detach().numpy().copy())


for k, block in enumerate(own.graph_layers):
    block.register_forward_hook(lambda mod, a, o, k=k: keep(f"bb{k + 1}", o[1]))
gated = own.final_layer.gated
assert isinstance(gated.layers[-1], nn.Linear) and isinstance(gated.gates[-1], nn.Sigmoid)
gated.layers[-1].register_forward_pre_hook(lambda mod, a: keep("l", a[0]))
gated.gates[-2].register_forward_pre_hook(lambda mod, a: keep("g", a[0]))


def reference(frames):
    \"\"\"Every layer from DIEP's own calculator, one structure at a time (rows in order).\"\"\"
    seen.clear()
    energies = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
    got = {name: np.concatenate(seen[name]) for name in ("bb1", "bb2", "bb3")}
    got["ll"] = np.hstack([np.concatenate(seen["l"]), np.concatenate(seen["g"])])
    return got, energies


flat = {}
frames = [a for a in read(mad, index=":20") if len(a) <= 50][:6]
flat.update({f"mad/reference/{k}": v for k, v in reference(frames)[0].items()})
graphs = [model.prepare(a) for a in frames]
flat.update({f"mad/batched/{k}": v for k, v in model.forward(graphs, ["all"]).items()})
for i, graph in enumerate(graphs):
    for k, v in model.forward([graph], ["all"]).items():
        flat[f"mad/single{i}/{k}"] = v
for k, v in model.forward(graphs, ["bb1"]).items():  # stops after the first block
    flat[f"mad/early/{k}"] = v
flat["mad/alias/bb"] = model.forward(graphs, ["bb"])["bb"]

# slabs, wires, molecules, isolated atoms: ours on each variant, the calculator on `closed`
cases = json.load(open(cases_path))
for name, case in cases.items():
    given = read(case["given"], ":")
    closed = read(case["closed"], ":")
    for k, v in reference(closed)[0].items():
        flat[f"{name}/reference/{k}"] = v
    for j, atoms in enumerate(given):
        for k, v in model.forward([model.prepare(atoms)], ["all"]).items():
            flat[f"{name}/{j}/{k}"] = v

# refusals
lacking = read(mad, index=int(sys.argv[5]))
try:
    model.prepare(lacking)
    refused = None
except StructureError as e:
    refused = str(e)
errors = {}
for label, call in {"unknown name": lambda: load_adapter("diep", "diep_fold2"),
                    "empty folder": lambda: load_adapter("diep", out + ".d"),
                    "float64": lambda: load_adapter("diep", "diep-matpes-r2scan",
                                                    dtype="float64")}.items():
    os.makedirs(out + ".d", exist_ok=True)
    try:
        call()
        errors[label] = None
    except Exception as e:
        errors[label] = f"{type(e).__name__}: {e}"
by_path = load_adapter("diep", model.info.checkpoint_file)
flat["mad/by_path/bb3"] = by_path.forward(graphs, ["bb3"])["bb3"]

info = model.info
# the checkpoint's sha256 covers the weights: the same folder with one weight changed in
# state.pt is another checkpoint
import shutil
changed = shutil.copytree(info.checkpoint_file, out + ".changed")
state = torch.load(os.path.join(changed, "state.pt"))
key = next(k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point())
state[key] = state[key] + 1e-3
torch.save(state, os.path.join(changed, "state.pt"))
changed_sha = load_adapter("diep", changed).info.checkpoint_sha256
files_sha = {name: file_sha256(os.path.join(info.checkpoint_file, name))
             for name in ("model.json", "model.pt", "state.pt")}
np.savez(out, **flat)
json.dump({
    "info": {"family": info.family, "checkpoint": info.checkpoint,
             "checkpoint_file": info.checkpoint_file, "sha256": info.checkpoint_sha256,
             "files_sha256": files_sha, "changed_sha256": changed_sha, "cutoff": info.cutoff,
             "layer_widths": info.layer_widths,
             "supported": sorted(info.supported_numbers)},
    "own": {"folder": str(DEFAULT_MODEL_DIR.resolve()), "cutoff": own.cutoff,
            "threebody_cutoff": own.threebody_cutoff, "element_types": list(own.element_types),
            "node_width": own.embedding.dim_node_embedding,
            "readout_widths": [gated.layers[-1].in_features, gated.gates[-2].in_features],
            "n_blocks": len(own.graph_layers),
            "n_parameters": sum(p.numel() for p in calc.potential.parameters())},
    "by_path_sha256": by_path.info.checkpoint_sha256,
    "refused": refused, "errors": errors,
}, open(out + ".json", "w"))
"""


@pytest.fixture(scope="module")
def diep_run(tmp_path_factory):
    if not DIEP_PYTHON.exists():
        pytest.skip(f"{DIEP_PYTHON} missing: `make family-envs` builds DIEP's environment")
    from ase.io import write

    root = tmp_path_factory.mktemp("diep")
    cases = {}
    for build in (_slab, _wire, _molecule):
        atoms = build()
        closed = [_in_vacuum(atoms)] if atoms.pbc.any() else [atoms]
        everywhere = _short_open_vectors(atoms)
        everywhere.pbc = True
        given = [atoms, _in_vacuum(atoms), _short_open_vectors(atoms), everywhere]
        cases[build.__name__.strip("_")] = (given, closed)
    cases["isolated"] = (_isolated(), _isolated())
    paths = {}
    for name, (given, closed) in cases.items():
        write(root / f"{name}-given.traj", given)
        write(root / f"{name}-closed.traj", closed)
        paths[name] = {"given": str(root / f"{name}-given.traj"),
                       "closed": str(root / f"{name}-closed.traj")}
    (root / "cases.json").write_text(json.dumps(paths))
    env = {k: v for k, v in os.environ.items() if k != "DIEP_MODEL_DIR"}
    done = subprocess.run([str(DIEP_PYTHON), "-c", SCRIPT, str(ROOT), str(MAD),
                           str(root / "cases.json"), str(root / "out.npz"), str(LACKING)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return (np.load(root / "out.npz"), json.loads((root / "out.npz.json").read_text()),
            {name: given for name, (given, _) in cases.items()})


def test_every_layer_equals_hooks_on_its_own_calculator(diep_run):
    got, _, _ = diep_run
    for layer in LAYERS:
        theirs = got[f"mad/reference/{layer}"]
        ours = got[f"mad/batched/{layer}"]
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        assert np.isfinite(ours).all() and np.abs(theirs).max() > 1e-2
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5, err_msg=layer)
    assert got["mad/batched/bb3"].shape[1] == 64 and got["mad/batched/ll"].shape[1] == 128


def test_one_at_a_time_equals_batched(diep_run):
    got, _, _ = diep_run
    for layer in LAYERS:
        single = np.concatenate([got[f"mad/single{i}/{layer}"] for i in range(6)])
        np.testing.assert_allclose(single, got[f"mad/batched/{layer}"], rtol=0, atol=1e-5,
                                   err_msg=layer)


def test_truncated_pass_alias_and_path(diep_run):
    got, meta, _ = diep_run
    assert [k for k in got.files if k.startswith("mad/early/")] == ["mad/early/bb1"]
    np.testing.assert_array_equal(got["mad/early/bb1"], got["mad/batched/bb1"])
    np.testing.assert_array_equal(got["mad/alias/bb"], got["mad/batched/bb3"])
    # the packaged folder by its path: the same model
    np.testing.assert_array_equal(got["mad/by_path/bb3"], got["mad/batched/bb3"])
    assert meta["by_path_sha256"] == meta["info"]["sha256"]


def test_info_matches_the_model(diep_run):
    _, meta, _ = diep_run
    info, own = meta["info"], meta["own"]
    assert info["family"] == "diep" and info["checkpoint"] == "diep-matpes-r2scan"
    assert Path(info["checkpoint_file"]) == Path(own["folder"])
    assert Path(own["folder"]).name == "diep_fold1"
    # the folder's sha256: its three files' own, in order (changing the weights changes it)
    expected = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in
                                      info["files_sha256"].items()).encode()).hexdigest()
    assert list(info["files_sha256"]) == ["model.json", "model.pt", "state.pt"]
    assert info["sha256"] == expected and info["changed_sha256"] != expected
    assert info["cutoff"] == own["cutoff"] == 5.0 and own["threebody_cutoff"] == 4.0
    assert info["layer_widths"] == {"bb1": 64, "bb2": 64, "bb3": 64, "ll": 128}
    assert own["n_blocks"] == 3 and own["node_width"] == 64
    assert own["readout_widths"] == [64, 64]
    from ase.data import atomic_numbers

    assert info["supported"] == sorted(atomic_numbers[s] for s in own["element_types"])
    assert len(info["supported"]) == 89
    assert set(range(1, 95)) - set(info["supported"]) == {84, 85, 86, 87, 88}  # Po to Ra
    assert own["n_parameters"] == 403181


def test_unknown_element_and_checkpoints_are_refused(diep_run):
    _, meta, _ = diep_run
    assert meta["refused"] and "Po" in meta["refused"], meta["refused"]
    errors = meta["errors"]
    assert errors["unknown name"].startswith("ValueError") and "packaged" in errors["unknown name"]
    assert errors["empty folder"].startswith("FileNotFoundError")
    assert "model.json" in errors["empty folder"]
    assert errors["float64"].startswith("ValueError") and "float32" in errors["float64"]


@pytest.mark.parametrize("name", ["slab", "wire", "molecule"])
def test_slabs_wires_and_molecules_as_its_own_calculator(diep_run, name):
    """DIEP's own converter makes images along the periodic axes only. Every layer of ours,
    for the structure as given (no cell vector along its open axes), in a vacuum cell and with
    open-axis vectors of 4 A, equals DIEP's calculator on it in the vacuum cell (a molecule:
    as given, no cell); the 4 A cell made periodic everywhere is another graph."""
    got, _, given = diep_run
    n = len(given[name][0])
    for layer in LAYERS:
        theirs = got[f"{name}/reference/{layer}"]
        assert theirs.shape[0] == n
        for k in range(3):
            np.testing.assert_allclose(got[f"{name}/{k}/{layer}"], theirs, rtol=1e-5,
                                       atol=1e-5, err_msg=f"variant {k}, {layer}")
    assert np.abs(got[f"{name}/3/bb1"] - got[f"{name}/reference/bb1"]).max() > 1e-2


def test_isolated_atoms_as_its_own_calculator(diep_run):
    """Atoms with no neighbour within the cutoff (a single atom, an atom 15 A from a bonded
    pair, two atoms 12 A apart): every layer of ours equals DIEP's own calculator, finite."""
    got, _, given = diep_run
    frames = given["isolated"]
    ends = np.cumsum([len(atoms) for atoms in frames])
    for layer in LAYERS:
        theirs = np.split(got[f"isolated/reference/{layer}"], ends[:-1])
        for k, atoms in enumerate(frames):
            ours = got[f"isolated/{k}/{layer}"]
            assert ours.shape[0] == len(atoms) and np.isfinite(ours).all()
            np.testing.assert_allclose(ours, theirs[k], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{atoms.get_chemical_formula()}, {layer}")
