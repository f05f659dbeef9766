"""Row blocks for the scalable fits: the rows two models share, read one shard at a time.

A :class:`PairSource` is a :class:`latentray.streaming.BlockSource` over an output directory:
block ``i`` is dataset shard ``shards[i]``; its rows are the atoms (``latents/``) or the
structures (``cumulants/``) of the structures that *both* models processed, in dataset order
(structure_index, then atom_index), exactly the rows the in-memory path compares. Only the
columns a pass needs are read; a block is never more than one shard of two models.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..reader import Run
from ..store import Store, features_matrix
from ..method.streaming import Block, SidesBlock

_ID_COLUMNS = ["structure_id", "structure_index", "atom_index"]


def _row_codes(table: pa.Table, keys: list[str]) -> np.ndarray:
    """(structure_index, atom_index) of each row as one sortable integer."""
    code = table["structure_index"].to_numpy().astype(np.int64) << 32
    if len(keys) > 1:
        code |= table["atom_index"].to_numpy().astype(np.int64)
    return code


def _in_order(table: pa.Table, keys: list[str]) -> pa.Table:
    """``table`` sorted by ``keys`` (structure_index, then atom_index); as it is when it is
    already in that order (as written: no copy of its features)."""
    code = _row_codes(table, keys)
    if np.all(code[1:] >= code[:-1]):
        return table
    return table.sort_by([(k, "ascending") for k in keys])


@dataclass
class PairSource:
    """Source ``(model, layer)`` -> target ``(model, layer)`` rows of ``dataset``, by shard.

    ``kind``: ``"latents"`` (one row per atom) or ``"cumulants"`` (one row per structure: the
    descriptors [k1 .. k_n] with ``n`` from ``orders``; ``sum_pooling``: k1 times the
    structure's atom count, so that the mean becomes the sum).
    ``stratify``: give the split each row's subset as its stratum.
    """

    uri: str
    dataset: str
    source: tuple[str, str]
    target: tuple[str, str]
    shards: list[int]
    kind: str = "latents"
    orders: tuple[int, int] = (1, 1)
    sum_pooling: bool = False
    stratify: bool = True

    def __post_init__(self):
        if self.kind not in ("latents", "cumulants"):
            raise ValueError(f"kind must be 'latents' or 'cumulants', got {self.kind!r}")
        if self.sum_pooling and self.kind != "cumulants":
            raise ValueError("sum_pooling needs kind='cumulants'")
        self.n_blocks = len(self.shards)

    def _read(self, k: int, i: int, columns: list[str]):
        """Side ``k`` (0: source, 1: target) of block ``i``, and where it was read from."""
        run, (model, layer) = Run(self.uri), (self.source, self.target)[k]
        store, shard = run.store, self.shards[i]
        if self.kind == "cumulants":
            table = run.cumulants_table(self.dataset, model, layer, self.orders[k], [shard],
                                        columns)
            return table, store.cumulants_dir(self.dataset, model, layer, 1)
        return (run.latents_table(self.dataset, model, layer, shard=shard, columns=columns),
                posixpath.join(store.latents_dir(self.dataset, model, layer), store.part(shard)))

    def _columns(self, features: bool) -> list[str]:
        ids = _ID_COLUMNS if self.kind == "latents" else ["structure_id", "structure_index"]
        extra = ["Z"] if self.kind == "latents" else ["subset", "n_atoms"]
        return ids + extra + (["features"] if features else [])

    def _aligned(self, i: int, features: bool):
        """Both sides' tables restricted to the structures both processed, in dataset order."""
        (a, path_a), (b, path_b) = (self._read(k, i, self._columns(features)) for k in (0, 1))
        keys = ["structure_index"] + (["atom_index"] if self.kind == "latents" else [])
        index_a, index_b = a["structure_index"].to_numpy(), b["structure_index"].to_numpy()
        if not np.array_equal(index_a, index_b):  # (as written, both sides' rows are the same)
            common = np.intersect1d(index_a, index_b)
            a, b = (t.filter(np.isin(t["structure_index"].to_numpy(), common)) for t in (a, b))
        a, b = (_in_order(t, keys) for t in (a, b))
        for k in keys + (["Z"] if self.kind == "latents" else ["n_atoms"]):
            if not np.array_equal(a[k].to_numpy(), b[k].to_numpy()):
                raise RuntimeError(f"{path_a} and {path_b}: rows of the common structures do "
                                   f"not align on {k!r}")
        return a, b

    def _subset(self, i: int, table) -> np.ndarray:
        if self.kind == "cumulants":
            return np.asarray(table["subset"].to_numpy(zero_copy_only=False), dtype=object)
        store = Store(self.uri)
        structures = pq.read_table(store.structures_path(self.dataset, self.shards[i]),
                                   columns=["structure_index", "subset"], filesystem=store.fs)
        index = structures["structure_index"].to_numpy()
        subset = np.asarray(structures["subset"].to_numpy(zero_copy_only=False), dtype=object)
        return subset[np.searchsorted(index, table["structure_index"].to_numpy())]

    def _ids(self, i: int, table) -> dict[str, np.ndarray]:
        n = table.num_rows
        return {
            "structure_id": np.asarray(table["structure_id"].to_numpy(zero_copy_only=False)),
            "atom_index": (table["atom_index"].to_numpy() if self.kind == "latents"
                           else np.full(n, -1, np.int64)),
            "stratum": self._subset(i, table) if self.stratify else None,
        }

    def ids(self, i: int) -> dict[str, np.ndarray]:
        a, _ = self._aligned(i, features=False)
        return self._ids(i, a)

    def read(self, i: int, offset: int) -> Block:
        a, b = self._aligned(i, features=True)
        ids = self._ids(i, a)
        X, Y = (features_matrix(t["features"], int(t.schema.metadata[b"latentray.width"]))
                for t in (a, b))
        if self.sum_pooling:
            n_atoms = a["n_atoms"].to_numpy().astype(np.float64)[:, None]
            X, Y = X * n_atoms, Y * n_atoms
        groups = {"subset": ids["stratum"] if self.stratify else self._subset(i, a)}
        if self.kind == "latents":
            groups["Z"] = a["Z"].to_numpy()
        return Block(X=X, Y=Y, row=offset + np.arange(a.num_rows), ids=ids, groups=groups)


@dataclass
class ModelSides:
    """Several ``(model, layer)`` sides of ``dataset``, by shard, for one pass over all their
    pairs (:func:`latentray.method.streaming.all_pairs_at_scale`).

    Block ``i`` is dataset shard ``shards[i]``: the union of the sides' rows (atoms or
    structures) in dataset order, each side's features where its model processed the
    structure (zeros elsewhere, ``present`` says which). ``kind``, ``order``,
    ``sum_pooling`` and ``stratify`` as in :class:`PairSource` (one order for every side).
    """

    uri: str
    dataset: str
    sides: list[tuple[str, str]]
    shards: list[int]
    widths: list[int]
    kind: str = "latents"
    order: int = 1
    sum_pooling: bool = False
    stratify: bool = True

    def __post_init__(self):
        self.n_blocks = len(self.shards)
        # one reader per side: a PairSource of the side with itself reads its shards and ids
        self._readers = [PairSource(self.uri, self.dataset, side, side, self.shards, self.kind,
                                    (self.order, self.order), self.sum_pooling, self.stratify)
                         for side in self.sides]

    def _union(self, i: int):
        """Every side's id columns of block ``i``, and the union of their rows in dataset
        order with, per side, where its rows lie in the union."""
        tables = [reader._read(0, i, reader._columns(False)) for reader in self._readers]
        keys = ["structure_index"] + (["atom_index"] if self.kind == "latents" else [])
        tables = [(_in_order(t, keys), path) for t, path in tables]
        codes = [_row_codes(t, keys) for t, _ in tables]
        union, first = np.unique(np.concatenate(codes), return_index=True)
        where = [np.searchsorted(union, c) for c in codes]
        check = "Z" if self.kind == "latents" else "n_atoms"
        joined = pa.concat_tables([t.select(keys + [check, "structure_id"]
                                            + (["subset"] if self.kind == "cumulants" else []))
                                   for t, _ in tables])
        rows = joined.take(pa.array(first))
        for (t, path), w in zip(tables, where):
            if not np.array_equal(t[check].to_numpy(), rows[check].to_numpy()[w]):
                raise RuntimeError(f"{path}: rows of shared structures do not align on "
                                   f"{check!r} with the other sides")
        return tables, rows, where

    def _present(self, n: int, where) -> np.ndarray:
        present = np.zeros((n, len(self.sides)), bool)
        for m, w in enumerate(where):
            present[w, m] = True
        return present

    def ids(self, i: int) -> dict[str, np.ndarray]:
        _, rows, where = self._union(i)
        ids = self._readers[0]._ids(i, rows)
        ids["present"] = self._present(rows.num_rows, where)
        return ids

    def read(self, i: int, offset: int) -> SidesBlock:
        ids_tables, rows, where = self._union(i)
        n = rows.num_rows
        ids = self._readers[0]._ids(i, rows)
        X = self._features_at(i, ids_tables, where, np.arange(n))
        groups = {"subset": ids["stratum"] if self.stratify else self._readers[0]._subset(i, rows)}
        if self.kind == "latents":
            groups["Z"] = rows["Z"].to_numpy()
        return SidesBlock(X=X, present=self._present(n, where), row=offset + np.arange(n),
                          ids=ids, groups=groups)

    def take(self, i: int, offset: int, wanted: np.ndarray) -> tuple[np.ndarray, list]:
        """The rows of block ``i`` whose numbers are in ``wanted`` (sorted): their numbers and
        every side's features there, as :meth:`read` gives them."""
        ids_tables, rows, where = self._union(i)
        keep = np.flatnonzero(np.isin(offset + np.arange(rows.num_rows), wanted))
        return offset + keep, self._features_at(i, ids_tables, where, keep)

    def _features_at(self, i: int, ids_tables: list, where: list, keep: np.ndarray) -> list:
        """Every side's features at the union's rows ``keep`` (zeros where the side has no
        row), as stored (float32 latents, float64 cumulants; summed: times the structure's
        atom count). One side's file is in memory at a time: its rows are copied out, then
        its table is dropped and the Arrow pool's freed memory returned to the system (Arrow's
        allocator keeps it otherwise, and a shard of 8 models' latents is 0.8 GB)."""
        keys = ["structure_index"] + (["atom_index"] if self.kind == "latents" else [])
        out = []
        for m, (reader, w) in enumerate(zip(self._readers, where)):
            table, path = reader._read(0, i, reader._columns(True))
            table = _in_order(table, keys)
            if not np.array_equal(_row_codes(table, keys), _row_codes(ids_tables[m][0], keys)):
                raise RuntimeError(f"{path}: its rows changed between two reads")
            part = features_matrix(table["features"],
                                   int(table.schema.metadata[b"latentray.width"]))
            if self.sum_pooling:
                part = part * table["n_atoms"].to_numpy().astype(np.float64)[:, None]
            if len(w) == len(keep) and np.array_equal(w, keep):  # every row, all taken
                full = np.array(part, copy=True)
            else:
                at = np.searchsorted(w, keep)
                has = at < len(w)
                has[has] = w[at[has]] == keep[has]
                full = np.zeros((len(keep), self.widths[m]), part.dtype)
                full[has] = part[at[has]]
            out.append(full)
            del table, part
            pa.default_memory_pool().release_unused()
        return out
