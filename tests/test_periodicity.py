"""Every periodicity a model's own code accepts: slabs (2D), wires (1D), molecules with and
without a cell (0D), against each family's own API (issue 18).

Structures from ``ase.build``: a Cu(111) slab (periodic along a and b), a (3, 3) carbon
nanotube (periodic along its axis), an ethanol molecule. Each is given as a user's file
would give it: with a vacuum cell, without a cell vector along its open axes (as ASE builds
them), and with open-axis vectors shorter than the cutoff.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import fcc111, molecule, nanotube
from ase.neighborlist import neighbor_list

from latentray.models.cells import cell_for_open_axes


def _slab():
    return fcc111("Cu", size=(2, 2, 3))  # pbc T T F, no cell vector along z


def _wire():
    return nanotube(3, 3, length=2, symbol="C")  # pbc F F T, no cell vectors along x, y


def _molecule():
    return molecule("CH3CH2OH")  # pbc F F F, no cell


def _in_vacuum(atoms, vacuum=10.0):
    """The same atoms with a cell vector of ``vacuum`` A beyond the atoms along every open
    axis (ASE's ``center``; the atoms move, their distances do not)."""
    boxed = atoms.copy()
    boxed.center(vacuum=vacuum, axis=tuple(np.flatnonzero(~boxed.pbc)))
    return boxed


def _short_open_vectors(atoms, length=4.0):
    """The vacuum cell with every open-axis vector cut to ``length`` A, less than any model's
    cutoff: were the axis periodic, an atom's own images would be its neighbours."""
    short = _in_vacuum(atoms)
    cell = short.cell[:].copy()
    for axis in np.flatnonzero(~short.pbc):
        cell[axis] *= length / np.linalg.norm(cell[axis])
    short.set_cell(cell, scale_atoms=False)
    return short


def _rotated(atoms, seed=0):
    """A rigid rotation of the atoms and their cell: the periodic vectors off the axes."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q *= np.sign(np.linalg.det(q))
    out = atoms.copy()
    out.positions = atoms.positions @ q.T
    out.set_cell(atoms.cell[:] @ q.T, scale_atoms=False)
    return out


def _pairs(atoms, cutoff):
    """Every neighbour pair within ``cutoff`` as (i, j, distance), sorted (ASE's list)."""
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    order = np.lexsort((np.round(d, 9), j, i))
    return i[order], j[order], d[order]


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
@pytest.mark.parametrize("rotate", [False, True])
def test_a_cell_for_open_axes_makes_no_neighbour_across_them(build, rotate):
    """The full-rank cell keeps the periodic vectors and the distances; with every axis
    made periodic, ASE's neighbour list of the result is the neighbour list of the
    structure with its own periodicity (no image across an open axis is a neighbour)."""
    atoms = _in_vacuum(build())
    if rotate:
        atoms = _rotated(atoms)
    cutoff = 6.0
    given = atoms.copy()
    if not given.pbc.all():  # drop the open axes' vectors, as ASE builds them
        cell = given.cell[:].copy()
        cell[~given.pbc] = 0.0
        given.set_cell(cell, scale_atoms=False)
    cell, positions = cell_for_open_axes(given.cell[:], given.positions, given.pbc, cutoff)
    np.testing.assert_array_equal(cell[given.pbc], given.cell[:][given.pbc])
    assert np.linalg.det(cell) > 0
    open_vectors, periodic = cell[~given.pbc], cell[given.pbc]
    np.testing.assert_allclose(open_vectors @ periodic.T, 0.0, atol=1e-9)
    gram = open_vectors @ open_vectors.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-9)
    diff = positions[:, None] - positions[None]
    np.testing.assert_allclose(np.linalg.norm(diff, axis=-1),
                               np.linalg.norm(atoms.positions[:, None] - atoms.positions[None],
                                              axis=-1), atol=1e-9)
    closed = atoms.copy()
    closed.set_cell(cell, scale_atoms=False)
    closed.positions = positions
    closed.pbc = True
    expected, got = _pairs(atoms, cutoff), _pairs(closed, cutoff)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, atol=1e-9)
    assert len(expected[0]) > 0


# -- CHGNet: pymatgen's neighbour list (CHGNet's own) knows partial periodicity -------------


@pytest.fixture(scope="module")
def chgnet():
    pytest.importorskip("chgnet")
    from latentray.models import load_adapter

    return load_adapter("chgnet", "0.3.0")


def _chgnet_own(atoms):
    """CHGNet 0.3.0's own ``predict_structure`` on pymatgen's reading of the structure
    (``AseAtomsAdaptor`` keeps ``pbc`` in the lattice): its ``atom_fea`` (our bb3) and its
    site energies."""
    from chgnet.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor

    model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    return model, model.predict_structure(
        AseAtomsAdaptor.get_structure(atoms), task="e",
        return_atom_feas=True, return_site_energies=True)


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
def test_chgnet_takes_slabs_wires_and_molecules_as_its_own_api(chgnet, build):
    """bb3 equals CHGNet's own atom_fea and ll gives its own site energies, on the structure
    in a vacuum cell; without the open axes' cell vectors and with open-axis vectors shorter
    than the cutoff every layer is the same (no image across an open axis); the same short
    cell made periodic everywhere is a different graph (so the test can tell)."""
    import torch

    atoms = build()
    boxed = _in_vacuum(atoms)
    model, theirs = _chgnet_own(boxed)
    ours = chgnet.forward([chgnet.prepare(boxed)], ["all"])
    assert all(v.shape[0] == len(atoms) and np.isfinite(v).all() for v in ours.values())
    np.testing.assert_allclose(ours["bb3"], theirs["atom_fea"], atol=1e-5, rtol=0)
    graph = chgnet.prepare(boxed)
    shift = torch.cat(model.composition_model.get_site_energies([graph])).numpy()
    with torch.inference_mode():
        from_ll = model.mlp.layers[-1](torch.from_numpy(ours["ll"])).numpy().ravel()
    np.testing.assert_allclose(from_ll + shift, theirs["site_energies"], atol=1e-5)

    short = _short_open_vectors(atoms)
    for variant in (atoms, short):  # the atoms moved: float32 coordinates round differently
        got = chgnet.forward([chgnet.prepare(variant)], ["all"])
        for layer, values in ours.items():
            np.testing.assert_allclose(got[layer], values, atol=1e-4, rtol=0, err_msg=layer)
    everywhere = short.copy()
    everywhere.pbc = True
    wrong = chgnet.forward([chgnet.prepare(everywhere)], ["bb3"])["bb3"]
    assert np.abs(wrong - ours["bb3"]).max() > 1e-2


# -- SevenNet: its own calculator builds the graph with ASE's neighbour list ----------------


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
def test_sevennet_takes_slabs_wires_and_molecules_as_its_own_calculator(build):
    """Every SevenNet-0 layer equals forward hooks on SevenNetCalculator on the same
    structure, as given (no cell vector along the open axes), in a vacuum cell and with
    open-axis vectors shorter than the cutoff; the short cell made periodic everywhere is a
    different graph."""
    pytest.importorskip("sevenn")
    from helpers import run_calculator, sevennet_hooked_calculator

    from latentray.models import load_adapter

    adapter = load_adapter("sevenn", "7net-0")
    calc, records = sevennet_hooked_calculator("7net-0")
    atoms = build()
    variants = [atoms, _in_vacuum(atoms), _short_open_vectors(atoms)]
    first = None
    for variant in variants:
        expected = run_calculator(calc, records, [variant])
        ours = adapter.forward([adapter.prepare(variant)], ["all"])
        assert sorted(ours) == sorted(expected)
        for layer, values in ours.items():
            assert values.shape[0] == len(atoms) and np.isfinite(values).all()
            np.testing.assert_allclose(values, expected[layer], atol=1e-5, rtol=1e-5,
                                       err_msg=layer)
            if first is not None:
                np.testing.assert_allclose(values, first[layer], atol=1e-5, err_msg=layer)
        first = first or ours
    everywhere = variants[-1].copy()
    everywhere.pbc = True
    wrong = adapter.forward([adapter.prepare(everywhere)], ["bb1"])["bb1"]
    assert np.abs(wrong - first["bb1"]).max() > 1e-2


# -- isolated atoms: as each model's own code takes them ------------------------------------


def _isolated():
    """A single atom (no cell), an atom 15 A from a bonded pair in a 30 A periodic box, and
    two atoms 12 A apart without a cell."""
    return [Atoms("Cu"),
            Atoms("Si2O", positions=[[1, 1, 1], [3.3, 1, 1], [16, 16, 1]], cell=np.eye(3) * 30,
                  pbc=True),
            Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 12]])]


def test_sevennet_takes_isolated_atoms_as_its_own_calculator():
    """SevenNet's calculator gives an atom with no neighbour within the cutoff its
    element's features (no message reaches it): every layer equals it, finite, for a single
    atom, an isolated atom beside a bonded pair and two far-apart atoms."""
    pytest.importorskip("sevenn")
    from helpers import run_calculator, sevennet_hooked_calculator

    from latentray.models import load_adapter

    adapter = load_adapter("sevenn", "7net-0")
    calc, records = sevennet_hooked_calculator("7net-0")
    for atoms in _isolated():
        expected = run_calculator(calc, records, [atoms])
        ours = adapter.forward([adapter.prepare(atoms)], ["all"])
        for layer, values in ours.items():
            assert values.shape[0] == len(atoms) and np.isfinite(values).all()
            np.testing.assert_allclose(values, expected[layer], atol=1e-5, rtol=1e-5,
                                       err_msg=layer)


def test_chgnet_refuses_isolated_atoms_as_its_own_graph_converter(chgnet):
    """CHGNet's own graph converter refuses a structure with an atom that has no neighbour
    within the cutoff ("CHGNet calculation will likely go wrong"): latentray gives the same
    structures a StructureError that says so (a row in failures/)."""
    from chgnet.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor

    from latentray.models import StructureError

    model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    for atoms in _isolated():
        boxed = _in_vacuum(atoms) if not atoms.pbc.any() else atoms
        with pytest.raises(ValueError, match="isolated atom"):
            model.predict_structure(AseAtomsAdaptor.get_structure(boxed), task="e")
        with pytest.raises(StructureError, match="no neighbour within the cutoff"):
            chgnet.prepare(atoms)


# -- a mixed dataset through `latentray run` -------------------------------------------------


def test_a_mixed_dataset_of_bulk_slabs_wires_and_molecules_runs_without_failure(tmp_path):
    """CHGNet 0.3.0 and SevenNet-0 over bulk MAD structures, slabs, a wire and molecules (with
    and without a cell, as ASE writes them to extxyz): every structure reaches both models'
    latents, one row per atom, and nothing is in failures/."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("chgnet")
    pytest.importorskip("sevenn")
    import pyarrow.dataset as ds
    from ase.io import read, write

    from latentray.config import parse_config
    from latentray.datasets import resolve_paths
    from latentray.job import run

    bulk = [a for a in read(resolve_paths("builtin:mad-val-1000")[0], index="280:300")
            if not {84, 86}.intersection(a.numbers.tolist())]  # Po, Rn: not in SevenNet-0
    others = {"slab": _slab(), "slab-vacuum": _in_vacuum(_slab()), "wire": _wire(),
              "wire-vacuum": _in_vacuum(_wire()), "molecule": _molecule(),
              "molecule-box": _in_vacuum(_molecule()), "water": molecule("H2O")}
    frames = []
    for i, atoms in enumerate(bulk):
        atoms.info = {"id": f"bulk-{i}", "subset": "bulk"}
        frames.append(atoms)
    for name, atoms in others.items():
        atoms.info = {"id": name, "subset": name.split("-")[0]}
        frames.append(atoms)
    write(tmp_path / "mixed.xyz", frames, format="extxyz")
    config = parse_config({
        "output": str(tmp_path / "out"),
        "datasets": [{"name": "mixed", "path": str(tmp_path / "mixed.xyz"), "format": "extxyz",
                      "subset_key": "subset"}],
        "models": [{"id": "chgnet-0.3.0", "family": "chgnet", "checkpoint": "0.3.0",
                    "layers": ["bb"]},
                   {"id": "sevennet-0", "family": "sevenn", "checkpoint": "7net-0",
                    "layers": ["bb"]}],
        "extraction": {"shard_size": 10},
        "analyses": {"n_test": 8, "metrics": ["gfre"], "order_metrics": [],
                     "layer_metrics": [], "baselines": []},
    }, source="test")
    try:
        run(config, quiet=True)
    finally:
        ray.shutdown()
    out = tmp_path / "out"
    failures = ds.dataset(out / "failures", format="parquet", partitioning="hive").to_table()
    assert failures.num_rows == 0, failures.to_pandas()[["model", "structure_id", "reason"]]
    latents = ds.dataset(out / "latents", format="parquet", partitioning="hive").to_table(
        columns=["model", "structure_id"]).to_pandas()
    atoms_of = {f"mixed:{a.info['id']}": len(a) for a in frames}
    for model in ("chgnet-0.3.0", "sevennet-0"):
        counts = latents[latents.model == model].groupby("structure_id").size()
        assert counts.to_dict() == atoms_of, model
