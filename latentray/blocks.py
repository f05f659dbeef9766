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
import pyarrow.parquet as pq

from .store import Store, features_matrix
from .streaming import Block

_ID_COLUMNS = ["structure_id", "structure_index", "atom_index"]


@dataclass
class PairSource:
    """Source ``(model, layer)`` -> target ``(model, layer)`` rows of ``dataset``, by shard.

    ``kind``: ``"latents"`` (one row per atom) or ``"cumulants"`` (one row per structure; the
    first ``n_columns`` feature columns, e.g. ``order * width``, or all when None;
    ``sum_pooling``: times the structure's atom count, so that k1, the mean, becomes the sum).
    ``stratify``: give the split each row's subset as its stratum.
    """

    uri: str
    dataset: str
    source: tuple[str, str]
    target: tuple[str, str]
    shards: list[int]
    kind: str = "latents"
    n_columns: tuple[int | None, int | None] = (None, None)
    sum_pooling: bool = False
    stratify: bool = True

    def __post_init__(self):
        if self.kind not in ("latents", "cumulants"):
            raise ValueError(f"kind must be 'latents' or 'cumulants', got {self.kind!r}")
        if self.sum_pooling and self.kind != "cumulants":
            raise ValueError("sum_pooling needs kind='cumulants'")
        self.n_blocks = len(self.shards)

    def _file(self, model: str, layer: str, i: int) -> tuple[Store, str]:
        store = Store(self.uri)
        return store, posixpath.join(
            store.path(self.kind, f"dataset={self.dataset}", f"model={model}", f"layer={layer}"),
            store.part(self.shards[i]))

    def _read(self, side: tuple[str, str], i: int, columns: list[str]):
        store, path = self._file(*side, i)
        try:
            table = pq.read_table(path, columns=columns, filesystem=store.fs)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing ({self.kind} of {side[0]} {side[1]}, "
                                    f"shard {self.shards[i]})") from None
        return table, path

    def _columns(self, features: bool) -> list[str]:
        ids = _ID_COLUMNS if self.kind == "latents" else ["structure_id", "structure_index"]
        extra = ["Z"] if self.kind == "latents" else ["subset", "n_atoms"]
        return ids + extra + (["features"] if features else [])

    def _aligned(self, i: int, features: bool):
        """Both sides' tables restricted to the structures both processed, in dataset order."""
        (a, path_a), (b, path_b) = (self._read(side, i, self._columns(features))
                                    for side in (self.source, self.target))
        keys = ["structure_index"] + (["atom_index"] if self.kind == "latents" else [])
        common = np.intersect1d(a["structure_index"].to_numpy(), b["structure_index"].to_numpy())
        out = []
        for t in (a, b):
            t = t.filter(np.isin(t["structure_index"].to_numpy(), common))
            out.append(t.sort_by([(k, "ascending") for k in keys]))
        a, b = out
        for k in keys + (["Z"] if self.kind == "latents" else ["n_atoms"]):
            if not np.array_equal(a[k].to_numpy(), b[k].to_numpy()):
                raise RuntimeError(f"{path_a} and {path_b}: rows of the common structures do "
                                   f"not align on {k!r}")
        return a, b

    def _width(self, table) -> int:
        """Values per row: the layer's width (latents), or 8 orders of it (cumulants)."""
        meta = table.schema.metadata or {}
        width = int(meta[b"latentray.width"])
        return width * int(meta.get(b"latentray.orders", b"1")) if self.kind == "cumulants" \
            else width

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
        X, Y = (features_matrix(t["features"], self._width(t))[:, :n]
                for t, n in zip((a, b), self.n_columns))
        if self.sum_pooling:
            n_atoms = a["n_atoms"].to_numpy().astype(np.float64)[:, None]
            X, Y = X * n_atoms, Y * n_atoms
        groups = {"subset": ids["stratum"] if self.stratify else self._subset(i, a)}
        if self.kind == "latents":
            groups["Z"] = a["Z"].to_numpy()
        return Block(X=X, Y=Y, row=offset + np.arange(a.num_rows), ids=ids, groups=groups)
