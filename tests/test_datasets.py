"""Datasets: every reader against an independent one (pymatgen, ASE), filters, bad input,
and flat memory on a generated MPtrj-size JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from ase.io import read, write

from latentray.cli import main
from latentray.datasets import DatasetError, Filters, iter_frames, iter_shards, resolve_paths

DATA = Path(__file__).parent / "data"
MPTRJ = DATA / "mptrj-sample.json"
MAD = str(resolve_paths("builtin:mad-val-1000")[0])


def _frames(path, fmt, **kw):
    return [f for s in iter_shards("d", str(path), fmt, shard_size=4, **kw) for f in _unpack(s)]


def _unpack(shard):
    for i in range(len(shard)):
        start, stop = shard.offsets[i], shard.offsets[i + 1]
        yield {"id": shard.structure_id[i], "numbers": shard.numbers[start:stop],
               "positions": shard.positions[start:stop], "cell": shard.cells[i],
               "pbc": shard.pbc[i], "subset": shard.subset[i], "energy": shard.energy[i],
               "index": shard.structure_index[i]}


def _mptrj_docs():
    with open(MPTRJ) as f:
        return json.load(f)


def test_mptrj_json_equals_pymatgen_structures():
    from pymatgen.core import Structure

    docs = _mptrj_docs()
    expected = [(fid, doc) for material in docs.values() for fid, doc in material.items()]
    got = _frames(MPTRJ, "mptrj-json", subset_key="mp_id")
    assert len(got) == len(expected) == 11
    for g, (frame_id, doc) in zip(got, expected):
        s = Structure.from_dict(doc["structure"])
        assert g["id"] == f"d:{frame_id}"
        np.testing.assert_allclose(g["positions"], s.cart_coords, rtol=0, atol=1e-12)
        np.testing.assert_allclose(g["cell"], s.lattice.matrix, rtol=0, atol=1e-12)
        assert g["numbers"].tolist() == list(s.atomic_numbers)
        assert g["pbc"].tolist() == list(s.lattice.pbc)
        assert g["subset"] == doc["mp_id"] and g["energy"] == doc["corrected_total_energy"]
    assert [g["index"] for g in got] == list(range(11))


def test_extxyz_reads_the_1000_mad_structures_with_their_subsets():
    reference = read(MAD, index=":")
    got = _frames(MAD, "extxyz")
    assert len(got) == 1000
    assert [g["subset"] for g in got] == [a.info["subset"] for a in reference]
    for i in (0, 517, 999):
        np.testing.assert_array_equal(got[i]["positions"], reference[i].positions)
        np.testing.assert_array_equal(got[i]["numbers"], reference[i].numbers)
    assert got[3]["id"] == "d:3"  # no id in the file: the frame index


def test_ase_db_and_parquet_round_trips(tmp_path):
    import ase.db

    frames = read(MAD, index=":30")
    with ase.db.connect(str(tmp_path / "mad.db")) as db:
        for atoms in frames:
            db.write(atoms, subset=atoms.info["subset"])
    got = _frames(tmp_path / "mad.db", "ase-db")
    assert [g["id"] for g in got] == [f"d:{i}" for i in range(1, 31)]  # the db row ids
    assert [g["subset"] for g in got] == [a.info["subset"] for a in frames]
    for g, atoms in zip(got, frames):
        np.testing.assert_allclose(g["positions"], atoms.positions, atol=1e-12)
    # latentray prepare -> structures Parquet -> read back: the same structures and ids
    assert main(["prepare", str(tmp_path / "mad.db"), "--output", str(tmp_path / "out"),
                 "--shard-size", "8"]) == 0
    parts = sorted((tmp_path / "out" / "structures" / "dataset=mad").glob("*.parquet"))
    assert len(parts) == 4
    assert pq.read_metadata(parts[0]).metadata[b"latentray.shard_sha256"]
    back = _frames(tmp_path / "out" / "structures" / "dataset=mad", "parquet")
    assert [b["id"] for b in back] == [g["id"] for g in got]  # native ids kept
    for b, g in zip(back, got):
        for key in ("numbers", "positions", "cell", "pbc"):
            np.testing.assert_array_equal(b[key], g[key])
        assert b["subset"] == g["subset"]


def test_filters_drop_and_count(tmp_path):
    n_single = sum(len(a) == 1 for a in read(MAD, index=":"))
    assert n_single > 0
    shards = list(iter_shards("d", MAD, "extxyz", shard_size=300,
                              filters=Filters(min_atoms=2, exclude_elements=("H",))))
    kept = sum(len(s) for s in shards)
    dropped = [r for s in shards for _, r in s.dropped]
    assert kept + len(dropped) == 1000
    assert sum(r.startswith("min_atoms") for r in dropped) == n_single
    with_h = sum(1 in a.numbers and len(a) > 1 for a in read(MAD, index=":"))
    assert sum(r.startswith("exclude_elements: contains H") for r in dropped) == with_h
    for s in shards:
        assert not any(1 in s.numbers[s.offsets[i]:s.offsets[i + 1]] for i in range(len(s)))
    # isolated atoms: a dimer 5 A apart is dropped at 3 A, kept at 6 A
    from ase import Atoms

    write(tmp_path / "dimers.xyz", [Atoms("H2", positions=[[0, 0, 0], [0, 0, 5]]),
                                    Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])])
    s = next(iter_shards("d", str(tmp_path / "dimers.xyz"), "extxyz", subset_key=None,
                         filters=Filters(max_neighbour_distance=3.0)))
    assert len(s) == 1 and s.dropped[0][0] == "d:0" and "no neighbour within 3.0" in s.dropped[0][1]


# -- bad input: a clear error naming the file and the frame; with skip, the others stay --------


def _write_json(path, docs):
    path.write_text(json.dumps(docs))
    return path


def _corrupt(edit):
    docs = _mptrj_docs()
    material = next(iter(docs.values()))
    frame_id, doc = next(iter(material.items()))
    edit(doc)
    return docs, frame_id


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("structure"), "missing key 'structure'"),
    (lambda d: d["structure"]["sites"][0].pop("abc"), "missing key 'abc'"),
    (lambda d: d["structure"]["sites"][0].update(abc=["x", 0, 0]), "non-numeric"),
    (lambda d: d["structure"]["sites"][0].update(abc=["nan", 0, 0]), "NaN or infinite"),
    (lambda d: d["structure"]["sites"][0]["species"][0].update(element="Xx"),
     "unknown element symbol 'Xx'"),
    (lambda d: d["structure"]["lattice"].update(matrix=[[1, 0, 0], [2, 0, 0], [0, 0, 1]]),
     "zero volume"),
])
def test_a_bad_mptrj_frame_is_named_and_can_be_skipped(tmp_path, edit, message):
    docs, frame_id = _corrupt(edit)
    path = _write_json(tmp_path / "bad.json", docs)
    with pytest.raises(DatasetError) as info:
        list(iter_shards("d", str(path), "mptrj-json"))
    assert str(path) in str(info.value) and frame_id in str(info.value)
    assert message in str(info.value)
    shards = list(iter_shards("d", str(path), "mptrj-json", on_error="skip"))
    assert sum(len(s) for s in shards) == 10  # the other frames are kept
    failures = [f for s in shards for f in s.failures]
    assert failures[0][0] == f"d:{frame_id}" and message in failures[0][1]


def test_truncated_json_keeps_the_frames_before_it(tmp_path):
    text = MPTRJ.read_text()
    path = tmp_path / "truncated.json"
    path.write_text(text[: int(len(text) * 0.7)])
    with pytest.raises(DatasetError, match=r"truncated.json: .*invalid or truncated JSON after "
                                           r"frame mp-"):
        list(iter_frames("d", str(path), "mptrj-json"))
    shards = list(iter_shards("d", str(path), "mptrj-json", on_error="skip"))
    failures = [f for s in shards for f in s.failures]
    assert len(failures) == 1 and "invalid or truncated JSON" in failures[0][1]
    # frames before the damage were read (iter_frames yields them before raising) and kept
    seen = []
    with pytest.raises(DatasetError):
        for frame in iter_frames("d", str(path), "mptrj-json"):
            seen.append(frame)
    assert 0 < len(seen) < 11
    assert sum(len(s) for s in shards) == len(seen)


def test_invalid_json_names_the_file_and_where(tmp_path):
    docs = _mptrj_docs()
    material = list(docs.values())[1]
    next(iter(material.values()))["structure"]["sites"][0]["abc"] = [float("nan"), 0, 0]
    path = _write_json(tmp_path / "nan-literal.json", docs)  # NaN: not JSON
    with pytest.raises(DatasetError, match=r"nan-literal.json: .*invalid or truncated JSON "
                                           r"after frame mp-1393488-0-0 \(near byte \d+\)"):
        list(iter_frames("d", str(path), "mptrj-json"))


def test_bad_extxyz_frame(tmp_path):
    frames = read(MAD, index=":5")
    frames[2].positions[1, 0] = np.nan
    write(tmp_path / "nan.xyz", frames)
    with pytest.raises(DatasetError, match=r"nan.xyz: frame 2: NaN or infinite position"):
        list(iter_shards("d", str(tmp_path / "nan.xyz"), "extxyz"))
    shards = list(iter_shards("d", str(tmp_path / "nan.xyz"), "extxyz", on_error="skip"))
    assert sum(len(s) for s in shards) == 4 and shards[0].failures[0][0] == "d:2"
    assert shards[0].structure_index.tolist() == [0, 1, 2, 3]  # indices of the kept ones


def test_unsupported_format_and_missing_file():
    with pytest.raises(DatasetError, match="format 'cif' is not supported"):
        list(iter_shards("d", MAD, "cif"))
    with pytest.raises(DatasetError, match="no file matches"):
        list(iter_shards("d", "/nonexistent/*.json", "mptrj-json"))


# -- scale: a generated MPtrj-format JSON, read with flat memory ---------------------------------


def _generate_mptrj(path: Path, n_frames: int, frames_per_material: int = 100) -> None:
    """MPtrj-schema JSON of ``n_frames`` frames (2-atom rock salt, jittered), written as text."""
    rng = np.random.default_rng(0)
    with open(path, "w") as out:
        out.write("{")
        for m in range(n_frames // frames_per_material):
            out.write(("," if m else "") + f'"mp-{m}": {{')
            for k in range(frames_per_material):
                a = 4.0 + 0.1 * rng.random()
                doc = {"structure": {
                    "@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0.0,
                    "lattice": {"matrix": [[a, 0, 0], [0, a, 0], [0, 0, a]],
                                "pbc": [True, True, True]},
                    "sites": [{"species": [{"element": "Na", "occu": 1}], "abc": [0, 0, 0]},
                              {"species": [{"element": "Cl", "occu": 1}],
                               "abc": (0.5 + 0.01 * rng.random(3)).tolist()}]},
                    "corrected_total_energy": -7.0 - rng.random(), "mp_id": f"mp-{m}"}
                out.write(("," if k else "") + f'"mp-{m}-0-{k}": ' + json.dumps(doc))
            out.write("}")
        out.write("}")


def test_a_100000_frame_mptrj_json_reads_with_flat_memory(tmp_path):
    path = tmp_path / "mptrj-100k.json"
    _generate_mptrj(path, 100_000)
    # VmHWM, not ru_maxrss: that would count this (parent) process's memory at the fork
    script = textwrap.dedent(f"""
        from latentray.datasets import iter_shards
        n = sum(len(s) for s in iter_shards("big", {str(path)!r}, "mptrj-json", "mp_id",
                                            shard_size=1000))
        hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")]
        print(n, hwm[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    n, peak_kib = int(out[0]), int(out[1])
    assert n == 100_000
    assert path.stat().st_size > 40e6  # tens of MB of JSON ...
    assert peak_kib < 1024 * 1024  # ... read in under 1 GB (the whole process)


def test_prepare_every_dataset_of_a_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"""
output: unused
datasets:
  - {{name: mad, path: builtin:mad-val-1000, limit: 300, filters: {{min_atoms: 2}}}}
  - {{name: mp, path: {MPTRJ}, format: mptrj-json, subset_key: n_elements}}
models: [{{id: m, family: chgnet, checkpoint: "0.3.0"}}]
""")
    assert main(["prepare", str(config), "--output", str(tmp_path / "out"),
                 "--shard-size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "mad: 300 structures" in printed and "mp: 11 structures" in printed
    mp = _frames(tmp_path / "out" / "structures" / "dataset=mp", "parquet")
    from pymatgen.core import Structure

    expected = [str(len(Structure.from_dict(doc["structure"]).composition.elements))
                for material in _mptrj_docs().values() for doc in material.values()]
    assert [m["subset"] for m in mp] == expected  # n_elements, by pymatgen
    # the single atoms among the frames read (ASE), named: 3 of them before 300 were kept
    dropped = pq.read_table(tmp_path / "out" / "dropped" / "dataset=mad").to_pandas()
    singles = [i for i, a in enumerate(read(MAD, index=":303")) if len(a) == 1]
    assert len(singles) == 3
    assert dropped.structure_id.tolist() == [f"mad:{i}" for i in singles]
    assert all(r.startswith("min_atoms") for r in dropped.reason)
    kept = pq.read_table(tmp_path / "out" / "structures" / "dataset=mad",
                         columns=["structure_id"]).column(0).to_pylist()
    assert kept == [f"mad:{i}" for i in range(303) if i not in singles]
    assert main(["prepare", str(tmp_path / "nothing.cif"), "--output", str(tmp_path)]) == 2
    assert "cannot tell the format" in capsys.readouterr().err


def test_a_shard_reads_back_from_its_structures_file(tmp_path):
    """What an extraction unit runs on is read from ``structures/``: the same arrays and
    content hash as the shard the reader made; a file whose content changed is refused."""
    from latentray.shards import StructureShard, read_shard, write_shard_tables
    from latentray.store import Store

    store = Store(str(tmp_path))
    shards = list(iter_shards("mad", "builtin:mad-val-1000", "extxyz", "subset", 7, 20))
    for shard in shards:
        write_shard_tables(store, shard)
        back = read_shard(store, "mad", shard.shard, shard.content_hash())
        for name in ("structure_index", "n_atoms", "numbers", "positions", "cells", "pbc",
                     "energy"):
            np.testing.assert_array_equal(getattr(back, name), getattr(shard, name))
            assert getattr(back, name).dtype == getattr(shard, name).dtype, name
        assert back.structure_id.tolist() == shard.structure_id.tolist()
        assert back.subset.tolist() == shard.subset.tolist()
        assert back.content_hash() == shard.content_hash()
    with pytest.raises(RuntimeError, match="part-00001.parquet: its structures changed"):
        read_shard(store, "mad", 1, shards[0].content_hash())
    empty = StructureShard.from_table("mad", 0, shards[0].table().slice(0, 0))
    assert len(empty) == 0 and empty.positions.shape == (0, 3)
