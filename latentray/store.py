"""Where outputs live, and how they are written: Parquet through pyarrow filesystems.

Layout under ``OUTPUT`` (any local path or URI that ``pyarrow.fs`` knows)::

    structures/dataset=D/part-00000.parquet            one row per structure read
    latents/dataset=D/model=M/layer=L/part-00000.parquet   one row per atom
    failures/dataset=D/model=M/part-00000.parquet     one row per structure a model could not process
    failures/dataset=D/model=input/part-00000.parquet one row per frame that could not be read
    dropped/dataset=D/part-00000.parquet              one row per structure a filter dropped
    manifest/dataset=D/model=M/part-00000.json         what produced the unit, with input hashes
    cumulants/dataset=D/model=M/layer=L/order=N/part-00000.parquet   one row per structure
    results/reconstruction.csv, results/reconstruction.parquet
    report.html, figures/*.png

Every file is written under a hidden temporary name and renamed into place when
complete, so a reader (or a re-run) never sees a partial file. pyarrow's dataset discovery
and DuckDB's ``*.parquet`` globs both skip the temporary names.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

LATENT_SCHEMA = pa.schema([
    ("structure_id", pa.string()),
    ("structure_index", pa.int64()),
    ("atom_index", pa.int32()),
    ("Z", pa.int16()),
    ("features", pa.list_(pa.float32())),
])

#: The ``model`` partition of ``failures/`` for frames that could not be read at all.
INPUT = "input"

FAILURE_SCHEMA = pa.schema([
    ("structure_id", pa.string()),
    ("structure_index", pa.int64()),
    ("n_atoms", pa.int64()),
    ("stage", pa.string()),
    ("reason", pa.string()),
])


class Store:
    """An output directory on any pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            import os

            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)

    # paths -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def display(self, path: str) -> str:
        """``path`` as a user would write it: with the URI's scheme (``s3://bucket/...``),
        without its options."""
        return f"{self.uri.split('://', 1)[0]}://{path}" if "://" in self.uri else path

    @staticmethod
    def part(shard: int, suffix: str = "parquet") -> str:
        return f"part-{shard:05d}.{suffix}"

    def latents_dir(self, dataset: str, model: str, layer: str) -> str:
        return self.path("latents", f"dataset={dataset}", f"model={model}", f"layer={layer}")

    def cumulants_dir(self, dataset: str, model: str, layer: str, order: int) -> str:
        return self.path("cumulants", f"dataset={dataset}", f"model={model}", f"layer={layer}",
                         f"order={order}")

    def failures_dir(self, dataset: str, model: str) -> str:
        return self.path("failures", f"dataset={dataset}", f"model={model}")

    def manifest_path(self, dataset: str, model: str, shard: int) -> str:
        return self.path("manifest", f"dataset={dataset}", f"model={model}", self.part(shard, "json"))

    def structures_path(self, dataset: str, shard: int) -> str:
        return self.path("structures", f"dataset={dataset}", self.part(shard))

    # atomic writes -----------------------------------------------------------------
    def _commit(self, final: str, write) -> str:
        directory, name = posixpath.split(final)
        self.fs.create_dir(directory, recursive=True)
        tmp = posixpath.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open_output_stream(tmp) as stream:
                write(stream)
            self.fs.move(tmp, final)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise
        return final

    def write_table(self, final: str, table: pa.Table) -> str:
        return self._commit(final, lambda s: pq.write_table(table, s, compression="zstd"))

    def write_bytes(self, final: str, data: bytes) -> str:
        return self._commit(final, lambda s: s.write(data))

    def write_json(self, final: str, obj: Any) -> str:
        return self.write_bytes(final, json.dumps(obj, indent=1, sort_keys=True).encode())

    # reads -------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_json(self, path: str) -> Any | None:
        try:
            with self.fs.open_input_stream(path) as stream:
                return json.loads(stream.read())
        except FileNotFoundError:
            return None

    def parquet_files(self, directory: str) -> list[str]:
        """The ``*.parquet`` files of one directory, sorted; not the hidden temporary ones
        (nor ``_``-prefixed ones); [] when there is no such directory."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        except FileNotFoundError:
            return []
        return sorted(i.path for i in infos if i.path.endswith(".parquet")
                      and not i.base_name.startswith((".", "_")))

    def read_table(self, directory: str, shards: int | None = None,
                   columns: list[str] | None = None) -> pa.Table | None:
        """All ``*.parquet`` parts of one directory (no partition columns added), or only
        ``columns`` of them; with ``shards``, only ``part-00000`` .. ``part-{shards - 1}`` (a
        run limited to fewer structures than an earlier one leaves the earlier run's later
        parts in place)."""
        files = self.parquet_files(directory)
        if shards is not None:
            wanted = {self.part(s) for s in range(shards)}
            files = [f for f in files if posixpath.basename(f) in wanted]
        if not files:
            return None
        return pa.concat_tables([pq.read_table(f, filesystem=self.fs, columns=columns)
                                 for f in files])

    def parquet_metadata(self, path: str) -> dict[str, str]:
        """The key-value metadata of a Parquet file ({} when there is no file)."""
        try:
            with self.fs.open_input_file(path) as f:
                meta = pq.read_schema(f).metadata or {}
        except (FileNotFoundError, OSError):
            return {}
        return {k.decode(): v.decode() for k, v in meta.items()}



def latent_table(structure_id: np.ndarray, structure_index: np.ndarray, n_atoms: np.ndarray,
                 numbers: np.ndarray, features: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """Per-atom rows; ``features`` (atoms, width) becomes a list<float32> column without a
    Python loop (a plain list, not fixed-size, so that files of different widths unify)."""
    n, width = features.shape
    values = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    atom_index = np.concatenate([np.arange(k, dtype=np.int32) for k in n_atoms]) if n else \
        np.zeros(0, np.int32)
    table = pa.table({
        "structure_id": pa.array(np.repeat(structure_id, n_atoms), pa.string()),
        "structure_index": pa.array(np.repeat(structure_index, n_atoms), pa.int64()),
        "atom_index": pa.array(atom_index),
        "Z": pa.array(numbers.astype(np.int16)),
        "features": pa.ListArray.from_arrays(offsets, values),
    }, schema=LATENT_SCHEMA)
    meta = {f"latentray.{k}": str(v) for k, v in metadata.items()}
    meta["latentray.width"] = str(width)
    return table.replace_schema_metadata(meta)


def features_matrix(column: pa.ChunkedArray | pa.Array, width: int | None = None) -> np.ndarray:
    """A list<float> column as an (n, width) numpy array (no copy per row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    if n == 0:
        return values.reshape(0, width or 0)
    width = width or len(values) // n
    if len(values) != n * width:
        raise ValueError(f"ragged features column: {len(values)} values for {n} rows of width {width}")
    return values.reshape(n, width)
