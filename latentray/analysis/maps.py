"""2-D maps of the structure features: PCA, and PCovR against the energy per atom.

For one model and layer, the structure features are the cumulants [k1 .. k_order] of the
report (``analyses.order``). Each column is standardised (zero mean, unit variance; constant
columns stay zero), then

* ``pca``: the first two principal components (``sklearn.decomposition.PCA``);
* ``pcovr``: principal covariates regression (``skmatter.decomposition.PCovR``, mixing 0.5,
  the regression a ridge of scikit-matter's default), with the standardised energy per atom
  as the property: a projection that keeps half of the feature variance and half of the
  linear information about the energy. Only where the dataset gives an energy.

At most ``max_structures`` structures are mapped per model (a seeded random sample of the
structures; the same sample for every model of a dataset), so a map costs the same for
MPtrj as for the demo.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ..reader import Run
from ..store import features_matrix

MAP_COLUMNS = ["dataset", "layers", "model", "layer", "method", "structure_id",
               "structure_index", "subset", "energy_per_atom", "x", "y"]


def project(X: np.ndarray, energy_per_atom: np.ndarray, methods: tuple[str, ...],
            mixing: float = 0.5) -> dict[str, np.ndarray]:
    """``{method: (n, 2) coordinates}`` of the rows of ``X`` (see the module docstring);
    ``pcovr`` is fitted on the rows with a finite energy and projects every row."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Xs = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    out = {}
    if "pca" in methods:
        out["pca"] = PCA(n_components=2).fit_transform(Xs)
    known = np.isfinite(energy_per_atom)
    if "pcovr" in methods and known.sum() > 2 and np.std(energy_per_atom[known]) > 0:
        from skmatter.decomposition import PCovR

        y = energy_per_atom[known]
        y = ((y - y.mean()) / y.std()).reshape(-1, 1)
        model = PCovR(mixing=mixing, n_components=2).fit(Xs[known], y)
        out["pcovr"] = model.transform(Xs)
    return out


def model_map(uri: str, dataset: str, layers: str, model: str, layer: str, order: int,
              shards: int, chosen: np.ndarray | None, methods: tuple[str, ...]) -> pd.DataFrame:
    """The map rows of one (dataset, model, layer); ``chosen``: structure indices to map
    (None: all). Read one shard at a time, keeping the chosen rows only: its memory is the
    sample's, not the dataset's. A Ray task."""
    run = Run(uri)
    parts = []
    for shard in range(shards):
        part = run.cumulants_table(dataset, model, layer, order, [shard])
        if chosen is not None:
            part = part.filter(np.isin(part["structure_index"].to_numpy(), chosen))
        parts.append(part)
    table = pa.concat_tables(parts)
    index = table["structure_index"].to_numpy()
    X = features_matrix(table["features"])
    structures = run.structures(dataset, ["structure_index", "energy", "n_atoms"], shards)
    info = pd.DataFrame({"structure_index": structures["structure_index"].to_numpy(),
                         "energy": structures["energy"].to_numpy(zero_copy_only=False),
                         "n_atoms": structures["n_atoms"].to_numpy()}).set_index(
        "structure_index").loc[index]
    energy_per_atom = (info.energy / info.n_atoms).to_numpy(dtype=np.float64)
    frames = []
    for method, xy in project(X, energy_per_atom, methods).items():
        frames.append(pd.DataFrame({
            "dataset": dataset, "layers": layers, "model": model, "layer": layer,
            "method": method,
            "structure_id": np.asarray(table["structure_id"].to_numpy(zero_copy_only=False)),
            "structure_index": index,
            "subset": np.asarray(table["subset"].to_numpy(zero_copy_only=False)),
            "energy_per_atom": energy_per_atom, "x": xy[:, 0], "y": xy[:, 1]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=MAP_COLUMNS)


def sample(structure_indices: np.ndarray, at_most: int, seed: int) -> np.ndarray | None:
    """A seeded random sample of at most ``at_most`` structure indices (None: all)."""
    if len(structure_indices) <= at_most:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(structure_indices, size=at_most, replace=False))
