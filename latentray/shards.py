"""A shard of structures in memory, and how it is stored.

A :class:`StructureShard` is what the readers (:mod:`latentray.datasets`) produce and what
an extraction unit is given: its structures as flat arrays, with their stable ids. Stored as
``structures/dataset=D/part-SHARD.parquet`` (with the geometry), beside the frames that
could not be read (``failures/.../model=input``) and those a filter dropped (``dropped/``).
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .store import FAILURE_SCHEMA, INPUT, Store


@dataclass
class StructureShard:
    """Structures ``structure_index`` of dataset ``dataset``, as flat arrays.

    ``failures`` and ``dropped``: (structure_id, reason) of the frames read between this
    shard's first structure and the next shard's that could not be used or were filtered out.
    """

    dataset: str
    shard: int
    structure_id: np.ndarray  # (S,) str: "<dataset>:<id in the dataset>"
    structure_index: np.ndarray  # (S,) int64, position among the dataset's kept structures
    n_atoms: np.ndarray  # (S,) int64
    numbers: np.ndarray  # (A,) int64, all atoms of the shard
    positions: np.ndarray  # (A, 3) float64, Angstrom
    cells: np.ndarray  # (S, 3, 3) float64
    pbc: np.ndarray  # (S, 3) bool
    subset: np.ndarray  # (S,) str, "" when the dataset has no label
    energy: np.ndarray  # (S,) float64 total energy, NaN where absent
    failures: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.structure_index)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_atoms)])

    def atoms(self, i: int):
        """Structure ``i`` of the shard as ``ase.Atoms``."""
        from ase import Atoms

        start, stop = self.offsets[i], self.offsets[i + 1]
        return Atoms(numbers=self.numbers[start:stop], positions=self.positions[start:stop],
                     cell=self.cells[i], pbc=self.pbc[i])

    def content_hash(self) -> str:
        """sha256 of everything a model sees, plus the ids (order-sensitive)."""
        h = hashlib.sha256()
        for array in (self.structure_index, self.n_atoms, self.numbers, self.positions,
                      self.cells, self.pbc):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update("\x00".join(self.structure_id.tolist()).encode())
        return h.hexdigest()

    def table(self):
        """The shard as structures Parquet rows (``STRUCTURE_COLUMNS``; geometry included)."""
        import pyarrow as pa

        offsets = self.offsets.astype(np.int32)
        prefix = len(self.dataset) + 1
        return pa.table({
            "structure_id": pa.array(self.structure_id.tolist(), pa.string()),
            "native_id": pa.array([s[prefix:] for s in self.structure_id.tolist()], pa.string()),
            "structure_index": pa.array(self.structure_index, pa.int64()),
            "n_atoms": pa.array(self.n_atoms, pa.int64()),
            "numbers": pa.ListArray.from_arrays(pa.array(offsets),
                                                pa.array(self.numbers.astype(np.int16))),
            "positions": pa.ListArray.from_arrays(pa.array(offsets * 3),
                                                  pa.array(self.positions.reshape(-1))),
            "cell": pa.ListArray.from_arrays(
                pa.array(np.arange(0, 9 * len(self) + 1, 9, dtype=np.int32)),
                pa.array(self.cells.reshape(-1))),
            "pbc": pa.ListArray.from_arrays(
                pa.array(np.arange(0, 3 * len(self) + 1, 3, dtype=np.int32)),
                pa.array(self.pbc.reshape(-1))),
            "subset": pa.array(self.subset.tolist(), pa.string()),
            "energy": pa.array(self.energy, pa.float64()),
        }).replace_schema_metadata({"latentray.shard_sha256": self.content_hash()})


    @classmethod
    def from_table(cls, dataset: str, shard: int, table: pa.Table) -> "StructureShard":
        """The shard :meth:`table` wrote (its structures; not its failures or drops)."""
        def flat(name: str) -> np.ndarray:
            return table[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)

        return cls(
            dataset=dataset, shard=shard,
            structure_id=np.asarray(table["structure_id"].to_pylist(), dtype=object),
            structure_index=table["structure_index"].to_numpy(),
            n_atoms=table["n_atoms"].to_numpy(),
            numbers=flat("numbers").astype(np.int64),
            positions=flat("positions").reshape(-1, 3),
            cells=flat("cell").reshape(-1, 3, 3),
            pbc=flat("pbc").reshape(-1, 3),
            subset=np.asarray(table["subset"].to_pylist(), dtype=object),
            energy=table["energy"].to_numpy(zero_copy_only=False))


def read_shard(store: Store, dataset: str, shard: int, sha256: str) -> StructureShard:
    """Shard ``shard`` of ``dataset`` from ``structures/`` (what an extraction unit runs on),
    refused unless it holds exactly the content ``sha256`` (the hash the unit's inputs name:
    a later run may have rewritten the file)."""
    path = store.structures_path(dataset, shard)
    table = pq.read_table(path, filesystem=store.fs)
    structures = StructureShard.from_table(dataset, shard, table)
    if structures.content_hash() != sha256:
        raise RuntimeError(f"{store.display(path)}: its structures changed since this unit "
                           f"was planned (sha256 {structures.content_hash()[:12]}, expected "
                           f"{sha256[:12]}): run the job again")
    return structures


def write_shard_tables(store: Store, shard) -> None:
    """A shard's structures (with geometry), the frames that could not be read
    (``failures/.../model=input``) and those the filters dropped (``dropped/``); structures
    are rewritten only when their content changed (keeps re-runs cheap)."""
    path = store.structures_path(shard.dataset, shard.shard)
    if store.parquet_metadata(path).get("latentray.shard_sha256") != shard.content_hash():
        store.write_table(path, shard.table())
    store.write_table(
        posixpath.join(store.failures_dir(shard.dataset, INPUT), store.part(shard.shard)),
        pa.table({"structure_id": pa.array([f for f, _ in shard.failures], pa.string()),
                  "structure_index": pa.array([-1] * len(shard.failures), pa.int64()),
                  "n_atoms": pa.array([-1] * len(shard.failures), pa.int64()),
                  "stage": pa.array(["read"] * len(shard.failures), pa.string()),
                  "reason": pa.array([r for _, r in shard.failures], pa.string())},
                 schema=FAILURE_SCHEMA))
    store.write_table(
        store.path("dropped", f"dataset={shard.dataset}", store.part(shard.shard)),
        pa.table({"structure_id": pa.array([f for f, _ in shard.dropped], pa.string()),
                  "reason": pa.array([r for _, r in shard.dropped], pa.string())}))
