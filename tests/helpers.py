"""Shared by the tests: reading a run's outputs back with pyarrow alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as ds


def layer_matrices(output: Path, model: str | None = None) -> dict[str, np.ndarray]:
    """``{layer: (atoms, width) features}`` of one model (or of the only one) under
    ``OUTPUT/latents``, rows in dataset order (structure, then atom)."""
    table = ds.dataset(Path(output) / "latents", format="parquet", partitioning="hive").to_table(
        filter=None if model is None else ds.field("model") == model).to_pandas()
    table = table.sort_values(["layer", "structure_index", "atom_index"])
    return {layer: np.stack(rows.features.to_numpy()) for layer, rows in table.groupby("layer")}
