"""metatomic: a small AtomisticModel built with metatomic's own classes (random weights, no
download), exported, loaded by latentray, against metatomic's own ASE calculator."""

import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

torch = pytest.importorskip("torch")
mta = pytest.importorskip("metatomic.torch")
from metatensor.torch import Labels, TensorBlock, TensorMap  # noqa: E402
from metatomic.torch import NeighborListOptions, System  # noqa: E402

from latentray.models import StructureError, load_adapter  # noqa: E402
from test_periodicity import (  # noqa: E402
    _in_vacuum, _molecule, _short_open_vectors, _slab, _wire)

MAD = Path(__file__).resolve().parents[1] / "latentray" / "data" / "mad-val-1000.xyz"
LAST_LAYER = "mtt::aux::energy_last_layer_features"


class RadialFeatures(torch.nn.Module):
    """Per-atom features: a random linear mix of Gaussians of the neighbour distances, and a
    hidden layer on top of them (the 'last layer')."""

    def __init__(self, cutoff: float, n_features: int, n_hidden: int):
        super().__init__()
        self.nl = NeighborListOptions(cutoff=cutoff, full_list=True, strict=True)
        self.centres = torch.linspace(0.5, cutoff, 8, dtype=torch.float64)
        self.mix = torch.nn.Linear(8, n_features, dtype=torch.float64)
        self.hidden = torch.nn.Linear(n_features, n_hidden, dtype=torch.float64)

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.nl]

    def forward(self, systems: List[System], outputs: Dict[str, mta.ModelOutput],
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:
        feats: List[torch.Tensor] = []
        samples: List[torch.Tensor] = []
        for s, system in enumerate(systems):
            nl = system.get_neighbor_list(self.nl)
            i = nl.samples.column("first_atom")
            d = torch.linalg.vector_norm(nl.values.reshape(-1, 3), dim=1)
            g = torch.exp(-(d[:, None] - self.centres[None, :]) ** 2)
            acc = torch.zeros(len(system), 8, dtype=system.positions.dtype)
            acc.index_add_(0, i, g)
            feats.append(torch.tanh(self.mix(acc)))
            samples.append(torch.stack([torch.full((len(system),), s),
                                        torch.arange(len(system))], 1))
        x = torch.cat(feats)
        rows = Labels(["system", "atom"], torch.cat(samples))
        out: Dict[str, TensorMap] = {}
        for name, values in [("feature", x),
                             ("mtt::aux::energy_last_layer_features", torch.tanh(self.hidden(x)))]:
            if name in outputs:
                block = TensorBlock(values=values, samples=rows, components=[],
                                    properties=Labels(["f"], torch.arange(
                                        values.shape[1]).reshape(-1, 1)))
                out[name] = TensorMap(Labels(["_"], torch.tensor([[0]])), [block])
        return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("metatomic") / "radial.pt"
    torch.manual_seed(0)
    capabilities = mta.ModelCapabilities(
        outputs={"feature": mta.ModelOutput(sample_kind="atom"),
                 LAST_LAYER: mta.ModelOutput(sample_kind="atom")},
        atomic_types=list(range(1, 84)), interaction_range=4.0, length_unit="angstrom",
        supported_devices=["cpu"], dtype="float64")
    mta.AtomisticModel(RadialFeatures(4.0, 12, 6).eval(), mta.ModelMetadata(name="radial"),
                       capabilities).save(str(path))
    return str(path)


def test_features_equal_metatomics_own_calculator(exported):
    from metatomic_ase import MetatomicCalculator

    frames = [a for a in read(MAD, index=":40") if a.numbers.max() < 84][:15]
    model = load_adapter("metatomic", exported)
    assert model.info.layer_widths == {"bb1": 12, "ll": 6} and model.info.cutoff == 4.0
    ours = model.forward([model.prepare(a) for a in frames], ["bb1", "ll", "bb"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = MetatomicCalculator(exported)
        for layer, name in [("bb1", "feature"), ("ll", LAST_LAYER)]:
            theirs = np.concatenate([
                calc.run_model(a, {name: mta.ModelOutput(sample_kind="atom")})[name]
                .block().values.numpy() for a in frames])
            np.testing.assert_allclose(ours[layer], theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours["bb"], ours["bb1"])


@pytest.mark.parametrize("build", [_slab, _wire, _molecule])
def test_metatomic_takes_slabs_wires_and_molecules_as_its_own_calculator(exported, build):
    """metatomic's neighbour list is periodic along ``pbc`` only: both layers equal
    MetatomicCalculator on the structure in a vacuum cell, for the structure as given (no
    cell vector along the open axes), in a vacuum cell and with open-axis vectors of 4 A,
    and equal the calculator on each variant; the 4 A cell made periodic everywhere is
    another graph."""
    from metatomic_ase import MetatomicCalculator

    model = load_adapter("metatomic", exported)
    atoms = build()
    short = _short_open_vectors(atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = MetatomicCalculator(exported)

        def own(variant):
            return {layer: calc.run_model(variant, {name: mta.ModelOutput(sample_kind="atom")})
                    [name].block().values.numpy()
                    for layer, name in [("bb1", "feature"), ("ll", LAST_LAYER)]}

        theirs = own(_in_vacuum(atoms))
        for variant in (atoms, _in_vacuum(atoms), short):
            ours = model.forward([model.prepare(variant)], ["bb1", "ll"])
            for layer, values in own(variant).items():
                assert ours[layer].shape[0] == len(atoms)
                np.testing.assert_allclose(ours[layer], values, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(ours[layer], theirs[layer], rtol=1e-6, atol=1e-6)
    everywhere = short.copy()
    everywhere.pbc = True
    wrong = model.forward([model.prepare(everywhere)], ["bb1"])["bb1"]
    assert np.abs(wrong - theirs["bb1"]).max() > 1e-2


def test_unsupported_elements_are_a_structure_error(exported):
    model = load_adapter("metatomic", exported)
    with pytest.raises(StructureError, match="Po"):
        model.prepare(Atoms("Po2", positions=[[0, 0, 0], [0, 0, 2.5]]))


def test_describe_records_metatomics_version(exported):
    """What a unit records: the distribution the adapter declares, at its installed version."""
    from importlib.metadata import version

    from latentray.config import ModelConfig
    from latentray.extraction.worker import ExtractionWorker

    d = ExtractionWorker().describe(ModelConfig(id="radial", family="metatomic",
                                                checkpoint=exported))
    assert (d.distribution, d.version) == ("metatomic-torch", version("metatomic-torch"))
    assert "latentray/models/metatomic.py" in d.code


def test_metatomic_takes_isolated_atoms_as_its_own_calculator(exported):
    """MetatomicCalculator gives an atom with no neighbour within the cutoff what the model
    makes of it alone: both layers of ours equal it, finite, for a single atom, an atom 15 A
    from a bonded pair in a periodic box and two atoms 12 A apart without a cell."""
    from metatomic_ase import MetatomicCalculator
    from test_periodicity import _isolated

    model = load_adapter("metatomic", exported)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = MetatomicCalculator(exported)
        for atoms in _isolated():
            ours = model.forward([model.prepare(atoms)], ["bb1", "ll"])
            for layer, name in [("bb1", "feature"), ("ll", LAST_LAYER)]:
                theirs = calc.run_model(atoms, {name: mta.ModelOutput(sample_kind="atom")})
                theirs = theirs[name].block().values.numpy()
                assert ours[layer].shape[0] == len(atoms) and np.isfinite(ours[layer]).all()
                np.testing.assert_allclose(ours[layer], theirs, rtol=1e-6, atol=1e-6,
                                           err_msg=f"{atoms.get_chemical_formula()}, {layer}")
