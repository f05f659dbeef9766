"""Datasets: read structure files, streaming, into shards of plain arrays with stable ids.

Formats (all read frame by frame, memory flat in the file size):

* ``extxyz``: ``ase.io.iread``; id: the ``id`` (or ``structure_id``) info key, else the
  frame's index in the dataset;
* ``mptrj-json``: the native MPtrj JSON ``{mp_id: {frame_id: {"structure": pymatgen dict,
  ...}}}``, parsed incrementally with ``ijson`` one material at a time; cartesian positions
  are ``abc @ lattice.matrix`` (what ``pymatgen.core.Structure.from_dict`` computes), no
  pymatgen object is built; id: the frame id (``mp-1234-0-3``); energy:
  ``corrected_total_energy``; ``subset_key`` may name any frame field (``mp_id``, ...) or
  ``n_elements``;
* ``ase-db``: an ASE database (sqlite), row by row; id: the row id; subset from the row's
  key-value pairs;
* ``parquet``: latentray's structures Parquet (``latentray prepare`` writes it; so does every
  run, under ``OUTPUT/structures``); id: its ``native_id``.

Every structure id is ``<dataset>:<native id>``. A :class:`StructureShard` is the unit of
input of the extraction stage: shard ``k`` holds the kept structures ``k * shard_size ..
(k + 1) * shard_size - 1`` in dataset order, so its content hash changes only when its
structures do. Frames that cannot be read raise :class:`DatasetError` naming the file and the
frame, or, with ``on_error="skip"``, become *failures* (with the reason); frames that a
filter drops are *dropped* (with the filter): frames read = structures + failures + dropped.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np

from .geometry import geometry_problem
from .shards import StructureShard

BUILTIN = {"mad-val-1000": "mad-val-1000.xyz"}
FORMATS = ("extxyz", "mptrj-json", "ase-db", "parquet")


class DatasetError(ValueError):
    """Input that cannot be read; the message names the file and the frame."""


class FrameError(ValueError):
    """One frame is invalid (the reason); the reader adds the file and the frame id."""


def resolve_paths(path: str) -> list[Path | str]:
    """``builtin:NAME``, a file or directory path, or a glob -> the files to read, sorted.
    A URI (``s3://bucket/prepared/structures/dataset=mptrj``, any scheme pyarrow knows) gives
    URIs of the Parquet parts it holds, with the URI's query (endpoint options) kept."""
    if "://" in path:
        return _resolve_uri(path)
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise DatasetError(f"unknown builtin dataset {name!r}; known: {sorted(BUILTIN)}")
        return [Path(str(resources.files("latentray") / "data" / BUILTIN[name]))]
    if Path(path).is_dir():  # a directory of Parquet parts
        files = sorted(p for p in Path(path).glob("*.parquet") if not p.name.startswith((".", "_")))
    else:
        matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
        files = [Path(m) for m in matches if Path(m).is_file()]
    if not files:
        raise DatasetError(f"no file matches dataset path {path!r}")
    return files


def _resolve_uri(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    from .store import Store

    base, _, query = uri.partition("?")
    scheme = base.split("://", 1)[0]
    try:
        store = Store(uri)
        info = store.fs.get_file_info(store.root)
        if info.type == pafs.FileType.Directory:
            files = store.parquet_files(store.root)
        else:
            files = [store.root] if info.type == pafs.FileType.File else []
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read dataset path {uri!r}: {exc}") from None
    if not files:
        raise DatasetError(f"no file matches dataset path {uri!r}")
    return [f"{scheme}://{f}" + (f"?{query}" if query else "") for f in files]


def _open_parquet(path: Path | str):
    """A ``pyarrow.parquet.ParquetFile`` of a local path or a URI."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if isinstance(path, str) and "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        return pq.ParquetFile(fs.open_input_file(inner))
    return pq.ParquetFile(str(path))


# --------------------------------------------------------------------------------------------
# one frame: validated plain arrays


@dataclass
class Frame:
    """One structure as read, before it gets its place in the dataset."""

    native_id: str
    numbers: np.ndarray  # (n,) int64
    positions: np.ndarray  # (n, 3) float64, Angstrom
    cell: np.ndarray  # (3, 3) float64
    pbc: np.ndarray  # (3,) bool
    subset: str = ""
    energy: float = np.nan
    where: str = ""  # file and position, for messages


def _checked(native_id, numbers, positions, cell, pbc, subset="", energy=None, where="") -> Frame:
    """A :class:`Frame`, or :class:`FrameError` saying what is wrong with it."""
    try:
        numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        pbc = np.asarray(pbc, dtype=bool).reshape(-1)
        pbc = np.repeat(pbc, 3) if pbc.size == 1 else pbc.reshape(3)
    except (TypeError, ValueError) as exc:
        raise FrameError(f"non-numeric or malformed geometry ({exc})") from None
    problem = geometry_problem(numbers, positions, cell, pbc)
    if problem:
        raise FrameError(problem)
    try:
        energy = np.nan if energy is None else float(energy)
    except (TypeError, ValueError):
        raise FrameError(f"non-numeric energy {energy!r}") from None
    return Frame(native_id=str(native_id), numbers=numbers, positions=positions, cell=cell,
                 pbc=pbc, subset="" if subset is None else str(subset), energy=energy,
                 where=where)


def _symbol_numbers(symbols) -> np.ndarray:
    from ase.data import atomic_numbers

    try:
        return np.array([atomic_numbers[s] for s in symbols], dtype=np.int64)
    except KeyError as exc:
        raise FrameError(f"unknown element symbol {exc.args[0]!r}") from None


# --------------------------------------------------------------------------------------------
# readers: yield Frame, or (native id, FrameError) for a frame that cannot be used


def _read_extxyz(path: Path, subset_key: str | None, start_index: int):
    from ase.io import iread

    frame = -1
    try:
        for frame, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
            info = atoms.info
            native = info.get("id", info.get("structure_id", start_index + frame))
            energy = info.get("energy")
            if energy is None and atoms.calc is not None:
                energy = atoms.calc.results.get("energy")
            try:
                yield _checked(native, atoms.numbers, atoms.positions, atoms.cell.array,
                               atoms.pbc, info.get(subset_key, "") if subset_key else "",
                               energy, f"{path}:{frame}")
            except FrameError as exc:
                yield str(native), exc
    except Exception as exc:  # ASE raises many types for a malformed file
        raise DatasetError(f"{path}: cannot parse frame {frame + 1}: {exc}") from exc


def _mptrj_frame(frame_id: str, doc: dict, subset_key: str | None, where: str) -> Frame:
    try:
        structure = doc["structure"]
        lattice = structure["lattice"]
        matrix = np.asarray(lattice["matrix"], dtype=np.float64)
        sites = structure["sites"]
        symbols = []
        for site in sites:
            species = site["species"]
            if len(species) != 1 or float(species[0].get("occu", 1)) != 1:
                raise FrameError("disordered site (partial occupancy): not a structure a "
                                 "model can run")
            symbols.append(species[0]["element"])
        abc = np.asarray([site["abc"] for site in sites], dtype=np.float64).reshape(-1, 3)
        pbc = lattice.get("pbc", (True, True, True))
        energy = doc.get("corrected_total_energy")
    except KeyError as exc:
        raise FrameError(f"missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise FrameError(f"non-numeric or malformed value ({exc})") from None
    numbers = _symbol_numbers(symbols)
    if subset_key == "n_elements":
        subset = str(len(set(symbols)))
    elif subset_key:
        subset = doc.get(subset_key, "")
    else:
        subset = ""
    return _checked(frame_id, numbers, abc @ matrix, matrix, pbc, subset, energy, where)


def _read_mptrj(path: Path, subset_key: str | None, start_index: int):
    import ijson

    last = None
    with open(path, "rb") as stream:
        try:
            for mp_id, frames in ijson.kvitems(stream, "", use_float=True):
                if not isinstance(frames, dict):
                    raise DatasetError(f"{path}: {mp_id}: expected an object of frames, got "
                                       f"{type(frames).__name__}")
                for frame_id, doc in frames.items():
                    last = frame_id
                    try:
                        if not isinstance(doc, dict):
                            raise FrameError(f"expected an object, got {type(doc).__name__}")
                        yield _mptrj_frame(frame_id, doc, subset_key, f"{path}:{frame_id}")
                    except FrameError as exc:
                        yield frame_id, exc
        except ijson.JSONError as exc:  # the rest of the file cannot be read: one failure
            after = f"after frame {last}" if last else "in the first material"
            where = stream.tell()
            yield f"(rest of {path.name} from byte {where})", FrameError(
                f"invalid or truncated JSON {after} (near byte {where}): "
                f"{str(exc).splitlines()[0]}")


def _read_ase_db(path: Path, subset_key: str | None, start_index: int):
    import ase.db

    try:
        db = ase.db.connect(str(path), type="db")
        rows = db.select()
        for row in rows:
            try:
                atoms = row.toatoms()
                pairs = row.key_value_pairs
                yield _checked(row.id, atoms.numbers, atoms.positions, atoms.cell.array,
                               atoms.pbc, pairs.get(subset_key, "") if subset_key else "",
                               row.get("energy"), f"{path}:id={row.id}")
            except FrameError as exc:
                yield str(row.id), exc
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read the ASE database: {exc}") from exc


def _read_parquet(path: Path | str, subset_key: str | None, start_index: int):
    import pyarrow.compute as pc

    def flat(column, dtype):
        """A list column as (values, offsets) numpy arrays: no Python object per value."""
        return (pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype),
                column.offsets.to_numpy())

    try:
        file = _open_parquet(path)
        for batch in file.iter_batches(batch_size=4096, columns=list(STRUCTURE_COLUMNS)):
            numbers, n_off = flat(batch.column("numbers"), np.int64)
            positions, p_off = flat(batch.column("positions"), np.float64)
            cells, c_off = flat(batch.column("cell"), np.float64)
            pbc, b_off = flat(batch.column("pbc"), bool)
            native_ids = batch.column("native_id").to_pylist()
            subsets = batch.column("subset").to_pylist()
            energies = batch.column("energy").to_numpy(zero_copy_only=False)
            for i, native in enumerate(native_ids):
                try:
                    yield _checked(native, numbers[n_off[i]: n_off[i + 1]],
                                   positions[p_off[i]: p_off[i + 1]],
                                   cells[c_off[i]: c_off[i + 1]], pbc[b_off[i]: b_off[i + 1]],
                                   subsets[i], energies[i],
                                   f"{path}:{native}")
                except FrameError as exc:
                    yield native, exc
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: not a latentray structures Parquet file: {exc}") from exc


READERS = {"extxyz": _read_extxyz, "mptrj-json": _read_mptrj, "ase-db": _read_ase_db,
           "parquet": _read_parquet}
STRUCTURE_COLUMNS = ("structure_id", "native_id", "structure_index", "n_atoms", "numbers",
                     "positions", "cell", "pbc", "subset", "energy")


# --------------------------------------------------------------------------------------------
# filters


@dataclass(frozen=True)
class Filters:
    """The paper's data filters; a structure that fails one is dropped (and counted).

    ``min_atoms``: drop smaller structures (2: single-atom frames); ``exclude_elements``:
    drop structures holding any of these symbols; ``max_neighbour_distance``: drop structures
    with an atom whose nearest neighbour (periodic images included) is farther than this (A):
    isolated atoms.
    """

    min_atoms: int = 1
    exclude_elements: tuple[str, ...] = ()
    max_neighbour_distance: float | None = None

    def reason(self, frame: Frame) -> str | None:
        """Why ``frame`` is dropped, or None when it is kept."""
        if len(frame.numbers) < self.min_atoms:
            return f"min_atoms: {len(frame.numbers)} atom(s) < {self.min_atoms}"
        if self.exclude_elements:
            from ase.data import chemical_symbols

            present = sorted({chemical_symbols[z] for z in frame.numbers}
                             & set(self.exclude_elements))
            if present:
                return f"exclude_elements: contains {', '.join(present)}"
        if self.max_neighbour_distance is not None:
            from ase.neighborlist import neighbor_list

            from ase import Atoms

            atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell,
                          pbc=frame.pbc)
            i = neighbor_list("i", atoms, float(self.max_neighbour_distance))
            isolated = np.setdiff1d(np.arange(len(atoms)), i)
            if len(isolated):
                return (f"max_neighbour_distance: atom {int(isolated[0])} has no neighbour "
                        f"within {self.max_neighbour_distance} A")
        return None


# --------------------------------------------------------------------------------------------
# the dataset, in shards




def _shard(name: str, shard: int, frames: list[Frame], first_index: int,
           failures: list, dropped: list) -> StructureShard:
    def stack(arrays, shape):
        return np.concatenate(arrays) if arrays else np.zeros(shape)

    return StructureShard(
        dataset=name,
        shard=shard,
        structure_id=np.array([f"{name}:{f.native_id}" for f in frames], dtype=object),
        structure_index=np.arange(first_index, first_index + len(frames), dtype=np.int64),
        n_atoms=np.array([len(f.numbers) for f in frames], dtype=np.int64),
        numbers=stack([f.numbers for f in frames], (0,)).astype(np.int64),
        positions=stack([f.positions for f in frames], (0, 3)),
        cells=np.stack([f.cell for f in frames]) if frames else np.zeros((0, 3, 3)),
        pbc=np.stack([f.pbc for f in frames]) if frames else np.zeros((0, 3), bool),
        subset=np.array([f.subset for f in frames], dtype=object),
        energy=np.array([f.energy for f in frames], dtype=np.float64),
        failures=failures, dropped=dropped,
    )


def iter_frames(name: str, path: str, fmt: str = "extxyz", subset_key: str | None = "subset",
                on_error: str = "raise") -> Iterator[Frame | tuple[str, str]]:
    """Every frame of every file in dataset order: a :class:`Frame`, or ``(structure_id,
    reason)`` for one that cannot be used (``on_error="skip"``; ``"raise"``: DatasetError)."""
    if fmt not in READERS:
        raise DatasetError(f"dataset {name}: format {fmt!r} is not supported; "
                           f"choose from {list(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise DatasetError(f"dataset {name}: on_error must be 'raise' or 'skip', got {on_error!r}")
    index = 0
    files = resolve_paths(path)
    if fmt != "parquet" and any(isinstance(f, str) for f in files):
        raise DatasetError(f"dataset {name}: format {fmt!r} reads local files only; convert it "
                           f"first (`latentray prepare ... --output URI`) and read the Parquet")
    for file in files:
        for item in READERS[fmt](file, subset_key, index):
            if isinstance(item, Frame):
                yield item
            else:
                native, exc = item
                if on_error == "raise":
                    raise DatasetError(f"{file}: frame {native}: {exc} (set on_error: skip to "
                                       f"record it in failures/ and go on)")
                yield f"{name}:{native}", str(exc)
            index += 1


def iter_shards(name: str, path: str, fmt: str = "extxyz", subset_key: str | None = "subset",
                shard_size: int = 250, limit: int | None = None, filters: Filters = Filters(),
                on_error: str = "raise") -> Iterator[StructureShard]:
    """Group the dataset's kept structures into shards of ``shard_size`` in dataset order;
    ``limit``: stop after that many kept structures."""
    frames: list[Frame] = []
    failures: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    shard = kept = 0
    for item in iter_frames(name, path, fmt, subset_key, on_error):
        if limit is not None and kept >= limit:
            break
        if not isinstance(item, Frame):
            failures.append(item)
            continue
        reason = filters.reason(item)
        if reason is not None:
            dropped.append((f"{name}:{item.native_id}", reason))
            continue
        frames.append(item)
        kept += 1
        if len(frames) == shard_size:
            yield _shard(name, shard, frames, kept - len(frames), failures, dropped)
            frames, failures, dropped, shard = [], [], [], shard + 1
    if frames or failures or dropped or shard == 0:
        if not frames and shard == 0 and not failures and not dropped:
            raise DatasetError(f"dataset {name}: {path} holds no structure")
        yield _shard(name, shard, frames, kept - len(frames), failures, dropped)


