"""Shared by the tests: a run's latents read back through the public reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import latentray


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
