"""What the MPtrj rehearsal (benchmarks/rehearsal.py) stands on: the generator of
benchmarks/mptrj_like.py (its frames read the same through latentray's MPtrj reader and
through pymatgen, keep MPtrj's schema, and a larger N starts with exactly the frames of a
smaller one) and the job's per-stage times."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from latentray.datasets import iter_frames

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "mptrj-sample.json"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mptrj_like = _load("mptrj_like")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mptrj-like")
    small, large = folder / "small.json", folder / "large.json"
    counts = mptrj_like.write(small, 40, seed=3)
    mptrj_like.write(large, 90, seed=3)
    return small, large, counts


def test_frames_read_the_same_through_latentray_and_pymatgen(generated):
    from pymatgen.core import Structure

    small, _, counts = generated
    documents = [(fid, doc) for frames in json.loads(small.read_text()).values()
                 for fid, doc in frames.items()]
    frames = list(iter_frames("m", str(small), "mptrj-json", subset_key="n_elements"))
    assert len(frames) == len(documents) == counts["structures"] == 40
    assert counts["atoms"] == sum(len(f.numbers) for f in frames)
    for frame, (fid, doc) in zip(frames, documents):
        structure = Structure.from_dict(doc["structure"])
        assert frame.native_id == fid
        np.testing.assert_array_equal(frame.numbers, structure.atomic_numbers)
        np.testing.assert_allclose(frame.positions, structure.cart_coords, atol=1e-9)
        np.testing.assert_allclose(frame.cell, structure.lattice.matrix, atol=0)
        np.testing.assert_allclose([s["xyz"] for s in doc["structure"]["sites"]],
                                   structure.cart_coords, atol=1e-9)
        lattice = doc["structure"]["lattice"]
        np.testing.assert_allclose([lattice[k] for k in ("a", "b", "c", "alpha", "beta",
                                                         "gamma", "volume")],
                                   [*structure.lattice.abc, *structure.lattice.angles,
                                    structure.lattice.volume], rtol=1e-10)
        assert frame.energy == doc["corrected_total_energy"]
        assert frame.subset == str(len(set(structure.species)))
        assert 1 <= len(frame.numbers) <= mptrj_like.MAX_ATOMS


def test_the_schema_is_mptrjs(generated):
    small, _, _ = generated
    sample = next(iter(next(iter(json.loads(SAMPLE.read_text()).values())).values()))
    doc = next(iter(next(iter(json.loads(small.read_text()).values())).values()))
    assert set(doc) == set(sample)
    assert set(doc["structure"]) == set(sample["structure"])
    assert set(doc["structure"]["lattice"]) == set(sample["structure"]["lattice"])
    assert set(doc["structure"]["sites"][0]) == set(sample["structure"]["sites"][0])
    assert np.shape(doc["force"]) == (len(doc["structure"]["sites"]), 3)


def test_a_larger_n_starts_with_the_smaller_ns_frames(generated):
    small, large, _ = generated
    a = list(iter_frames("m", str(small), "mptrj-json"))
    b = list(iter_frames("m", str(large), "mptrj-json"))
    assert len(b) == 90
    for x, y in zip(a, b[:40]):
        assert x.native_id == y.native_id and x.energy == y.energy
        np.testing.assert_array_equal(x.positions, y.positions)
    materials = json.loads(large.read_text())
    assert len(materials) > 3  # several materials, several frames each
    assert max(len(frames) for frames in materials.values()) > 1


def test_stage_times_nest_without_counting_twice(monkeypatch):
    """The job's per-stage seconds (what benchmarks/rehearsal.py reports): a stage timed
    inside another is left out of the outer one, and the timeline holds both intervals."""
    from latentray import job

    clock = iter([0.0, 1.0, 3.0, 10.0])  # outer starts, inner starts, inner ends, outer ends
    monkeypatch.setattr(job.time, "perf_counter", lambda: next(clock))
    log = job.StageLog(quiet=True, _start=0.0)
    with log.timed("analyse"):
        with log.timed("fits"):
            pass
    assert log.seconds == {"fits": 2.0, "analyse": 8.0}
    assert [stage for stage, *_ in log.timeline] == ["fits", "analyse"]
    (_, s_in, e_in), (_, s_out, e_out) = log.timeline
    assert s_out <= s_in <= e_in <= e_out


def test_a_stopped_rehearsal_goes_on_from_its_recorded_steps(tmp_path, monkeypatch):
    """``--resume``: steps recorded are not run again, the step that was stopped runs again and
    says so, each JSON is deleted once prepared, and the report is saved at every step."""
    rehearsal = _load("rehearsal")
    calls, saved = [], []

    def generate(path, n):
        calls.append(("generate", path.name))
        path.write_text("{}")
        return {"structures": n, "atoms": 30 * n, "generate_seconds": 0.1}

    def command(name, argv, output, log, progress=None):
        calls.append((argv[1], Path(argv[2]).name))
        if name == "re-run, unchanged" and stop["now"]:
            raise KeyboardInterrupt  # the machine went away mid-step
        return {"command": argv[1], "wall_seconds": 10.0 if name == "run" else 0.5}

    monkeypatch.setattr(rehearsal, "_generate", generate)
    monkeypatch.setattr(rehearsal, "timed_command", command)
    monkeypatch.setattr(rehearsal, "standin_checkpoints", lambda folder, n: [])
    result, stop = {"structures": 100, "models": 2}, {"now": True}

    def saver(report):
        return lambda: saved.append(json.loads(json.dumps(report)))

    with pytest.raises(KeyboardInterrupt):
        rehearsal.rehearse(100, 2, tmp_path, lambda line: None, result, saver(result))
    assert calls == [("generate", "mptrj-like.json"), ("prepare", "mptrj-like.json"),
                     ("run", "config.yaml"), ("run", "config.yaml")]
    assert not (tmp_path / "mptrj-like.json").exists()
    assert set(saved[-1]["steps"]) == {"generate", "prepare", "run"}
    assert list(saved[-1]["running"]) == ["rerun_unchanged"]
    first_start = saved[-1]["running"]["rerun_unchanged"]

    calls.clear()
    stop["now"] = False
    resumed = json.loads(json.dumps(saved[-1]))  # what --resume reads back from the JSON
    rehearsal.rehearse(100, 2, tmp_path, lambda line: None, resumed, saver(resumed))
    assert calls == [("run", "config.yaml"), ("generate", "mptrj-like-grown.json"),
                     ("prepare", "mptrj-like-grown.json"), ("run", "config.yaml"),
                     ("status", "out")]
    steps = resumed["steps"]
    assert steps["rerun_unchanged"]["interrupted_before"] == first_start
    assert "interrupted_before" not in steps["run"]
    assert resumed["running"] == {}
    assert resumed["rerun_unchanged_fraction"] == 0.05
    assert resumed["generate_seconds"] == 0.2
    assert not (tmp_path / "mptrj-like-grown.json").exists()
    assert all(s["started"] <= s["ended"] for s in steps.values())
    assert saved[-1] == resumed


def test_workers_private_and_shared_memory_are_told_apart():
    """The watch's worker memory: a process's own allocations count as private, the shared
    memory it touches (as a Ray worker touches the object store's pages) as shared, not
    private; the resident peak holds both."""
    rehearsal = _load("rehearsal")
    mb = 300
    private = (f"import numpy, time; a = numpy.ones({mb} * 2**20 // 8); "
               f"time.sleep(2); print(a.sum())")
    shared = (f"import numpy, time\nfrom multiprocessing import shared_memory\n"
              f"s = shared_memory.SharedMemory(create=True, size={mb} * 2**20)\n"
              f"numpy.ndarray({mb} * 2**20, numpy.uint8, s.buf)[:] = 1\n"
              f"time.sleep(2)\ns.close()\ns.unlink()\n")
    driver = (f"import subprocess, sys\n"
              f"procs = [subprocess.Popen([sys.executable, '-c', c])\n"
              f"         for c in ({private!r}, {shared!r})]\n"
              f"print('pids', *(p.pid for p in procs), flush=True)\n"
              f"assert all(p.wait() == 0 for p in procs)\n")
    import sys

    watch = rehearsal.Watch([sys.executable, "-c", driver], period=0.05)
    rc, _ = watch.run()
    assert rc == 0
    p, s = (int(pid) for pid in next(line for line in watch.lines
                                      if line.startswith("pids")).split()[1:])
    size = mb * 2**20 / 1e6
    assert watch.others_private_peak[p] > 0.9 * size > watch.others_shared_peak[p]
    assert watch.others_shared_peak[s] > 0.9 * size > watch.others_private_peak[s]
    assert watch.others_peak[s] > 0.9 * size and watch.others_peak[p] > 0.9 * size
    assert max(largest for _, largest, *_ in watch.workers) > 0.9 * size
    assert max(private for _, _, private, _ in watch.workers) > 0.9 * size
    assert max(shmem for *_, shmem in watch.workers) > 0.9 * size  # the shared segment
