"""Extraction throughput of ``latentray run`` by number of extraction actors (and, on a GPU
machine, per GPU, with graph builders and the batch budget used).

    .venv/bin/python benchmarks/scaling.py [--models chgnet:0.3.0 sevenn:7net-0]
        [--structures 400] [--actors 1 2] [--shard-size 25] [--batch-atoms 128]
        [--gpus-per-actor 0] [--graph-builders 0] [--out results.json]

Each configuration is a fresh extraction (``latentray.pipeline.run_extraction``: reading,
Ray actors, graph building, batched forward passes, Parquet writes, manifests) of the first
``--structures`` embedded MAD structures with one model, into a new output directory, on the
local Ray cluster (or the one ``RAY_ADDRESS`` names). Atoms per second = atoms extracted /
wall time of the extraction stage (the model loads are in the "describe" stage before it:
reported apart). One torch thread per actor CPU. On a GPU machine, ``--gpus-per-actor 1``
pins one actor to each GPU; the mean GPU utilisation over the extraction is sampled with
``nvidia-smi`` where it exists.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
from importlib.metadata import version
from pathlib import Path

from machine_info import describe  # benchmarks/machine_info.py


class GPUSampler:
    """Mean GPU utilisation (%) over a period, from ``nvidia-smi`` every 0.5 s (None: no GPU)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        self.available = shutil.which("nvidia-smi") is not None

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            values = [float(v) for v in out.split() if v.strip()]
            if values:
                self.samples.append(sum(values) / len(values))

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def modality(checkpoint: str) -> str | None:
    """The modality a benchmark runs a packaged checkpoint with (SevenNet-MF-0: PBE)."""
    return "PBE" if checkpoint == "7net-mf-0" else None


def extract_once(family: str, checkpoint: str, dataset: dict, extraction: dict, output: str,
                 source: str, environments: dict | None = None):
    """``latentray``'s extraction stage (``run_extraction``) of one model (id ``m``, every
    layer) into ``output``, on the running Ray cluster or a new local one; returns the
    extraction summary and the seconds per stage. ``environments``: the config's (a family
    in its own interpreter)."""
    import ray

    from latentray.config import parse_config
    from latentray.job import StageLog
    from latentray.extraction.stage import run_extraction
    from latentray.store import Store

    config = parse_config({
        "output": output, "datasets": [dataset],
        "models": [{"id": "m", "family": family, "checkpoint": checkpoint,
                    "modality": modality(checkpoint), "layers": ["all"]}],
        "extraction": extraction, "environments": environments or {}}, source=source)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    log = StageLog(quiet=True)
    summary = run_extraction(config, Store(output), ray, log)
    return summary, log.seconds


def extraction_rate(family: str, checkpoint: str, *, structures: int, actors: int,
                    shard_size: int, batch_atoms: int, gpus_per_actor: float = 0.0,
                    graph_builders: int = 0, workdir: Path) -> dict:
    """One fresh extraction of one model by ``latentray``'s pipeline; its rate and timings."""
    output = Path(tempfile.mkdtemp(dir=workdir))
    with GPUSampler() as gpu:
        summary, seconds = extract_once(
            family, checkpoint,
            {"name": "mad", "path": "builtin:mad-val-1000", "limit": structures},
            {"shard_size": shard_size, "batch_atoms": batch_atoms, "actors": actors,
             "gpus_per_actor": gpus_per_actor, "graph_builders": graph_builders},
            str(output), source="benchmarks/scaling.py")
    shutil.rmtree(output)
    t = summary.totals
    return {"model": f"{family} {checkpoint}", "actors": actors,
            "graph_builders": graph_builders, "gpus_per_actor": gpus_per_actor,
            "batch_atoms": batch_atoms, "structures": t.structures, "atoms": t.atoms,
            "failed": t.failed, "units": t.ran, "describe_s": seconds["describe"],
            "extract_s": seconds["extract"],
            "atoms_per_s": t.atoms / seconds["extract"], "gpu_util": gpu.mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["chgnet:0.3.0", "sevenn:7net-0"])
    parser.add_argument("--structures", type=int, default=400)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=25)
    parser.add_argument("--batch-atoms", type=int, default=128)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--graph-builders", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = parser.parse_args()

    import ray
    import torch

    machine = describe(torch=torch.__version__, ray=ray.__version__,
                       latentray=version("latentray"))
    print(json.dumps(machine))
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec in args.models:
            family, checkpoint = spec.split(":", 1)
            for n in args.actors:
                rows.append(extraction_rate(
                    family, checkpoint, structures=args.structures, actors=n,
                    shard_size=args.shard_size, batch_atoms=args.batch_atoms,
                    gpus_per_actor=args.gpus_per_actor, graph_builders=args.graph_builders,
                    workdir=Path(workdir)))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| model | actors | GPUs per actor | graph builders | atoms per batch | atoms "
          "| extraction (s) | atoms/s | vs 1 actor | GPU utilisation |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        one = next((x for x in rows if x["model"] == r["model"] and x["actors"] == 1), None)
        ratio = f"{r['atoms_per_s'] / one['atoms_per_s']:.2f}x" if one else ""
        gpu = f"{r['gpu_util']:.0f}%" if r["gpu_util"] is not None else "no GPU"
        print(f"| {r['model']} | {r['actors']} | {r['gpus_per_actor']:g} | "
              f"{r['graph_builders']} | {r['batch_atoms']} | {r['atoms']:,} | "
              f"{r['extract_s']:.1f} | {r['atoms_per_s']:,.0f} | {ratio} | {gpu} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
