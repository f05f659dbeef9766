"""Read a run's outputs: ``latentray.open(OUTPUT)``.

The one reader of what a run wrote, used by the analysis, the report, ``status``, the tests
and users alike::

    import latentray

    run = latentray.open("outputs/demo")          # a path or any pyarrow URI (s3://...)
    rows = run.latents("mad-val-1000", "chgnet-0.3.0", "bb4")
    rows.X                                         # (atoms, width) float32, dataset order
    rows.structure_id, rows.atom_index, rows.Z     # what each row is
    k = run.cumulants("mad-val-1000", "chgnet-0.3.0", "bb4", order=2)
    k.X                                            # (structures, 2 * width): [k1 | k2]
    run.results()                                  # results/reconstruction as a DataFrame
    run.provenance                                 # run.json's provenance (config, versions)

Rows are in dataset order: ``structure_index``, then ``atom_index``. The same files open
with ``pyarrow.dataset.dataset(OUTPUT + "/latents", partitioning="hive")`` or DuckDB's
``read_parquet(..., hive_partitioning=true)`` (see the README).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .store import Store, features_matrix

#: Arrow threads for reading one shard's file: none. A shard is read by one task of a stage
#: that runs a task per core; Arrow's own pool (a thread per core) only competes with the
#: other tasks (a 200,000 x 256 shard: 0.42 s without, 0.6-0.8 s with, on 2 cores).
ONE_SHARD_THREADS = False


@dataclass(frozen=True)
class AtomRows:
    """One (dataset, model, layer): a row per atom, in dataset order."""

    structure_id: np.ndarray  # (atoms,) str
    structure_index: np.ndarray  # (atoms,) int64
    atom_index: np.ndarray  # (atoms,) int32
    Z: np.ndarray  # (atoms,) int16
    X: np.ndarray  # (atoms, width) float32
    width: int

    def rows_of(self, structure_indices: np.ndarray) -> np.ndarray:
        """The row numbers of the atoms of ``structure_indices``."""
        return np.flatnonzero(np.isin(self.structure_index, structure_indices))


@dataclass(frozen=True)
class StructureRows:
    """One (dataset, model, layer): a row per structure, with its cumulant features."""

    structure_id: np.ndarray  # (structures,) str
    structure_index: np.ndarray  # (structures,) int64
    n_atoms: np.ndarray  # (structures,) int64
    subset: np.ndarray  # (structures,) str
    X: np.ndarray  # (structures, order * width) float64: [k1 | ... | k_order]
    width: int  # of one order


def _strings(column) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)


class Run:
    """The outputs of a run (or of several runs into the same directory)."""

    def __init__(self, output: str | Store):
        self.store = output if isinstance(output, Store) else Store(str(output))

    # -- per atom --------------------------------------------------------------------
    def latents_table(self, dataset: str, model: str, layer: str, shard: int | None = None,
                      shards: int | None = None, columns: list[str] | None = None) -> pa.Table:
        """The latents rows as read (no sorting): one shard's file, or all shards (the first
        ``shards`` of them)."""
        store = self.store
        directory = store.latents_dir(dataset, model, layer)
        if shard is not None:
            path = posixpath.join(directory, store.part(shard))
            try:
                return pq.read_table(path, columns=columns, filesystem=store.fs,
                                     use_threads=ONE_SHARD_THREADS)
            except FileNotFoundError:
                raise FileNotFoundError(f"{store.display(path)}: missing (latents of {model} "
                                        f"{layer}, shard {shard})") from None
        table = store.read_table(directory, shards, columns)
        if table is None:
            raise FileNotFoundError(f"no latents for {dataset}/{model}/{layer} in {store.uri}")
        return table

    def latents(self, dataset: str, model: str, layer: str,
                shards: int | None = None, features: bool = True) -> AtomRows:
        """A model's layer on a dataset as a matrix, a row per atom in dataset order
        (``features=False``: the rows' ids only, ``X`` and ``structure_id`` None)."""
        columns = None if features else ["structure_index", "atom_index", "Z"]
        table = self.latents_table(dataset, model, layer, shards=shards, columns=columns)
        table = table.sort_by([("structure_index", "ascending"), ("atom_index", "ascending")])
        width = int(table.schema.metadata[b"latentray.width"])
        return AtomRows(structure_id=_strings(table["structure_id"]) if features else None,
                        structure_index=table["structure_index"].to_numpy(),
                        atom_index=table["atom_index"].to_numpy(), Z=table["Z"].to_numpy(),
                        X=features_matrix(table["features"], width) if features else None,
                        width=width)

    # -- per structure -----------------------------------------------------------------
    def cumulants_table(self, dataset: str, model: str, layer: str, order: int, shards,
                        columns: list[str] | None = None) -> pa.Table:
        """The order-``order`` cumulant descriptor [k1 .. k_order] of ``shards`` as a table.

        Reads ``cumulants/.../order=1..order/part-SHARD.parquet`` (rows in the same
        structure order in every order's file, checked) and returns the id ``columns`` of
        order 1 (all by default) with ``features`` = the orders side by side (metadata
        ``latentray.width``: their total width)."""
        store = self.store
        ids_only = columns is not None and "features" not in columns
        if ids_only:  # the ids alone: those columns of order 1's files
            order = 1
        parts, width = [], None
        for n in range(1, order + 1):
            directory = store.cumulants_dir(dataset, model, layer, n)
            tables = []
            for shard in shards:
                path = posixpath.join(directory, store.part(shard))
                try:
                    tables.append(pq.read_table(path, columns=list(columns) if ids_only else
                                                None if n == 1 else
                                                ["structure_index", "features"],
                                                filesystem=store.fs,
                                                use_threads=ONE_SHARD_THREADS))
                except FileNotFoundError:
                    raise FileNotFoundError(f"{store.display(path)}: missing (cumulants of "
                                            f"{model} {layer}, order {n}, shard {shard})") from None
            table = pa.concat_tables(tables)
            width = int(tables[0].schema.metadata[b"latentray.width"])
            if parts and not np.array_equal(table["structure_index"].to_numpy(),
                                            parts[0]["structure_index"].to_numpy()):
                raise RuntimeError(f"{store.display(directory)}: rows differ from order 1's")
            parts.append(table)
        if ids_only:
            return parts[0]
        ids = parts[0].drop_columns(["features"])
        if columns is not None:
            ids = ids.select([c for c in columns if c != "features"])
            if "features" not in columns:
                return ids
        F = np.hstack([features_matrix(t["features"], width) for t in parts])
        n_rows, total = F.shape
        features = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n_rows + 1) * total, total, dtype=np.int32)),
            pa.array(F.reshape(-1)))
        return ids.append_column("features", features).replace_schema_metadata(
            {"latentray.width": str(total), "latentray.orders": str(order)})

    def n_shards(self, dataset: str) -> int:
        """How many structure shards of ``dataset`` are stored."""
        return len(self.store.parquet_files(self.store.path("structures", f"dataset={dataset}")))

    def cumulants(self, dataset: str, model: str, layer: str, order: int,
                  shards: int | None = None) -> StructureRows:
        """A model's layer on a dataset as structure features [k1 | ... | k_order], a row per
        structure in dataset order."""
        shards = self.n_shards(dataset) if shards is None else shards
        table = self.cumulants_table(dataset, model, layer, order, range(shards))
        width = int(table.schema.metadata[b"latentray.width"]) // order
        return StructureRows(structure_id=_strings(table["structure_id"]),
                             structure_index=table["structure_index"].to_numpy(),
                             n_atoms=table["n_atoms"].to_numpy(),
                             subset=_strings(table["subset"]),
                             X=features_matrix(table["features"]), width=width)

    def structures(self, dataset: str, columns: list[str] | None = None,
                   shards: int | None = None) -> pa.Table | None:
        """``structures/``: a row per structure read (with its geometry, unless ``columns``
        leaves it out)."""
        return self.store.read_table(self.store.path("structures", f"dataset={dataset}"),
                                     shards, columns)

    def failures(self, dataset: str, model: str) -> pa.Table | None:
        """The structures ``model`` could not process (``input``: frames not read)."""
        return self.store.read_table(self.store.failures_dir(dataset, model))

    # -- tables and provenance -----------------------------------------------------------
    def results(self, name: str = "reconstruction"):
        """``results/NAME.parquet`` (``reconstruction``, ``by_group``, ``maps``) as a pandas
        DataFrame; None before the first analysis."""
        path = self.store.path("results", f"{name}.parquet")
        if not self.store.exists(path):
            return None
        return pq.read_table(path, filesystem=self.store.fs).to_pandas()

    @property
    def summary(self) -> dict | None:
        """``run.json``: the last run's provenance, unit totals, analysis and timings."""
        return self.store.read_json(self.store.path("run.json"))

    @property
    def provenance(self) -> dict | None:
        run = self.summary
        return None if run is None else run["provenance"]

