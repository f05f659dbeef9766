"""CHGNet and SevenNet adapters (latentray.models.chgnet / .sevenn) on real MAD structures.

Reference values come from each family's own public code paths on the unmodified models:
CHGNet's ``predict_structure(..., return_atom_feas=True)`` and forward hooks on SevenNet's
model run by ``sevenn.calculator.SevenNetCalculator``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

pytest.importorskip("torch")

from helpers import (MAD, SEVENN_UNSUPPORTED, run_calculator,  # noqa: E402
                     sevennet_hooked_calculator, small_mad_structures)
from latentray.models import StructureError, load_adapter  # noqa: E402
from latentray.models.base import file_sha256  # noqa: E402


@pytest.fixture(scope="module")
def structures():
    """Six small structures that every packaged model can process (10 to 50 atoms)."""
    return small_mad_structures(6)


@pytest.fixture(scope="module")
def chgnet():
    pytest.importorskip("chgnet")
    return load_adapter("chgnet", "0.3.0")


@pytest.fixture(scope="module")
def sevennet():
    pytest.importorskip("sevenn")
    return load_adapter("sevenn", "7net-0")


def _n_atoms(frames) -> int:
    return sum(len(a) for a in frames)


# -- CHGNet ---------------------------------------------------------------------------


def test_chgnet_graphs_equal_its_own_converter(chgnet):
    """The vectorised graph (latentray.models.chgnet_graph) equals CHGNet's converter element
    for element: 300 MAD structures (the 1- to 4-atom cells among them, whose atoms see their
    own periodic images, and those with no angle at all) and rattled supercells."""
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = read(MAD, index=":")
    chosen = frames[:200] + [a for a in frames[200:] if len(a) <= 4]
    rng = np.random.default_rng(0)
    for atoms in frames[200:210]:
        big = atoms.repeat((2, 2, 1))
        big.positions += rng.normal(0, 0.05, big.positions.shape)
        chosen.append(big)
    names = ("atom_graph", "directed2undirected", "undirected2directed", "bond_graph")
    compared = no_angle = 0
    for atoms in chosen:
        try:
            theirs = chgnet.model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
        except ValueError:  # an isolated atom: refused by both (checked elsewhere)
            continue
        ours = chgnet.prepare(atoms)
        for name in names:
            expected, got = getattr(theirs, name), getattr(ours, name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch_equal(got, expected), name
        for name in ("atomic_number", "atom_frac_coord", "lattice", "neighbor_image"):
            assert torch_equal(getattr(ours, name), getattr(theirs, name)), name
        compared += 1
        no_angle += len(theirs.bond_graph) == 0
    assert compared >= 280 and no_angle >= 1


def torch_equal(a, b) -> bool:
    return bool((a.detach() == b.detach()).all()) and a.dtype == b.dtype


def test_chgnet_bb3_equals_its_own_atom_fea(chgnet, structures):
    """bb3 (after the 3rd of 4 convolutions) is what CHGNet itself calls atom_fea."""
    from chgnet.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor

    reference_model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    theirs = reference_model.predict_structure(
        [AseAtomsAdaptor.get_structure(a) for a in structures], return_atom_feas=True)
    expected = np.concatenate([p["atom_fea"] for p in theirs])
    ours = chgnet.forward([chgnet.prepare(a) for a in structures], ["bb3"])  # one batch
    assert ours["bb3"].shape == (_n_atoms(structures), 64)
    np.testing.assert_allclose(ours["bb3"], expected, atol=1e-5, rtol=0)
    # the neighbouring layers are different things
    other = chgnet.forward([chgnet.prepare(a) for a in structures], ["bb2", "bb4"])
    assert np.abs(other["bb2"] - expected).max() > 0.1
    assert np.abs(other["bb4"] - expected).max() > 0.1


def test_chgnet_bb4_and_ll_feed_its_readout(chgnet, structures):
    """bb4 is the readout MLP's input and ll its last Linear's input: both give CHGNet's
    own site energies (minus the elemental reference energies)."""
    import torch
    from pymatgen.io.ase import AseAtomsAdaptor

    graphs = [chgnet.prepare(a) for a in structures]
    out = chgnet.forward(graphs, ["bb4", "ll"])
    model = chgnet.model
    theirs = model.predict_structure([AseAtomsAdaptor.get_structure(a) for a in structures],
                                     task="e", return_site_energies=True)
    site = np.concatenate([p["site_energies"] for p in theirs])
    shift = torch.cat(model.composition_model.get_site_energies(graphs)).numpy()
    last_linear = model.mlp.layers[-1]
    with torch.inference_mode():
        from_ll = last_linear(torch.from_numpy(out["ll"])).numpy().ravel()
        from_bb4 = model.mlp(torch.from_numpy(out["bb4"])).numpy().ravel()
    np.testing.assert_allclose(from_ll + shift, site, atol=1e-5)
    np.testing.assert_allclose(from_bb4 + shift, site, atol=1e-5)


@lru_cache(maxsize=None)
def chgnet_own(name: str):
    """CHGNet's own model of a packaged checkpoint, loaded by chgnet's API."""
    from chgnet.model import CHGNet

    return CHGNet.load(model_name=name, use_device="cpu", verbose=False)


def test_chgnet_info_matches_its_arrays(chgnet, structures):
    info = chgnet.info
    assert info.family == "chgnet" and info.checkpoint == "0.3.0"
    assert list(info.layer_widths) == ["bb1", "bb2", "bb3", "bb4", "ll"]
    assert set(info.layer_widths.values()) == {64}
    assert info.cutoff == chgnet_own("0.3.0").graph_converter.atom_graph_cutoff
    assert info.supported_numbers == frozenset(
        range(1, chgnet_own("0.3.0").atom_embedding.embedding.num_embeddings + 1))
    assert Path(info.checkpoint_file).is_file() and info.checkpoint_file.endswith(".pth.tar")
    assert info.checkpoint_sha256 == file_sha256(info.checkpoint_file)
    assert chgnet.info.checkpoint_sha256 is info.checkpoint_sha256  # computed once
    out = chgnet.forward([chgnet.prepare(a) for a in structures[:3]], ["all"])
    assert list(out) == list(info.layer_widths)
    for layer, width in info.layer_widths.items():
        assert out[layer].shape == (_n_atoms(structures[:3]), width)
        assert out[layer].dtype == np.float32 and np.isfinite(out[layer]).all()


def test_chgnet_truncated_pass_and_aliases(chgnet, structures):
    graphs = [chgnet.prepare(a) for a in structures[:3]]
    full = chgnet.forward(graphs, ["all"])
    early = chgnet.forward(graphs, ["bb1"])  # stops after the first convolution
    assert list(early) == ["bb1"]
    np.testing.assert_array_equal(early["bb1"], full["bb1"])
    alias = chgnet.forward(graphs, ["bb"])
    np.testing.assert_array_equal(alias["bb"], full["bb4"])
    with pytest.raises(ValueError, match="unknown layer"):
        chgnet.forward(graphs, ["bb9"])
    empty = chgnet.forward([], ["bb1", "ll"])
    assert empty["bb1"].shape == (0, 64) and empty["ll"].shape == (0, 64)


def test_chgnet_one_at_a_time_equals_batched(chgnet, structures):
    graphs = [chgnet.prepare(a) for a in structures]
    batched = chgnet.forward(graphs, ["all"])
    one_by_one = [chgnet.forward([g], ["all"]) for g in graphs]
    for layer in batched:
        single = np.concatenate([out[layer] for out in one_by_one])
        np.testing.assert_allclose(batched[layer], single, atol=1e-5, rtol=0, err_msg=layer)


# -- SevenNet -------------------------------------------------------------------------


def test_sevennet_equals_hooks_on_its_calculator(sevennet, structures):
    calc, records = sevennet_hooked_calculator("7net-0")
    expected = run_calculator(calc, records, structures)
    ours = sevennet.forward([sevennet.prepare(a) for a in structures], ["all"])
    assert sorted(ours) == sorted(expected) == ["bb1", "bb2", "bb3", "bb4", "bb5", "ll"]
    for layer in ours:
        assert ours[layer].shape == expected[layer].shape
        np.testing.assert_allclose(ours[layer], expected[layer], atol=1e-5, rtol=1e-5,
                                   err_msg=layer)
    # batched vs one structure at a time
    one_by_one = [sevennet.forward([sevennet.prepare(a)], ["all"]) for a in structures]
    single = {layer: np.concatenate([out[layer] for out in one_by_one]) for layer in ours}
    for layer in ours:
        np.testing.assert_allclose(ours[layer], single[layer], atol=1e-5, rtol=1e-5,
                                   err_msg=layer)


def test_sevennet_info_matches_its_arrays(sevennet, structures):
    info = sevennet.info
    calc, _ = sevennet_hooked_calculator("7net-0")
    assert info.family == "sevenn" and info.cutoff == calc.cutoff
    assert info.layer_widths == {"bb1": 128, "bb2": 128, "bb3": 128, "bb4": 128, "bb5": 128,
                                 "ll": 64}
    assert Path(info.checkpoint_file).name == "checkpoint_sevennet_0.pth"
    assert info.checkpoint_sha256 == file_sha256(info.checkpoint_file)
    assert info.supported_numbers == frozenset(calc.type_map)
    # the elements the structures fixture leaves out: those below the largest without a type
    assert SEVENN_UNSUPPORTED == set(range(1, max(calc.type_map) + 1)) - set(calc.type_map)
    out = sevennet.forward([sevennet.prepare(a) for a in structures[:3]], ["all"])
    for layer, width in info.layer_widths.items():
        assert out[layer].shape == (_n_atoms(structures[:3]), width)
        assert out[layer].dtype == np.float32 and np.isfinite(out[layer]).all()
    early = sevennet.forward([sevennet.prepare(a) for a in structures[:3]], ["bb2"])
    np.testing.assert_array_equal(early["bb2"], out["bb2"])


def test_sevennet_scalar_channels_come_from_the_irreps():
    from e3nn.o3 import Irreps

    from latentray.models.sevenn import scalar_channels

    assert scalar_channels(Irreps("128x0e+64x1e+32x2e")) == slice(0, 128)
    assert scalar_channels(Irreps("128x0e")) == slice(0, 128)
    assert scalar_channels(Irreps("8x0e+4x1o+2x0e")) == list(range(8)) + [20, 21]
    assert scalar_channels(Irreps("4x0o+3x0e")) == slice(4, 7)  # pseudo-scalars left out


def test_sevennet_mf_modalities(structures):
    pytest.importorskip("sevenn")
    with pytest.raises(ValueError, match="modality") as missing:
        load_adapter("sevenn", "7net-mf-0")
    assert "PBE" in str(missing.value) and "R2SCAN" in str(missing.value)
    with pytest.raises(ValueError, match="unknown modality 'HSE'") as unknown:
        load_adapter("sevenn", "7net-mf-0", modality="HSE")
    assert "PBE" in str(unknown.value) and "R2SCAN" in str(unknown.value)
    with pytest.raises(ValueError, match="no modalities"):
        load_adapter("sevenn", "7net-0", modality="PBE")
    with pytest.raises(ValueError, match="no modalities"):
        load_adapter("chgnet", "0.3.0", modality="PBE")

    frames = structures[:3]
    pbe = load_adapter("sevenn", "7net-mf-0", modality="PBE")
    r2scan = load_adapter("sevenn", "7net-mf-0", modality="R2SCAN")
    a = pbe.forward([pbe.prepare(s) for s in frames], ["bb1", "ll"])
    b = r2scan.forward([r2scan.prepare(s) for s in frames], ["bb1", "ll"])
    assert a["ll"].shape == b["ll"].shape == (_n_atoms(frames), 64)
    assert np.abs(a["ll"] - b["ll"]).max() > 1e-3
    assert np.abs(a["bb1"] - b["bb1"]).max() > 1e-4  # the modality enters every block
    # and each equals sevenn's own calculator with that modality
    calc, records = sevennet_hooked_calculator("7net-mf-0", modal="R2SCAN")
    expected = run_calculator(calc, records, frames)
    np.testing.assert_allclose(b["ll"], expected["ll"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(b["bb1"], expected["bb1"], atol=1e-5, rtol=1e-5)


# -- both families --------------------------------------------------------------------


def test_unsupported_element_fails_prepare_with_its_name(sevennet, chgnet):
    po = Atoms("PoO", positions=[[0, 0, 0], [1.9, 0, 0]], cell=np.eye(3) * 6, pbc=True)
    with pytest.raises(StructureError, match="Po"):
        sevennet.prepare(po)
    assert chgnet.forward([chgnet.prepare(po)], ["bb1"])["bb1"].shape == (2, 64)


@pytest.mark.parametrize("family", ["chgnet", "sevenn"])
def test_bad_structures_raise_structure_error(family, chgnet, sevennet, structures):
    adapter = {"chgnet": chgnet, "sevenn": sevennet}[family]
    # an O atom 15 A from a bonded Si pair, in a 30 A periodic box
    isolated = Atoms("Si2O", positions=[[1, 1, 1], [3.3, 1, 1], [16, 16, 1]],
                     cell=np.eye(3) * 30, pbc=True)
    if family == "chgnet":  # as CHGNet's own graph converter (SevenNet takes it: see
        with pytest.raises(StructureError, match="no neighbour"):  # test_periodicity)
            adapter.prepare(isolated)
    nan = structures[0].copy()
    nan.positions[3, 1] = np.nan
    with pytest.raises(StructureError, match="NaN"):
        adapter.prepare(nan)
    flat = Atoms("NaCl", positions=[[0, 0, 0], [1, 1, 0]],
                 cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(StructureError, match="zero volume"):
        adapter.prepare(flat)
    with pytest.raises(StructureError, match="no atoms"):
        adapter.prepare(Atoms(cell=np.eye(3) * 5, pbc=True))
    # the bad ones never reach the batch; the good ones still run together
    prepared = []
    for atoms in [structures[0], isolated, nan, structures[1], flat]:
        try:
            prepared.append(adapter.prepare(atoms))
        except StructureError:
            pass
    out = adapter.forward(prepared, ["bb1"])
    assert out["bb1"].shape[0] == _n_atoms(structures[:2]) + (3 if family == "sevenn" else 0)


@pytest.mark.parametrize("family", ["chgnet", "sevenn"])
def test_molecule_without_cell(family, chgnet, sevennet):
    adapter = {"chgnet": chgnet, "sevenn": sevennet}[family]
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], pbc=False)
    out = adapter.forward([adapter.prepare(water)], ["all"])
    assert all(v.shape[0] == 3 and np.isfinite(v).all() for v in out.values())
    shifted = water.copy()
    shifted.positions += [40.0, -3.0, 7.0]  # translation invariance
    again = adapter.forward([adapter.prepare(shifted)], ["all"])
    for layer in out:
        np.testing.assert_allclose(again[layer], out[layer], atol=1e-4, err_msg=layer)


@pytest.mark.parametrize("family, checkpoint", [("chgnet", "0.3.0"), ("sevenn", "7net-0")])
def test_float64(family, checkpoint, chgnet, sevennet, structures):
    single = {"chgnet": chgnet, "sevenn": sevennet}[family]
    double = load_adapter(family, checkpoint, dtype="float64")
    frames = structures[:3]
    a = single.forward([single.prepare(s) for s in frames], ["all"])
    b = double.forward([double.prepare(s) for s in frames], ["all"])
    # the whole network runs in float64 (CHGNet's elemental reference energies stay float32)
    assert {p.dtype.itemsize for name, p in double.model.named_parameters()
            if not name.startswith("composition_model")} == {8}
    for layer in a:
        assert b[layer].dtype == np.float64 and a[layer].dtype == np.float32
        scale = max(1.0, float(np.abs(b[layer]).max()))
        np.testing.assert_allclose(a[layer], b[layer], atol=1e-4 * scale, rtol=0, err_msg=layer)


def test_unknown_checkpoints_are_refused_without_download():
    pytest.importorskip("sevenn")
    with pytest.raises(ValueError, match="packaged"):
        load_adapter("sevenn", "7net-omat")
    with pytest.raises(ValueError, match="packaged"):
        load_adapter("chgnet", "0.1.0")


def test_chgnet_checkpoint_by_path_equals_by_name(structures):
    """A file path loads like the packaged name, 0.2.0 included (its mlp_out biases)."""
    by_name = load_adapter("chgnet", "0.2.0")
    by_path = load_adapter("chgnet", by_name.info.checkpoint_file)
    assert by_path.info.checkpoint_sha256 == by_name.info.checkpoint_sha256
    assert by_path.info.cutoff == by_name.info.cutoff == \
        chgnet_own("0.2.0").graph_converter.atom_graph_cutoff
    frames = structures[:2]
    a = by_name.forward([by_name.prepare(s) for s in frames], ["all"])
    b = by_path.forward([by_path.prepare(s) for s in frames], ["all"])
    for layer in a:
        np.testing.assert_array_equal(a[layer], b[layer], err_msg=layer)


PACKAGED = [
    ("chgnet", "0.3.0", None),
    ("chgnet", "0.2.0", None),
    ("chgnet", "r2scan", None),
    ("sevenn", "7net-0", None),
    ("sevenn", "7net-0_22may2024", None),
    ("sevenn", "7net-l3i5", None),
    ("sevenn", "7net-mf-0", "PBE"),
    ("sevenn", "7net-mf-0", "R2SCAN"),
]


@pytest.mark.parametrize("family, checkpoint, modality", PACKAGED)
def test_every_packaged_checkpoint_equals_its_own_api(family, checkpoint, modality,
                                                      structures):
    """Each packaged checkpoint's latents against its model's own API, with the layer
    count and widths read from the loaded model: CHGNet's bb1 .. bb{K-1} equal forward hooks
    on its blocks during ``predict_structure``, whose ``atom_fea`` is bb{K-1}; every SevenNet
    layer equals forward hooks on ``SevenNetCalculator`` (with the modality)."""
    pytest.importorskip(family)
    adapter = load_adapter(family, checkpoint, modality=modality)
    info = adapter.info
    assert Path(info.checkpoint_file).is_file() and len(info.checkpoint_sha256) == 64
    frames = structures[:3]
    out = adapter.forward([adapter.prepare(a) for a in frames], ["all"])
    if family == "chgnet":
        from chgnet.model import CHGNet
        from pymatgen.io.ase import AseAtomsAdaptor

        reference = CHGNet.load(model_name=checkpoint, use_device="cpu", verbose=False)
        n_conv, width = len(reference.atom_conv_layers), int(reference.atom_fea_dim)
        # and every earlier block's output, by forward hooks on CHGNet's own modules while
        # its own predict_structure runs (bbK: after atom_conv_layers[K-1])
        seen: dict[str, list] = {}
        hooks = [conv.register_forward_hook(
                     lambda m, a, o, k=k: seen.setdefault(f"bb{k}", []).append(
                         o.detach().numpy().copy()))
                 for k, conv in enumerate(reference.atom_conv_layers[:-1], start=1)]
        try:
            theirs = reference.predict_structure(
                [AseAtomsAdaptor.get_structure(a) for a in frames], return_atom_feas=True)
        finally:
            for hook in hooks:
                hook.remove()
        expected = {layer: np.concatenate(v) for layer, v in seen.items()}
        np.testing.assert_array_equal(expected[f"bb{n_conv - 1}"],
                                      np.concatenate([p["atom_fea"] for p in theirs]))
        assert list(out) == [f"bb{k}" for k in range(1, n_conv + 1)] + ["ll"]
        assert all(out[f"bb{k}"].shape[1] == width for k in range(1, n_conv + 1))
        # the cutoff and the elements, as the model holds them (an embedding row per Z)
        assert info.cutoff == reference.graph_converter.atom_graph_cutoff
        assert info.supported_numbers == frozenset(
            range(1, reference.atom_embedding.embedding.num_embeddings + 1))
    else:  # the calculator runs one structure at a time: so do we, for float32's sake
        calc, records = sevennet_hooked_calculator(checkpoint, modal=modality)
        # the cutoff and the elements, as the checkpoint's own calculator reads them
        assert info.cutoff == calc.cutoff
        assert info.supported_numbers == frozenset(calc.type_map)
        expected = run_calculator(calc, records, frames)
        assert list(out) == sorted(expected, key=lambda k: (k == "ll", k))
        single = [adapter.forward([adapter.prepare(a)], ["all"]) for a in frames]
        out = {layer: np.concatenate([o[layer] for o in single]) for layer in out}
    assert info.layer_widths == {layer: values.shape[1] for layer, values in out.items()}
    for layer, values in out.items():
        assert values.shape[0] == _n_atoms(frames)
        assert values.dtype == np.float32 and np.isfinite(values).all()
    for layer, values in expected.items():
        assert out[layer].shape == values.shape
        np.testing.assert_allclose(out[layer], values, atol=1e-5, rtol=1e-5, err_msg=layer)


# -- a third-party family, found through the entry point alone -------------------------------

PLUGIN = Path(__file__).parent / "plugin"


def test_a_third_party_family_is_found_through_its_entry_point(monkeypatch, tmp_path):
    from latentray.models import available_families, load_adapter

    assert "toy-radial" not in available_families()
    monkeypatch.syspath_prepend(str(PLUGIN))  # as if `pip install latentray-toy`
    assert available_families()["toy-radial"] == "latentray_toy:RadialAdapter"
    checkpoint = tmp_path / "radial.json"
    checkpoint.write_text(json.dumps({"cutoff": 4.0, "centres": [1, 2, 3], "width": 0.5}))
    model = load_adapter("toy-radial", str(checkpoint))
    frames = read(MAD, index=":3")
    out = model.forward([model.prepare(a) for a in frames], ["bb1", "bb2"])
    assert out["bb1"].shape == (sum(len(a) for a in frames), 3)
    # atom 0 of the first structure, by hand: Gaussians of its neighbour distances
    from ase.neighborlist import neighbor_list

    i, d = neighbor_list("id", frames[0], 4.0)
    expected = np.exp(-((d[i == 0, None] - [1, 2, 3]) ** 2) / 0.5).sum(0)
    np.testing.assert_allclose(out["bb1"][0], expected, rtol=1e-6)
    assert model.info.layer_widths == {"bb1": 3, "bb2": 3} and len(model.info.checkpoint_sha256) == 64
