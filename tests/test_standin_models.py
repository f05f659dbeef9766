"""The small random-weight stand-ins of benchmarks/standin_models.py, on real MAD structures:
each is built into a temporary directory, loaded by path through latentray's adapter, and
compared with its family's own loader on the same file (``CHGNet.from_file`` and its
``predict_structure``; forward hooks on ``SevenNetCalculator(model=path)``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import (run_calculator, sevennet_hooked_calculator,  # noqa: E402
                     small_mad_structures)
from latentray.models import load_adapter  # noqa: E402
from latentray.models.base import file_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_standin_module():
    spec = importlib.util.spec_from_file_location(
        "standin_models", ROOT / "benchmarks" / "standin_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


standin = _load_standin_module()


@pytest.fixture(scope="module")
def structures():
    """Six small structures that both families can process (10 to 50 atoms)."""
    return small_mad_structures(6)


def _n_atoms(frames) -> int:
    return sum(len(a) for a in frames)


def _assert_not_degenerate(features: dict[str, np.ndarray]) -> None:
    """Random, not trained, but every channel varies across atoms and no two coincide."""
    for layer, values in features.items():
        assert np.isfinite(values).all(), layer
        assert values.std(axis=0).min() > 1e-2, layer
        assert np.linalg.matrix_rank(values.astype(np.float64), tol=1e-6) == values.shape[1]


def test_chgnet_standin_equals_its_own_api(tmp_path, structures):
    pytest.importorskip("chgnet")
    import torch
    from chgnet.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor

    path = standin.build_chgnet(tmp_path / "chgnet-small.pth.tar", seed=0)
    adapter = load_adapter("chgnet", str(path))
    args = standin.CHGNET_ARGS
    n_conv, width = args["n_conv"], args["atom_fea_dim"]

    # the adapter reports what the builder asked for
    info = adapter.info
    assert info.family == "chgnet" and info.checkpoint == str(path)
    assert info.checkpoint_file == str(path.resolve())
    assert info.checkpoint_sha256 == file_sha256(path)
    assert info.cutoff == args["atom_graph_cutoff"]
    assert info.layer_widths == {**{f"bb{k}": width for k in range(1, n_conv + 1)},
                                 "ll": args["mlp_hidden_dims"][-1]}
    assert info.supported_numbers == frozenset(range(1, 95))
    assert adapter.model.graph_converter.bond_graph_cutoff == args["bond_graph_cutoff"]

    graphs = [adapter.prepare(a) for a in structures]
    ours = adapter.forward(graphs, ["all"])  # one batch
    for layer, values in ours.items():
        assert values.shape == (_n_atoms(structures), info.layer_widths[layer]), layer
        assert values.dtype == np.float32
    _assert_not_degenerate(ours)

    # chgnet's own loader and predict_structure on the same file: its atom_fea (the
    # features before the last convolution) is bb{K-1}, and its site energies are the
    # readout MLP of bb{K} (ll: the input of its last Linear) plus the reference energies
    reference = CHGNet.from_file(str(path)).eval()
    assert len(reference.atom_conv_layers) == n_conv
    theirs = reference.predict_structure(
        [AseAtomsAdaptor.get_structure(a) for a in structures], task="e",
        return_atom_feas=True, return_site_energies=True)
    atom_fea = np.concatenate([p["atom_fea"] for p in theirs])
    np.testing.assert_allclose(ours[f"bb{n_conv - 1}"], atom_fea, atol=1e-5, rtol=0)
    assert np.abs(ours[f"bb{n_conv}"] - atom_fea).max() > 0.1  # a different layer
    site = np.concatenate([p["site_energies"] for p in theirs])
    shift = torch.cat(reference.composition_model.get_site_energies(graphs)).numpy()
    with torch.inference_mode():
        from_bb = reference.mlp(torch.from_numpy(ours[f"bb{n_conv}"])).numpy().ravel()
        from_ll = reference.mlp.layers[-1](torch.from_numpy(ours["ll"])).numpy().ravel()
    np.testing.assert_allclose(from_bb + shift, site, atol=1e-5)
    np.testing.assert_allclose(from_ll + shift, site, atol=1e-5)


def test_sevennet_standin_equals_hooks_on_its_calculator(tmp_path, structures):
    pytest.importorskip("sevenn")
    import sevenn._keys as KEY
    import sevenn.util as util
    import torch

    path = standin.build_sevennet(tmp_path / "sevennet-small.pth", seed=0)
    adapter = load_adapter("sevenn", str(path))
    args = standin.SEVENNET_ARGS
    n_blocks, channel = args["num_convolution_layer"], args["channel"]

    # sevenn's checkpoint format, as its trainer writes it
    cp = util.load_checkpoint(str(path))
    assert set(torch.load(path, map_location="cpu", weights_only=False)) == {
        "config", "model_state_dict", "epoch", "time", "hash"}
    assert cp.config[KEY.NUM_CONVOLUTION] == n_blocks and cp.config[KEY.LMAX] == args["lmax"]

    # the adapter reports what the builder asked for; the elements are 7net-0's
    info = adapter.info
    assert info.family == "sevenn" and info.checkpoint_file == str(path.resolve())
    assert info.checkpoint_sha256 == file_sha256(path)
    assert info.cutoff == args["cutoff"]
    assert info.layer_widths == {**{f"bb{k}": channel for k in range(1, n_blocks + 1)},
                                 "ll": channel // 2}
    packaged = util.load_checkpoint("7net-0").config[KEY.TYPE_MAP]
    assert info.supported_numbers == frozenset(packaged) and len(packaged) == 89
    gate = adapter.model._modules["0_equivariant_gate"].gate.irreps_out
    assert gate.lmax == args["lmax"]  # the first block carries l = 1 features

    ours = adapter.forward([adapter.prepare(a) for a in structures], ["all"])  # one batch
    _assert_not_degenerate(ours)

    # sevenn's own calculator on the same file, forward hooks on its unmodified model
    calc, records = sevennet_hooked_calculator(str(path))
    assert calc.cutoff == info.cutoff and frozenset(calc.type_map) == info.supported_numbers
    expected = run_calculator(calc, records, structures)
    assert sorted(ours) == sorted(expected) == [f"bb{k}" for k in range(1, n_blocks + 1)] + ["ll"]
    for layer in ours:
        assert ours[layer].shape == expected[layer].shape == (
            _n_atoms(structures), info.layer_widths[layer])
        np.testing.assert_allclose(ours[layer], expected[layer], atol=1e-5, rtol=1e-5,
                                   err_msg=layer)


def test_standins_are_deterministic_by_seed(tmp_path):
    pytest.importorskip("chgnet")
    pytest.importorskip("sevenn")
    import torch

    for build, name in ((standin.build_chgnet, "chgnet.pth.tar"),
                        (standin.build_sevennet, "sevennet.pth")):
        state_before = torch.random.get_rng_state()
        a = build(tmp_path / "a" / name, seed=0)
        assert torch.equal(torch.random.get_rng_state(), state_before)  # left untouched
        b = build(tmp_path / "b" / name, seed=0)
        c = build(tmp_path / "c" / name, seed=1)
        assert file_sha256(a) == file_sha256(b) != file_sha256(c)
