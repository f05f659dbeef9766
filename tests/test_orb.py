"""Orb: a small model built with Orb's own architecture function (random weights, no download),
saved as a state dict, loaded by latentray, against Orb's own ASE calculator."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

from helpers import assert_family_versions_recorded, layer_matrices
from test_periodicity import _in_vacuum, _molecule, _short_open_vectors, _slab, _wire
from latentray.models.orb import pretrained_name

MAD = Path(__file__).resolve().parents[1] / "latentray" / "data" / "mad-val-1000.xyz"
ARGUMENTS = {"latent_dim": 24, "base_mlp_hidden_dim": 48, "num_message_passing_steps": 3,
             "head_mlp_hidden_dim": 16}
SYSTEM = {"radius": 6.0, "max_num_neighbors": 20}
OPTIONS = {"architecture": "orb_v3_direct_architecture", "system_config": SYSTEM,
           "arguments": ARGUMENTS}


def test_published_file_names_resolve_to_the_longest_matching_model():
    names = ["orb-v2", "orb-v3-direct-20-omat", "orb-v3-direct-20-omat-extra", "orb-d3-v2"]
    assert pretrained_name("/x/orb-v3-direct-20-omat-20250404.ckpt", names) == \
        "orb-v3-direct-20-omat"
    assert pretrained_name("orb-v3-direct-20-omat-extra-1.ckpt", names) == \
        "orb-v3-direct-20-omat-extra"
    assert pretrained_name("/x/my-model.ckpt", names) is None


@pytest.fixture(scope="module")
def small_orb(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("orb_models")
    from orb_models.forcefield import pretrained
    from orb_models.forcefield.atomic_system import SystemConfig

    path = tmp_path_factory.mktemp("orb") / "small-orb.ckpt"
    torch.manual_seed(0)
    model = pretrained.orb_v3_direct_architecture(system_config=SystemConfig(**SYSTEM),
                                                  **ARGUMENTS)
    torch.save(model.state_dict(), path)
    return path


def orb_reference(checkpoint, frames):
    """Node features after each message-passing step, from Orb's ORBCalculator one structure
    at a time (forward hooks on the backbone's steps while it computes the energy)."""
    import torch
    from orb_models.forcefield import pretrained
    from orb_models.forcefield.atomic_system import SystemConfig
    from orb_models.forcefield.calculator import ORBCalculator

    default = torch.get_default_dtype()
    with warnings.catch_warnings():  # Orb's notes on the default dtype it sets
        warnings.simplefilter("ignore", UserWarning)
        model = pretrained.load_model(
            pretrained.orb_v3_direct_architecture(system_config=SystemConfig(**SYSTEM),
                                                  **ARGUMENTS),
            str(checkpoint), "cpu", precision="float32-highest", compile=False)
    torch.set_default_dtype(default)
    calc = ORBCalculator(model, device="cpu")
    steps = model.model.gnn_stacks
    out = {f"bb{k + 1}": [] for k in range(len(steps))}
    hooks = [step.register_forward_hook(
        lambda module, args, output, k=k: out[f"bb{k + 1}"].append(output[0].detach().numpy()))
        for k, step in enumerate(steps)]
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
    for hook in hooks:
        hook.remove()
    return {name: np.concatenate(values) for name, values in out.items()}


def test_features_equal_orbs_own_calculator(small_orb):
    from latentray.models import load_adapter

    frames = read(MAD, index=":12")
    model = load_adapter("orb", str(small_orb), options=OPTIONS)
    assert model.info.layer_widths == {"bb1": 24, "bb2": 24, "bb3": 24}
    assert model.info.cutoff == 6.0 and model.info.supported_numbers is None
    ours = model.forward([model.prepare(a) for a in frames], ["bb1", "bb2", "bb3", "bb"])
    theirs = orb_reference(small_orb, frames)
    for name in ("bb1", "bb2", "bb3"):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours["bb"], ours["bb3"])
    assert ours["bb1"].shape == (sum(len(a) for a in frames), 24)


def test_loading_does_not_change_the_processes_default_dtype(small_orb):
    import torch

    from latentray.models import load_adapter

    load_adapter("orb", str(small_orb), options=OPTIONS, dtype="float64")
    assert torch.get_default_dtype() == torch.float32


def test_names_options_and_geometry_errors(small_orb, tmp_path):
    from latentray.models import StructureError, load_adapter

    unnamed = tmp_path / "my-model.ckpt"
    unnamed.write_bytes(small_orb.read_bytes())
    with pytest.raises(ValueError, match="no published Orb model name"):
        load_adapter("orb", str(unnamed))
    with pytest.raises(ValueError, match="unknown option"):
        load_adapter("orb", str(small_orb), options={"radius": 5})
    model = load_adapter("orb", str(small_orb), options=OPTIONS)
    with pytest.raises(StructureError, match="NaN"):
        model.prepare(Atoms("Cu2", positions=[[0, 0, 0], [0, 0, np.nan]], cell=[3, 3, 3],
                            pbc=True))


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
def test_orb_takes_slabs_wires_and_molecules(small_orb, build):
    """Orb's own calculator refuses partial periodicity (it knows all axes or none). The
    structure in a vacuum cell made periodic along every axis (20 A between images across an
    open axis, more than the 6 A radius) has the partly periodic structure's graph: every
    layer of ours equals Orb's own calculator on it, for the structure as given (no cell
    vector along the open axes), in a vacuum cell and with open-axis vectors of 4 A; a
    molecule is also compared with Orb on itself (no cell, no periodicity). The 4 A cell
    made periodic everywhere is another graph (so the test can tell)."""
    from latentray.models import load_adapter

    model = load_adapter("orb", str(small_orb), options=OPTIONS)
    atoms = build()
    closed = _in_vacuum(atoms)
    closed.pbc = True
    theirs = orb_reference(small_orb, [closed])
    if not atoms.pbc.any():
        own = orb_reference(small_orb, [atoms])
        for name in theirs:
            np.testing.assert_allclose(own[name], theirs[name], atol=1e-5, err_msg=name)
    short = _short_open_vectors(atoms)
    for variant in (atoms, _in_vacuum(atoms), short):
        ours = model.forward([model.prepare(variant)], ["bb1", "bb2", "bb3"])
        for name in theirs:
            assert ours[name].shape == (len(atoms), 24)
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5,
                                       err_msg=name)
    everywhere = short.copy()
    everywhere.pbc = True
    wrong = model.forward([model.prepare(everywhere)], ["bb1"])["bb1"]
    assert np.abs(wrong - theirs["bb1"]).max() > 1e-2


@pytest.mark.slow
def test_latentray_run_with_orb_options(small_orb, tmp_path):
    import ray
    import yaml

    from latentray.cli import main

    config = tmp_path / "orb.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"),
        "datasets": [{"name": "mad", "path": "builtin:mad-val-1000", "limit": 8}],
        "models": [{"id": "orb-small", "family": "orb", "checkpoint": str(small_orb),
                    "layers": ["all"], "options": OPTIONS}],
        "extraction": {"shard_size": 4},
        "analyses": {"metrics": [], "order_metrics": [], "baselines": []}}))
    try:
        assert main(["run", str(config), "--quiet"]) == 0
    finally:
        ray.shutdown()
    assert_family_versions_recorded(tmp_path / "out")
    ours = layer_matrices(tmp_path / "out")
    theirs = orb_reference(small_orb, read(MAD, index=":8"))
    assert sorted(ours) == ["bb1", "bb2", "bb3"]
    for name, features in ours.items():
        np.testing.assert_allclose(features, theirs[name], rtol=1e-5, atol=1e-5)


def test_orb_takes_isolated_atoms_as_its_own_calculator(small_orb):
    """An atom with no neighbour within the cutoff, through Orb's own calculator: every layer of
    ours equals it, finite, for a single atom, an atom 15 A from a bonded pair in a periodic box
    and two atoms 12 A apart without a cell."""
    from test_periodicity import _isolated

    from latentray.models import load_adapter

    model = load_adapter("orb", str(small_orb), options=OPTIONS)
    for atoms in _isolated():
        theirs = orb_reference(small_orb, [atoms])
        ours = model.forward([model.prepare(atoms)], ["bb1", "bb2", "bb3"])
        for name in theirs:
            assert ours[name].shape == (len(atoms), 24) and np.isfinite(ours[name]).all()
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{atoms.get_chemical_formula()}, {name}")
