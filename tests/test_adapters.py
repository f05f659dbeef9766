"""CHGNet and SevenNet adapters against the models' own public APIs, on real structures."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

from latentray.datasets import resolve_paths
from latentray.models import StructureError, load_adapter

pytest.importorskip("torch")

MAD = str(resolve_paths("builtin:mad-val-1000")[0])


@pytest.fixture(scope="module")
def structures():
    frames = read(MAD, index=":10")
    assert [len(a) for a in frames] == [44, 10, 8, 34, 42, 20, 24, 184, 50, 60]
    return frames


@pytest.fixture(scope="module")
def chgnet():
    pytest.importorskip("chgnet")
    return load_adapter("chgnet", "0.3.0")


@pytest.fixture(scope="module")
def sevennet():
    pytest.importorskip("sevenn")
    return load_adapter("sevenn", "7net-0")


def test_chgnet_layer_before_last_conv_equals_predict_structure(chgnet, structures):
    from pymatgen.io.ase import AseAtomsAdaptor

    ours = chgnet.forward([chgnet.prepare(a) for a in structures], ["bb3"])["bb3"]
    theirs = chgnet.model.predict_structure(
        [AseAtomsAdaptor.get_structure(a) for a in structures], task="e",
        return_atom_feas=True, batch_size=4)
    expected = np.concatenate([p["atom_fea"] for p in theirs])
    assert ours.shape == (sum(len(a) for a in structures), 64)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # and it is not what the other layers hold
    bb4 = chgnet.forward([chgnet.prepare(a) for a in structures], ["bb4"])["bb4"]
    assert np.abs(bb4 - expected).max() > 0.1


def test_chgnet_info_matches_its_arrays(chgnet, structures):
    info = chgnet.info
    assert list(info.layer_widths) == ["bb1", "bb2", "bb3", "bb4", "ll"]
    out = chgnet.forward([chgnet.prepare(a) for a in structures[:3]], ["all"])
    for layer, width in info.layer_widths.items():
        assert out[layer].shape == (sum(len(a) for a in structures[:3]), width)
        assert out[layer].dtype == np.float32 and np.isfinite(out[layer]).all()
    assert len(info.checkpoint_sha256) == 64 and info.checkpoint_file.endswith(".pth.tar")
    assert info.cutoff == 6.0  # CHGNet's atom graph cutoff (its bond graph uses 3 A)


def _hooked_sevennet_calculator(name, modal=None):
    """The unmodified model, through sevenn's own ASE calculator, with forward hooks."""
    from e3nn.o3 import Irreps
    from sevenn.calculator import SevenNetCalculator

    calc = SevenNetCalculator(name, device="cpu", modal=modal)
    records = {}
    for key, module in calc.model._modules.items():
        if key.endswith("_equivariant_gate"):
            k = int(key.split("_")[0]) + 1
            # scalars of the gate's output, located independently of the adapter
            irreps = Irreps(str(calc.model._modules[f"{k - 1}_equivariant_gate"].gate.irreps_out))
            n_scalars = sum(mul for mul, ir in irreps if ir.l == 0)
            module.register_forward_hook(
                lambda m, i, o, k=k, n=n_scalars: records.__setitem__(f"bb{k}", o["x"][:, :n]
                                                                      .detach().clone()))
        if key == "reduce_hidden_to_energy":
            module.register_forward_pre_hook(
                lambda m, i: records.__setitem__("ll", i[0]["x"].detach().clone()))
    return calc, records


def test_sevennet_latents_equal_forward_hooks_on_the_unmodified_model(sevennet, structures):
    calc, records = _hooked_sevennet_calculator("7net-0")
    expected = {}
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
        for layer, value in records.items():
            expected.setdefault(layer, []).append(value.numpy())
    ours = sevennet.forward([sevennet.prepare(a) for a in structures], ["all"])
    assert sorted(ours) == sorted(expected) == ["bb1", "bb2", "bb3", "bb4", "bb5", "ll"]
    for layer in ours:
        ref = np.concatenate(expected[layer])
        assert ours[layer].shape == ref.shape
        scale = np.abs(ref).max()
        np.testing.assert_allclose(ours[layer], ref, atol=1e-5 * max(scale, 1.0), rtol=0,
                                   err_msg=layer)
    assert ours["bb5"].shape[1] == 128 and ours["ll"].shape[1] == 64


def test_sevennet_mf_modalities(structures):
    pytest.importorskip("sevenn")
    with pytest.raises(ValueError, match="PBE") as info:
        load_adapter("sevenn", "7net-mf-0")
    assert "R2SCAN" in str(info.value)
    with pytest.raises(ValueError, match="unknown modality"):
        load_adapter("sevenn", "7net-mf-0", modality="HSE")
    pbe = load_adapter("sevenn", "7net-mf-0", modality="PBE")
    r2scan = load_adapter("sevenn", "7net-mf-0", modality="R2SCAN")
    a = pbe.forward([pbe.prepare(s) for s in structures[:3]], ["ll"])["ll"]
    b = r2scan.forward([r2scan.prepare(s) for s in structures[:3]], ["ll"])["ll"]
    assert a.shape == b.shape and np.abs(a - b).max() > 1e-3
    calc, records = _hooked_sevennet_calculator("7net-mf-0", modal="R2SCAN")
    atoms = structures[0].copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    np.testing.assert_allclose(b[: len(atoms)], records["ll"].numpy(), atol=1e-5)


def test_unsupported_element_fails_prepare_with_its_name(sevennet, chgnet):
    po = Atoms("PoO", positions=[[0, 0, 0], [1.9, 0, 0]], cell=np.eye(3) * 6, pbc=True)
    with pytest.raises(StructureError, match="Po"):
        sevennet.prepare(po)
    assert len(chgnet.forward([chgnet.prepare(po)], ["bb1"])["bb1"]) == 2  # CHGNet knows Po


@pytest.mark.parametrize("family", ["chgnet", "sevenn"])
def test_bad_structures_raise_structure_error(family, chgnet, sevennet):
    adapter = {"chgnet": chgnet, "sevenn": sevennet}[family]
    isolated = Atoms("NaCl", positions=[[0, 0, 0], [9, 9, 9]], cell=np.eye(3) * 20, pbc=True)
    with pytest.raises(StructureError, match="no neighbour"):
        adapter.prepare(isolated)
    nan = Atoms("NaCl", positions=[[0, 0, 0], [np.nan, 1, 1]], cell=np.eye(3) * 5, pbc=True)
    with pytest.raises(StructureError, match="NaN"):
        adapter.prepare(nan)
    flat = Atoms("NaCl", positions=[[0, 0, 0], [1, 1, 0]],
                 cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(StructureError, match="zero-volume"):
        adapter.prepare(flat)


@pytest.mark.slow
@pytest.mark.parametrize("family, checkpoint, modality, widths", [
    ("chgnet", "0.2.0", None, {"bb1": 64, "bb2": 64, "bb3": 64, "bb4": 64, "ll": 64}),
    ("chgnet", "r2scan", None, {"bb1": 64, "bb2": 64, "bb3": 64, "bb4": 64, "ll": 64}),
    ("sevenn", "7net-0_22may2024", None, {**{f"bb{k}": 128 for k in range(1, 6)}, "ll": 64}),
    ("sevenn", "7net-l3i5", None, {**{f"bb{k}": 128 for k in range(1, 6)}, "ll": 64}),
])
def test_every_packaged_checkpoint_runs(family, checkpoint, modality, widths, structures):
    pytest.importorskip(family)
    adapter = load_adapter(family, checkpoint, modality=modality)
    assert adapter.info.layer_widths == widths
    out = adapter.forward([adapter.prepare(a) for a in structures[:3]], ["all"])
    for layer, width in widths.items():
        assert out[layer].shape == (sum(len(a) for a in structures[:3]), width)
        assert np.isfinite(out[layer]).all()
