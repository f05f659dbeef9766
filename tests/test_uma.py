"""UMA (fairchem-core): a small model of UMA's layout (a HydraModel with an eSCN-MD mixture-of-
linear-experts backbone and a dataset-specific MLP energy head) built with fairchem's own
constructors (random weights, no download), saved as a fairchem inference checkpoint, loaded by
latentray, against fairchem's own FAIRChemCalculator."""

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

torch = pytest.importorskip("torch")
pytest.importorskip("fairchem.core")

from latentray.models import StructureError, load_adapter  # noqa: E402
from test_periodicity import (  # noqa: E402
    _in_vacuum, _molecule, _short_open_vectors, _slab, _wire)

MAD = Path(__file__).resolve().parents[1] / "latentray" / "data" / "mad-val-1000.xyz"
TASKS = ["oc20", "omat", "omol"]


def uma_layout(width: int = 16, n_layers: int = 2) -> dict:
    """The model config of uma-s-1p2 (fairchem's published layout), at a small size."""
    mapping = {task: task for task in TASKS}
    backbone = {
        "model": "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone",
        "num_experts": 4, "moe_dropout": 0.05, "moe_layer_type": "pytorch",
        "use_composition_embedding": True, "composition_dropout": 0.1,
        "max_num_elements": 100, "sphere_channels": width, "lmax": 2, "mmax": 2,
        "otf_graph": False, "max_neighbors": 300, "cutoff": 6.0, "edge_channels": width,
        "num_distance_basis": 32, "regress_forces": True, "regress_stress": True,
        "direct_forces": False, "num_layers": n_layers, "hidden_channels": width,
        "norm_type": "rms_norm_sh", "act_type": "gate", "ff_type": "spectral",
        "chg_spin_emb_type": "rand_emb", "cs_emb_grad": True, "dataset_emb_grad": True,
        "charge_balanced_channels": [0, 1, 2], "dataset_mapping": mapping}
    head = {"module": "fairchem.core.models.uma.escn_moe.DatasetSpecificMoEWrapper",
            "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
            "head_kwargs": {"wrap_property": False}, "dataset_mapping": mapping}
    return {"_target_": "fairchem.core.models.base.HydraModel", "backbone": backbone,
            "heads": {"energyandforcehead": head}, "pass_through_head_outputs": True,
            "supports_single_atoms": True, "model_id": "UMA-S-1.2"}


def uma_tasks() -> list[dict]:
    """Energy, forces and stress per dataset, with normalisers and element references."""
    tasks = []
    for task in TASKS:
        for prop, level, dim in [("energy", "system", [1]), ("forces", "atom", [3]),
                                 ("stress", "system", [1, 9])]:
            spec = {"_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task",
                    "name": f"{task}_{prop}", "level": level, "property": prop,
                    "out_spec": {"dim": dim, "dtype": "float32"}, "datasets": [task],
                    "metrics": ["mae"],
                    "normalizer": {"_target_": "fairchem.core.modules.normalization."
                                              "normalizer.Normalizer",
                                   "mean": 0.0, "rmsd": 1.342}}
            if prop == "energy":
                spec["element_references"] = {
                    "_target_": "fairchem.core.modules.normalization.element_references."
                                "ElementReferences",
                    "element_references": {"_target_": "torch.DoubleTensor",
                                           "_args_": [[0.0] + [-0.1 * z for z in range(1, 101)]]}}
            tasks.append(spec)
    return tasks


@pytest.fixture(scope="module")
def small_uma(tmp_path_factory):
    import hydra
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    config = uma_layout()
    model = hydra.utils.instantiate(config)
    with torch.no_grad():  # fairchem starts some weights at zero: give every path a signal
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("uma") / "small-uma.pt"
    torch.save(MLIPInferenceCheckpoint(model_config=config, model_state_dict=model.state_dict(),
                                       ema_state_dict=AveragedModel(model).state_dict(),
                                       tasks_config=uma_tasks()), path)
    return str(path)


def calculator_reference(checkpoint: str, frames, task: str) -> dict[str, np.ndarray]:
    """Per-atom features from fairchem's FAIRChemCalculator, one structure at a time, by hooks
    on its model while it computes energy, forces and stress."""
    from fairchem.core import FAIRChemCalculator
    from fairchem.core.units.mlip_unit import load_predict_unit

    unit = load_predict_unit(checkpoint, device="cpu", inference_settings="batch")
    calc = FAIRChemCalculator(unit, task_name=task)
    model = unit.model.module
    backbone, head = model.backbone, model.output_heads["energyandforcehead"].head
    seen = {"bb1": [], "bb2": [], "ll": []}
    hooks = [backbone.blocks[1].register_forward_pre_hook(
                 lambda m, a: seen["bb1"].append(a[0][:, 0, :].detach().clone().numpy())),
             backbone.register_forward_hook(
                 lambda m, a, o: seen["bb2"].append(
                     o["node_embedding"][:, 0, :].detach().clone().numpy())),
             head.energy_block[-1].register_forward_pre_hook(
                 lambda m, a: seen["ll"].append(a[0].detach().clone().numpy()))]
    try:
        for atoms in frames:
            atoms = atoms.copy()
            atoms.calc = calc
            atoms.get_potential_energy()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: np.concatenate(values) for name, values in seen.items()}


@pytest.mark.parametrize("task", TASKS)
def test_features_equal_fairchems_own_calculator(small_uma, task):
    """Each task (the modality) against ``FAIRChemCalculator(task_name=task)``."""
    frames = read(MAD, index=":8")
    model = load_adapter("uma", small_uma, modality=task)
    assert model.info.layer_widths == {"bb1": 16, "bb2": 16, "ll": 16}
    assert model.info.cutoff == 6.0 and max(model.info.supported_numbers) == 99
    ours = model.forward([model.prepare(a) for a in frames], ["bb1", "bb2", "ll", "bb"])
    theirs = calculator_reference(small_uma, frames, task)
    for name in ("bb1", "bb2", "ll"):
        # eSCN's random roll angle per edge: equal to ~1e-6, not bitwise
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(ours["bb"], ours["bb2"])
    again = model.forward([model.prepare(a) for a in frames], ["bb1", "ll"])
    np.testing.assert_array_equal(again["bb1"], ours["bb1"])  # a run repeats exactly


def test_the_task_is_the_modality_and_changes_the_features(small_uma):
    frames = read(MAD, index=":3")
    with pytest.raises(ValueError, match="choose the task"):
        load_adapter("uma", small_uma)
    with pytest.raises(ValueError, match="not one of"):
        load_adapter("uma", small_uma, modality="odac")
    omat, omol = (load_adapter("uma", small_uma, modality=task) for task in ("omat", "omol"))
    a = omat.forward([omat.prepare(x) for x in frames], ["bb1"])["bb1"]
    b = omol.forward([omol.prepare(x) for x in frames], ["bb1"])["bb1"]
    assert np.abs(a - b).max() > 1e-2


def test_unsupported_elements_are_a_structure_error(small_uma):
    model = load_adapter("uma", small_uma, modality="omat")
    model.prepare(Atoms("Es2", positions=[[0, 0, 0], [0, 0, 2.5]]))  # Z = 99: embedded
    with pytest.raises(StructureError, match="Fm"):  # Z = 100: beyond max_num_elements
        model.prepare(Atoms("Fm2", positions=[[0, 0, 0], [0, 0, 2.5]]))


def test_describe_records_fairchems_version(small_uma):
    """What a unit records: the distribution the adapter declares, at its installed version."""
    from importlib.metadata import version

    from latentray.config import ModelConfig
    from latentray.extraction.worker import ExtractionWorker

    d = ExtractionWorker().describe(ModelConfig(id="uma", family="uma", checkpoint=small_uma,
                                                modality="omat"))
    assert (d.distribution, d.version) == ("fairchem-core", version("fairchem-core"))
    assert "latentray/models/uma.py" in d.code and d.layer_widths["ll"] == 16


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
def test_uma_takes_slabs_wires_and_molecules_as_its_own_calculator(small_uma, build):
    """fairchem builds the graph with its own radius graph, periodic along ``pbc`` only.
    Every layer equals FAIRChemCalculator on the structure in a vacuum cell, for the
    structure as given (no cell vector along the open axes: fairchem's own code refuses a
    slab or wire so, latentray gives it open-axis vectors), in a vacuum cell and with
    open-axis vectors of 4 A; and equals the calculator on each variant it takes. The 4 A
    cell made periodic everywhere is another graph."""
    model = load_adapter("uma", small_uma, modality="omat")
    atoms = build()
    theirs = calculator_reference(small_uma, [_in_vacuum(atoms)], "omat")
    short = _short_open_vectors(atoms)
    for variant in (atoms, _in_vacuum(atoms), short):
        ours = model.forward([model.prepare(variant)], ["bb1", "bb2", "ll"])
        own = None
        if not atoms.pbc.any() or variant is not atoms:  # what fairchem takes as it is
            own = calculator_reference(small_uma, [variant], "omat")
        for name in theirs:
            assert ours[name].shape[0] == len(atoms)
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-4,
                                       err_msg=name)
            if own is not None:
                np.testing.assert_allclose(ours[name], own[name], rtol=1e-5, atol=2e-5,
                                           err_msg=name)
    everywhere = short.copy()
    everywhere.pbc = True
    wrong = model.forward([model.prepare(everywhere)], ["bb1"])["bb1"]
    assert np.abs(wrong - theirs["bb1"]).max() > 1e-2


def test_uma_takes_isolated_atoms_as_its_own_calculator(small_uma):
    """An atom with no neighbour within the cutoff, through FAIRChemCalculator: every layer of
    ours equals it, finite, for a single atom, an atom 15 A from a bonded pair in a periodic box
    and two atoms 12 A apart without a cell."""
    from test_periodicity import _isolated

    model = load_adapter("uma", small_uma, modality="omat")
    for atoms in _isolated():
        theirs = calculator_reference(small_uma, [atoms], "omat")
        ours = model.forward([model.prepare(atoms)], ["bb1", "bb2", "ll"])
        for name in theirs:
            assert ours[name].shape[0] == len(atoms) and np.isfinite(ours[name]).all()
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=2e-5,
                                       err_msg=f"{atoms.get_chemical_formula()}, {name}")
