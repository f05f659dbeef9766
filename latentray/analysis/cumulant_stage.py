"""Structure features by cumulants, one Parquet file per (model, layer, shard, order).

Each file is recomputed only when its inputs change: the unit's inputs (the latents it
reads) and this module's code, both in the digest the stage passes
(:func:`latentray.analysis.fit_cache.cumulant_code`). The math is
:func:`latentray.method.cumulants.cumulant_features`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..method.cumulants import MAX_ORDER, cumulant_features
from ..store import Store, features_matrix


def shard_cumulants(uri: str, dataset: str, model: str, layer: str, shard: int,
                    inputs_digest: str) -> bool:
    """Cumulant features (orders 1-8) of one latents shard; False when already up to date.

    Writes ``cumulants/dataset=D/model=M/layer=L/order=N/part-SHARD.parquet`` for N = 1..8:
    one row per structure (structure_id, structure_index, n_atoms, subset), ``features`` =
    k_N of every column (root-transformed for N >= 2; ``width`` float64 values). The order-n
    descriptor of the paper is orders 1..n side by side.
    """
    store = Store(uri)
    paths = [f"{store.cumulants_dir(dataset, model, layer, n)}/{store.part(shard)}"
             for n in range(1, MAX_ORDER + 1)]
    if all(store.parquet_metadata(p).get("latentray.inputs") == inputs_digest for p in paths):
        return False
    latents = pq.read_table(f"{store.latents_dir(dataset, model, layer)}/{store.part(shard)}",
                            filesystem=store.fs)
    width = int(latents.schema.metadata[b"latentray.width"])
    latents = latents.sort_by([("structure_index", "ascending"), ("atom_index", "ascending")])
    structure_index = latents["structure_index"].to_numpy()
    structures = pq.read_table(store.structures_path(dataset, shard), filesystem=store.fs,
                               columns=["structure_id", "structure_index", "subset"])
    if len(structure_index):
        index, feats = cumulant_features(features_matrix(latents["features"], width),
                                         structure_index, order=MAX_ORDER)
    else:
        index, feats = np.zeros(0, np.int64), np.zeros((0, MAX_ORDER * width))
    _, n_atoms = np.unique(structure_index, return_counts=True)
    at = np.searchsorted(structures["structure_index"].to_numpy(), index)
    ids = {"structure_id": structures["structure_id"].take(at),
           "structure_index": pa.array(index, pa.int64()),
           "n_atoms": pa.array(n_atoms, pa.int64()),
           "subset": structures["subset"].take(at)}
    offsets = pa.array(np.arange(0, (len(index) + 1) * width, width, dtype=np.int32))
    for n, path in enumerate(paths, start=1):
        k_n = np.ascontiguousarray(feats[:, (n - 1) * width: n * width])
        table = pa.table({**ids, "features": pa.ListArray.from_arrays(
            offsets, pa.array(k_n.reshape(-1)))}).replace_schema_metadata({
                "latentray.inputs": inputs_digest, "latentray.width": str(width),
                "latentray.order": str(n),
                "latentray.transform": "k1" if n == 1 else f"sign(k{n}) |k{n}|^(1/{n})"})
        store.write_table(path, table)
    return True


