"""The MPtrj run, rehearsed on one machine: every stage's cost as the structures grow.

    .venv/bin/python benchmarks/rehearsal.py --structures 2000 20000 --models 2 \\
        --json rehearsal.json [--workdir DIR] [--keep]

For each N, in a fresh work directory, as a user of ``jobs/configs/mptrj.yaml`` would:

1. an MPtrj-schema JSON of N frames (``benchmarks/mptrj_like.py``), and one with 1% more
   (the first N frames the same);
2. ``latentray prepare`` of the JSON (shards of 2,000 structures, as mptrj.yaml says);
3. ``latentray run`` with M stand-in models (``benchmarks/standin_models.py``: small random
   CHGNets and SevenNets, loaded by path through the real adapters) and mptrj.yaml's
   analyses (every metric, both levels, bb and ll, order 2, the baselines, the order and
   layer analyses; no spread seeds), every fit streamed from Parquet as MPtrj's are
   (``in_memory_limit_mb: 0``: the stand-ins' latents are narrower than the real models');
4. the same ``latentray run`` again, unchanged;
5. ``latentray prepare`` of the JSON with 1% more, then ``latentray run``;
6. ``latentray status``.

The job's maps (Ray tasks beside the cumulants of the next layer and the fits) have no stage
of their own: their time is in the stages they run beside.

A JSON is deleted once it is prepared (at 1e6 each is about 12 GB; the prepared Parquet is what
the runs read), and the grown one is written only when its step comes.

A rehearsal at 1e6 takes hours: ``--json FILE`` is rewritten after every step, and
``--resume --workdir DIR`` goes on from the steps that FILE records (for each N, in DIR's kept
work folder): steps done are not run again; a step that began and did not end (the process was
stopped) is run again from the outputs it left, and its record says so
(``"interrupted_before": [start times]``): a ``latentray run`` resumed that way reuses the
units, cumulants and fits its first attempt finished, so its time is not a first run's. Every
step records its Unix ``started`` and ``ended``, and its progress lines go to
``DIR/n<N>-m<M>/logs/<step>.log`` as they come.

Every command is a child process, watched every 0.2 s with its whole process tree (the local
Ray cluster it starts and its workers): the driver's resident memory, attributed to the stage
whose interval (``run.json``'s timeline) holds the sample, and every other process's. Per
command and stage: ``seconds`` (the job's own per-stage times, ``run.json``), ``peak_rss_mb``
(the driver), ``worker_peak_rss_mb`` (the largest resident memory of any other process of the
tree) and ``worker_peak_private_mb`` (the largest of their resident memory less its shared
pages, psutil's ``shared``: the object store's pages a Ray worker has touched, counted again
in every worker that touched them, and mapped files), ``shmem_peak_mb`` (the machine's
shared memory above its level when the command started, ``Shmem`` of ``/proc/meminfo``: on a
machine that runs nothing else, the object store's pages in use, whatever process touched
them), and per command ``worker_peak_shared_mb`` and the bytes and files written and what the
job ran (units, cumulant shards, fits).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import mptrj_like  # noqa: E402  (benchmarks/mptrj_like.py)
import standin_models  # noqa: E402  (benchmarks/standin_models.py)
from machine_info import describe  # noqa: E402

BIN = Path(sys.executable).parent
SHARD_SIZE = 2000  # structures per shard: jobs/configs/mptrj.yaml
#: output folders -> the stage that writes them
STAGE_OF_FOLDER = {"structures": "read", "dropped": "read", "latents": "extract",
                   "failures": "extract", "manifest": "extract", "cumulants": "cumulants",
                   "results": "fits", "figures": "report", "report.html": "report",
                   "run.json": "report"}


def standin_checkpoints(folder: Path, n_models: int) -> list[dict]:
    """``n_models`` stand-in models: CHGNet, SevenNet, CHGNet (seed 1), ... as config entries."""
    models = []
    for i in range(n_models):
        family, seed = ("chgnet", "sevenn")[i % 2], i // 2
        path, build = ((folder / f"chgnet-small-{seed}.pth.tar", standin_models.build_chgnet)
                       if family == "chgnet" else
                       (folder / f"sevennet-small-{seed}.pth", standin_models.build_sevennet))
        if not path.exists():  # a resumed rehearsal keeps the files its outputs were made by
            build(path, seed)
        models.append({"id": f"{family}-small-{seed}", "family": family,
                       "checkpoint": str(path), "layers": ["all"]})
    return models


def write_config(path: Path, prepared: Path, output: Path, models: list[dict]) -> None:
    """mptrj.yaml's datasets and analyses, on this machine's CPUs, with ``models``, every fit
    streamed."""
    mptrj = yaml.safe_load((ROOT / "jobs" / "configs" / "mptrj.yaml").read_text())
    analyses = dict(mptrj["analyses"], spread_seeds=[], in_memory_limit_mb=0)
    config = {
        "output": str(output),
        "datasets": [{"name": "mptrj", "path": str(prepared / "structures" / "dataset=mptrj"),
                      "format": "parquet", "subset_key": "subset", "on_error": "skip"}],
        "models": models,
        "extraction": {"shard_size": SHARD_SIZE, "batch_atoms": 256, "cpus_per_actor": 1},
        "analyses": analyses,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _tree_bytes(folder: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes and files under each top-level entry of ``folder``."""
    size, count = {}, {}
    if not folder.exists():
        return size, count
    for top in folder.iterdir():
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        size[top.name] = sum(p.stat().st_size for p in files)
        count[top.name] = len(files)
    return size, count


def _shmem_mb() -> float:
    """The machine's shared memory in use (``Shmem`` of ``/proc/meminfo``), MB: where Ray's
    object store keeps its objects (``/dev/shm``); 0 where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Shmem:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


class Watch:
    """Run a command; sample its process tree's memory every ``period`` s."""

    def __init__(self, command: list[str], period: float = 0.2, progress: Path | None = None):
        self.command, self.period, self.progress = command, period, progress
        self.driver: list[tuple[float, float]] = []  # (Unix time, MB)
        # (Unix time, largest resident MB, largest private MB) of the other processes, and
        # the machine's shared memory above its level at the start (Ray's object store)
        self.workers: list[tuple[float, float, float, float]] = []
        self.others_peak: dict[int, float] = {}  # pid -> resident MB
        self.others_private_peak: dict[int, float] = {}  # pid -> resident less shared, MB
        self.others_shared_peak: dict[int, float] = {}  # pid -> shared MB
        self.names: dict[int, str] = {}  # pid -> process title (Ray names its workers)
        self.lines: list[str] = []

    def _sample(self, proc: psutil.Process) -> None:
        shmem_at_start = _shmem_mb()
        while self._running:
            try:
                now = time.time()
                self.driver.append((now, proc.memory_info().rss / 1e6))
                largest, largest_private = 0.0, 0.0
                for child in proc.children(recursive=True):
                    try:
                        memory = child.memory_info()
                    except psutil.Error:
                        continue
                    mb, shared = memory.rss / 1e6, memory.shared / 1e6
                    largest, largest_private = max(largest, mb), max(largest_private, mb - shared)
                    for peaks, value in ((self.others_private_peak, mb - shared),
                                         (self.others_shared_peak, shared)):
                        peaks[child.pid] = max(peaks.get(child.pid, 0.0), value)
                    if mb > self.others_peak.get(child.pid, 0.0):
                        self.others_peak[child.pid] = mb
                        try:
                            self.names[child.pid] = " ".join(child.cmdline())[:80]
                        except psutil.Error:
                            pass
                self.workers.append((now, largest, largest_private,
                                     _shmem_mb() - shmem_at_start))
            except psutil.Error:
                pass
            time.sleep(self.period)

    def run(self) -> tuple[int, float]:
        t = time.perf_counter()
        popen = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1)
        self._running = True
        sampler = threading.Thread(target=self._sample, args=(psutil.Process(popen.pid),))
        sampler.start()
        with open(self.progress or os.devnull, "a") as progress:
            for line in popen.stdout:
                self.lines.append(line.rstrip())
                progress.write(line)
                progress.flush()
        rc = popen.wait()
        self._running = False
        sampler.join()
        return rc, time.perf_counter() - t

    def peak_by_stage(self, timeline: list, samples: list | None = None,
                      column: int = 1) -> dict[str, float]:
        """The peak of ``samples`` (default: the driver's; ``(time, value, ...)``, the value
        in ``column``) per stage of ``timeline`` (``(stage, start, end)``; a sample in nested
        stages counts for the innermost), ``"other"`` outside every stage."""
        peak: dict[str, float] = {}
        for sample in self.driver if samples is None else samples:
            t, mb = sample[0], sample[column]
            inside = [(start, stage) for stage, start, end in timeline if start <= t <= end]
            stage = max(inside)[1] if inside else "other"
            peak[stage] = max(peak.get(stage, 0.0), mb)
        return peak


def timed_command(name: str, command: list[str], output: Path, log,
                  progress: Path | None = None) -> dict:
    """Run one command; what it cost, per stage when it is a ``latentray run``. ``progress``:
    a file that gets the command's output lines as they come."""
    before_size, before_count = _tree_bytes(output)
    watch = Watch(command, progress=progress)
    rc, wall = watch.run()
    if rc not in (0, 1) or (rc == 1 and command[1] != "status"):
        sys.stdout.write("\n".join(watch.lines[-40:]) + "\n")
        raise RuntimeError(f"{name}: {' '.join(command)} exited with {rc}")
    size, count = _tree_bytes(output)
    record = {"command": " ".join(command[1:3]), "wall_seconds": round(wall, 2),
              "peak_rss_mb": round(max((mb for _, mb in watch.driver), default=0.0), 1),
              "worker_peak_rss_mb": round(max(watch.others_peak.values(), default=0.0), 1),
              "worker_peak_private_mb": round(max(watch.others_private_peak.values(),
                                                  default=0.0), 1),
              "worker_peak_shared_mb": round(max(watch.others_shared_peak.values(),
                                                 default=0.0), 1),
              "shmem_peak_mb": round(max((w[3] for w in watch.workers), default=0.0), 1),
              "largest_worker": watch.names.get(max(watch.others_peak, default=None,
                                                    key=watch.others_peak.get), ""),
              "bytes_written": sum(size.values()) - sum(before_size.values()),
              "files_written": sum(count.values()) - sum(before_count.values())}
    if command[1] == "run":
        summary = json.loads((output / "run.json").read_text())
        peaks = {"peak_rss_mb": watch.peak_by_stage(summary["timeline"]),
                 "worker_peak_rss_mb": watch.peak_by_stage(summary["timeline"], watch.workers),
                 "worker_peak_private_mb": watch.peak_by_stage(summary["timeline"],
                                                               watch.workers, 2),
                 "shmem_peak_mb": watch.peak_by_stage(summary["timeline"], watch.workers, 3)}
        seconds = dict(summary["seconds"],
                       other=wall - sum(summary["seconds"].values()))
        stages = {stage: {"seconds": round(s, 2),
                          **{k: round(peak.get(stage, 0.0), 1) for k, peak in peaks.items()}}
                  for stage, s in seconds.items()}
        for folder in set(size) | set(before_size):
            stage = STAGE_OF_FOLDER.get(folder)
            if stage in stages:
                s = stages[stage]
                s["bytes_written"] = s.get("bytes_written", 0) + size.get(folder, 0) \
                    - before_size.get(folder, 0)
                s["files_written"] = s.get("files_written", 0) + count.get(folder, 0) \
                    - before_count.get(folder, 0)
        record["stages"] = stages
        ex, an = summary["extraction"], summary["analysis"]
        record["ray_tasks"] = {"units": ex["ran"], "units_skipped": ex["skipped"],
                               "cumulant_shards": an.get("cumulants_computed", 0),
                               "fits": an["fits_run"], "fits_reused": an["fits_reused"]}
        record["structures"] = ex["structures"]
    log(f"  {name}: {record['wall_seconds']:.1f} s, driver peak {record['peak_rss_mb']:.0f} MB"
        + f" (largest other process {record['worker_peak_rss_mb']:.0f} MB, "
          f"{record['worker_peak_private_mb']:.0f} MB private)"
        + "".join(f"; {k} {v['seconds']:.1f} s / {v['peak_rss_mb']:.0f} MB"
                  for k, v in record.get("stages", {}).items()))
    return record


class Steps:
    """The steps of one rehearsal, each run once: ``result["steps"]`` gets each step's record
    when it ends, and ``save()`` writes the whole report then and when a step begins. A step
    found begun and not ended (``result["running"]``: its start times) was stopped: it runs
    again, and its record lists the earlier starts as ``interrupted_before``."""

    def __init__(self, result: dict, save, log):
        self.result, self.save, self.log = result, save, log
        self.done = result.setdefault("steps", {})
        self.running = result.setdefault("running", {})

    def __call__(self, key: str, step) -> dict | None:
        """Run ``step()`` (which returns its record) unless ``key`` is done."""
        if key in self.done:
            self.log(f"  {key}: done before, not run again")
            return None
        earlier = self.running.get(key, [])
        started = time.time()
        self.running[key] = [*earlier, round(started, 3)]
        self.save()
        record = step()
        record.update(started=round(started, 3), ended=round(time.time(), 3))
        if earlier:
            record["interrupted_before"] = earlier
        self.done[key] = record
        del self.running[key]
        self.save()
        return record


def _generate(path: Path, n: int) -> dict:
    t = time.perf_counter()
    data = mptrj_like.write(path, n)
    return dict(data, generate_seconds=round(time.perf_counter() - t, 1))


def rehearse(n: int, n_models: int, work: Path, log, result: dict | None = None,
             save=lambda: None) -> dict:
    """Every step of the rehearsal at ``n`` structures, in ``work``. ``result``: what an
    earlier, stopped call recorded (its steps are not run again); ``save()`` is called
    whenever it changes."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    result = {"structures": n, "models": n_models} if result is None else result
    step = Steps(result, save, log)
    grown_n = n + math.ceil(n / 100)
    data_file, grown_file = work / "mptrj-like.json", work / "mptrj-like-grown.json"
    models = standin_checkpoints(work / "checkpoints", n_models)  # the same seeds each time
    prepared, output = work / "prepared", work / "out"
    config = work / "config.yaml"
    write_config(config, prepared, output, models)
    latentray = str(BIN / "latentray")

    def prepare(json_file: Path) -> dict:
        record = timed_command(
            f"prepare, {json_file.name}",
            [latentray, "prepare", str(json_file), "--name", "mptrj", "--subset-key",
             "n_elements", "--shard-size", str(SHARD_SIZE), "--output", str(prepared)],
            prepared, log, work / "logs" / f"prepare-{json_file.stem}.log")
        json_file.unlink()  # the prepared Parquet is what the runs read
        return record

    def run(name: str, key: str) -> dict:
        return timed_command(name, [latentray, "run", str(config)], output, log,
                             work / "logs" / f"{key}.log")

    log(f"N = {n}: {n_models} models, in {work}")
    if step("generate", lambda: _generate(data_file, n)):
        result["data"] = step.done["generate"]
        log(f"  generated: {result['data']['atoms']} atoms")
    step("prepare", lambda: prepare(data_file))
    step("run", lambda: run("run", "run"))
    step("rerun_unchanged", lambda: run("re-run, unchanged", "rerun_unchanged"))
    step("generate_grown", lambda: _generate(grown_file, grown_n))
    step("prepare_grown", lambda: prepare(grown_file))
    step("rerun_grown", lambda: run("re-run, 1% new", "rerun_grown"))
    step("status", lambda: timed_command("status", [latentray, "status", str(output)], output,
                                         log, work / "logs" / "status.log"))
    steps = result["steps"]
    result["generate_seconds"] = round(steps["generate"]["generate_seconds"]
                                       + steps["generate_grown"]["generate_seconds"], 1)
    result["rerun_unchanged_fraction"] = round(
        steps["rerun_unchanged"]["wall_seconds"] / steps["run"]["wall_seconds"], 4)
    save()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", type=int, nargs="+", required=True)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the data and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the steps that --json records, in --workdir's kept "
                             "work folders (implies --keep)")
    args = parser.parse_args(argv)
    if args.resume and (args.workdir is None or not args.json.exists()):
        parser.error("--resume needs --workdir and an existing --json")
    keep = args.keep or args.resume
    base = args.workdir or Path(tempfile.mkdtemp(prefix="latentray-rehearsal-"))
    import latentray
    import ray

    machine = describe(latentray=latentray.__version__, ray=ray.__version__)
    if args.resume:
        report = json.loads(args.json.read_text())
        report.setdefault("resumed_on", []).append(machine)
    else:
        report = {"machine": machine, "shard_size": SHARD_SIZE, "runs": []}

    def save() -> None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.json)

    t = time.perf_counter()
    for n in args.structures:
        work = base / f"n{n}-m{args.models}"
        earlier = next((r for r in report["runs"]
                        if (r["structures"], r["models"]) == (n, args.models)), None)
        if earlier is None:
            if work.exists():
                shutil.rmtree(work)
            earlier = {"structures": n, "models": args.models}
            report["runs"].append(earlier)
        try:
            rehearse(n, args.models, work, print, earlier, save)
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(report.get("seconds", 0.0) + time.perf_counter() - t, 1)
    save()
    print(f"{args.json}: {len(report['runs'])} rehearsal(s) in {report['seconds']:.0f} s")
    if not keep and args.workdir is None:
        os.rmdir(base)


if __name__ == "__main__":
    main()
