"""Shared by the tests: a run's latents read back through the public reader, the GFRE of one
pair against scikit-matter, and SevenNet's own ASE calculator with hooks on its layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import latentray


MAD = Path(__file__).resolve().parents[1] / "latentray" / "data" / "mad-val-1000.xyz"
SEVENN_UNSUPPORTED = {84, 85, 86, 87, 88}  # Po, At, Rn, Fr, Ra: not in SevenNet-0's type map


def small_mad_structures(n: int = 6) -> list:
    """The first ``n`` of the first 20 MAD structures with at most 50 atoms and no element
    that SevenNet-0 lacks: what every packaged CHGNet and SevenNet can process."""
    from ase.io import read

    chosen = [a for a in read(MAD, index=":20")
              if len(a) <= 50 and not SEVENN_UNSUPPORTED.intersection(a.numbers.tolist())][:n]
    assert len(chosen) == n
    return chosen


def layer_matrices(output: Path, model: str | None = None) -> dict[str, np.ndarray]:
    """``{layer: (atoms, width) features}`` of one model (or of the only one) under
    ``OUTPUT/latents``, rows in dataset order (structure, then atom): ``latentray.open``
    (itself checked against pyarrow's and DuckDB's reading in test_store.py)."""
    root = Path(output) / "latents"
    (dataset,) = [p.name.split("=", 1)[1] for p in root.iterdir()]
    models = [p.name.split("=", 1)[1] for p in (root / f"dataset={dataset}").iterdir()]
    model = model or models[0]
    layers = sorted(p.name.split("=", 1)[1]
                    for p in (root / f"dataset={dataset}" / f"model={model}").iterdir())
    run = latentray.open(str(output))
    return {layer: run.latents(dataset, model, layer).X for layer in layers}


def assert_family_versions_recorded(output: Path) -> None:
    """Every model of the run recorded its family's distribution and a version (never None),
    the one installed where its actors ran (checked here for the driver's environment)."""
    from importlib.metadata import PackageNotFoundError, version

    for model in latentray.open(str(output)).provenance["models"]:
        assert model["family_distribution"] and model["family_package_version"], model
        try:
            here = version(model["family_distribution"])
        except PackageNotFoundError:  # installed only in the family's own environment
            continue
        if model["family"] not in ("mace", "mattersim"):
            assert model["family_package_version"] == here, model


def assert_one_gfre_equals_skmatter(output: Path, source: str, target: str) -> None:
    """The run's atom-level GFRE ``source -> target`` (in memory, first seed) recomputed with
    scikit-matter on the latents read back and the run's split (``paper_split``, stratified by
    subset where the dataset has one): a value, not only a row that exists."""
    from skmatter.metrics import global_reconstruction_error

    from latentray.method.splits import paper_split

    run = latentray.open(str(output))
    results = run.results()
    rows = results[(results.source == source) & (results.target == target)
                   & (results.metric == "gfre") & (results.level == "atom")]
    row = rows[rows.seed == rows.seed.min()].iloc[0]
    assert row.path == "in-memory"
    a = run.latents(row.dataset, source, row.source_layer)
    b = run.latents(row.dataset, target, row.target_layer)
    common = np.intersect1d(a.structure_index, b.structure_index)
    ra, rb = np.isin(a.structure_index, common), np.isin(b.structure_index, common)
    assert np.array_equal(a.Z[ra], b.Z[rb]) and np.array_equal(a.atom_index[ra], b.atom_index[rb])
    subsets = run.structures(row.dataset, ["structure_index", "subset"]).to_pandas()
    labels = subsets.set_index("structure_index")["subset"].loc[a.structure_index[ra]]
    labels = None if (labels.isna() | (labels == "")).all() else labels.to_numpy()
    train, test = paper_split(int(ra.sum()), int(row.n_test), seed=int(row.seed), labels=labels)
    expected = global_reconstruction_error(a.X[ra].astype(np.float64),
                                           b.X[rb].astype(np.float64),
                                           train_idx=train, test_idx=test)
    assert 0 < row.value == pytest.approx(expected, rel=1e-8)


def sevennet_hooked_calculator(name: str, modal: str | None = None):
    """sevenn's own ASE calculator on the unmodified model, with forward hooks recording
    the 0e channels of every gate output and the output of reduce_input_to_hidden."""
    import warnings

    from e3nn.o3 import Irreps
    from sevenn.calculator import SevenNetCalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = SevenNetCalculator(name, device="cpu", modal=modal)
    records: dict[str, list[np.ndarray]] = {}

    def record(layer, columns):
        def hook(module, args, output):
            x = output["x"].detach()
            records.setdefault(layer, []).append(x[:, columns].clone().numpy())
        return hook

    gates = sorted(k for k in calc.model._modules if k.endswith("_equivariant_gate"))
    for key in gates:
        k = int(key.split("_")[0]) + 1
        irreps = Irreps(str(calc.model._modules[key].gate.irreps_out))
        columns = np.concatenate([np.arange(s.start, s.stop)
                                  for (mul, ir), s in zip(irreps, irreps.slices())
                                  if (ir.l, ir.p) == (0, 1)])
        calc.model._modules[key].register_forward_hook(record(f"bb{k}", columns))
    calc.model._modules["reduce_input_to_hidden"].register_forward_hook(
        record("ll", slice(None)))
    return calc, records


def run_calculator(calc, records, frames) -> dict[str, np.ndarray]:
    records.clear()
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        atoms.get_potential_energy()
    return {layer: np.concatenate(values) for layer, values in records.items()}
