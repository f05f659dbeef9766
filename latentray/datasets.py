"""Datasets: read structure files into shards of plain arrays, with stable ids.

A :class:`StructureShard` is the unit of input of the extraction stage: a few hundred
structures as flat numpy arrays (cheap to hash, to send through Ray's object store, and to
turn back into ``ase.Atoms`` inside an actor). Shard ``k`` of a dataset holds the
structures ``k * shard_size .. (k + 1) * shard_size - 1`` in dataset order, so a shard's
content, and so its hash, changes only when its structures do.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np

BUILTIN = {"mad-val-1000": "mad-val-1000.xyz"}


class DatasetError(ValueError):
    """Input that cannot be read; the message names the file and the frame."""


def resolve_paths(path: str) -> list[Path]:
    """``builtin:NAME``, a file path, or a glob -> the files to read, sorted."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DatasetError(f"unknown builtin dataset {name!r}; known: {sorted(BUILTIN)}")
        return [Path(str(resources.files("latentray") / "data" / BUILTIN[name]))]
    matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    files = [Path(m) for m in matches if Path(m).is_file()]
    if not files:
        raise DatasetError(f"no file matches dataset path {path!r}")
    return files


@dataclass
class StructureShard:
    """Structures ``structure_index`` of dataset ``dataset``, as flat arrays."""

    dataset: str
    shard: int
    structure_id: np.ndarray  # (S,) str: "<dataset>:<id in the dataset>"
    structure_index: np.ndarray  # (S,) int64, position in the dataset
    n_atoms: np.ndarray  # (S,) int64
    numbers: np.ndarray  # (A,) int64, all atoms of the shard
    positions: np.ndarray  # (A, 3) float64, Angstrom
    cells: np.ndarray  # (S, 3, 3) float64
    pbc: np.ndarray  # (S, 3) bool
    subset: np.ndarray  # (S,) str, "" when the dataset has no label
    energy: np.ndarray  # (S,) float64 total energy, NaN where absent

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


def _frames_extxyz(path: Path) -> Iterator:
    from ase.io import iread

    index = -1
    try:
        for index, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
            yield atoms
    except Exception as exc:  # ASE raises many types for a malformed file
        raise DatasetError(f"{path}: cannot parse frame {index + 1}: {exc}") from exc


def read_structures(name: str, path: str, fmt: str = "extxyz",
                    subset_key: str | None = "subset", limit: int | None = None) -> Iterator[dict]:
    """Yield one record per structure, in dataset order, reading files lazily."""
    if fmt != "extxyz":
        raise DatasetError(f"dataset {name}: format {fmt!r} is not supported")
    index = 0
    for file in resolve_paths(path):
        for frame, atoms in enumerate(_frames_extxyz(file)):
            if limit is not None and index >= limit:
                return
            info = atoms.info
            native = info.get("id", info.get("structure_id", index))
            energy = info.get("energy")
            if energy is None and atoms.calc is not None:
                energy = atoms.calc.results.get("energy")
            yield {
                "structure_id": f"{name}:{native}",
                "structure_index": index,
                "numbers": atoms.numbers.astype(np.int64),
                "positions": np.asarray(atoms.positions, dtype=np.float64),
                "cell": np.asarray(atoms.cell.array, dtype=np.float64),
                "pbc": np.asarray(atoms.pbc, dtype=bool),
                "subset": str(info.get(subset_key, "")) if subset_key else "",
                "energy": float(energy) if energy is not None else np.nan,
                "source": f"{file}:{frame}",
            }
            index += 1


def _shard_from_records(name: str, shard: int, records: list[dict]) -> StructureShard:
    return StructureShard(
        dataset=name,
        shard=shard,
        structure_id=np.array([r["structure_id"] for r in records], dtype=object),
        structure_index=np.array([r["structure_index"] for r in records], dtype=np.int64),
        n_atoms=np.array([len(r["numbers"]) for r in records], dtype=np.int64),
        numbers=np.concatenate([r["numbers"] for r in records]),
        positions=np.concatenate([r["positions"] for r in records]),
        cells=np.stack([r["cell"] for r in records]),
        pbc=np.stack([r["pbc"] for r in records]),
        subset=np.array([r["subset"] for r in records], dtype=object),
        energy=np.array([r["energy"] for r in records], dtype=np.float64),
    )


def iter_shards(name: str, path: str, fmt: str = "extxyz", subset_key: str | None = "subset",
                shard_size: int = 250, limit: int | None = None) -> Iterator[StructureShard]:
    """Group the dataset's structures into shards of ``shard_size`` in dataset order."""
    records: list[dict] = []
    shard = 0
    for record in read_structures(name, path, fmt, subset_key, limit):
        records.append(record)
        if len(records) == shard_size:
            yield _shard_from_records(name, shard, records)
            records, shard = [], shard + 1
    if records:
        yield _shard_from_records(name, shard, records)
    elif shard == 0:
        raise DatasetError(f"dataset {name}: {path} holds no structure")
