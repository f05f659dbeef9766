"""``latentray prepare``: any supported input -> sharded structures Parquet.

The output (``OUTPUT/structures/dataset=NAME/part-*.parquet``, with ``failures/`` and
``dropped/`` beside it) holds numbers, positions, cell, pbc, subset, the native id and the
energy of every kept structure, one file per shard with its content hash in the metadata.
It is the recommended input for cluster runs (``format: parquet``, ``path:
OUTPUT/structures/dataset=NAME``): columnar, splittable, and read without parsing text.
"""

from __future__ import annotations

import time

from .config import DatasetConfig
from .datasets import iter_shards
from .store import Store


def prepare_dataset(dataset: DatasetConfig, output: str, shard_size: int = 250,
                    log=print) -> dict:
    """Read ``dataset`` and write it as structures Parquet under ``output``; return counts."""
    from .shards import write_shard_tables

    store = Store(output)
    t = time.perf_counter()
    counts = {"structures": 0, "atoms": 0, "shards": 0, "failed": 0, "dropped": 0}
    for shard in iter_shards(dataset.name, dataset.path, dataset.format, dataset.subset_key,
                             shard_size, dataset.limit, dataset.filters, dataset.on_error):
        write_shard_tables(store, shard)
        counts["structures"] += len(shard)
        counts["atoms"] += int(shard.n_atoms.sum())
        counts["shards"] += 1
        counts["failed"] += len(shard.failures)
        counts["dropped"] += len(shard.dropped)
    counts["seconds"] = round(time.perf_counter() - t, 3)
    counts["path"] = store.display(store.path("structures", f"dataset={dataset.name}"))
    log(f"{dataset.name}: {counts['structures']} structures ({counts['atoms']} atoms) in "
        f"{counts['shards']} shard(s), {counts['failed']} frame(s) could not be read, "
        f"{counts['dropped']} dropped by filters, {counts['seconds']:.1f} s -> {counts['path']}")
    return counts
