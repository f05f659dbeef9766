"""The job: datasets -> latents (Ray actors) -> cumulants and fits -> report.

The driver asks the actors to describe each model (refusing a model or layer that does not
exist before anything is written), reads the datasets into shards, skips every (shard,
model) unit whose manifest entry matches its inputs, runs the rest
(:mod:`latentray.extraction`), then runs the analysis (:mod:`latentray.analysis`) and writes
the report (:mod:`latentray.report`). It never imports a model package.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from . import __version__
from .config import Config, config_to_dict
from .extraction.stage import run_extraction
from .records import ExtractionSummary
from .store import Store


@dataclass
class StageLog:
    """Progress lines on stdout and the time spent per stage. A stage timed inside another
    is not counted in the outer one (``seconds`` add up to the timed wall time);
    ``timeline``: every timed stage's ``(name, start, end)`` in Unix seconds."""

    quiet: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)
    timeline: list[tuple[str, float, float]] = field(default_factory=list)
    _open: list[str] = field(default_factory=list)

    def __call__(self, stage: str, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self._start
            print(f"[{elapsed:7.1f}s] {stage:<8} {message}", flush=True)

    @contextlib.contextmanager
    def timed(self, stage: str):
        t, start = time.perf_counter(), time.time()
        self._open.append(stage)
        try:
            yield
        finally:
            self._open.pop()
            spent = time.perf_counter() - t
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
            self.timeline.append((stage, round(start, 3), round(start + spent, 3)))
            if self._open:  # the enclosing stage adds its whole time when it ends
                self.seconds[self._open[-1]] = self.seconds.get(self._open[-1], 0.0) - spent


def _ray_init(address: str | None, log: StageLog):
    import ray

    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                  configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
        log("ray", f"connected to the cluster at {address}")
    else:
        # connects to a running cluster (RAY_ADDRESS, or `ray start` on this node) if any,
        # otherwise starts a local one
        ray.init(**kwargs)
        res = ray.cluster_resources()
        log("ray", f"cluster: {int(res.get('CPU', 0))} CPU, {int(res.get('GPU', 0))} GPU, "
                   f"{len(ray.nodes())} node(s)")
    return ray


def run(config: Config, *, limit: int | None = None, address: str | None = None,
        quiet: bool = False) -> dict:
    """Run the whole job; return a summary (also written to ``OUTPUT/run.json``)."""
    from .analysis.stage import run_analysis
    from .report.page import write_report

    log = StageLog(quiet=quiet)
    store = Store(config.output)
    log("start", f"latentray {__version__}: config {config.source}, output {store.uri}"
                 + (f", first {limit} structures of each dataset" if limit else ""))
    with log.timed("ray"):
        ray = _ray_init(address, log)
    extraction = run_extraction(config, store, ray, log, limit=limit)
    with log.timed("analyse"):
        _, analysis_info = run_analysis(config, store, extraction, log)
    run_provenance = provenance(config, extraction, limit)
    with log.timed("report"):
        report_path = write_report(config, store, analysis_info, run_provenance, log)
    summary = {
        "provenance": run_provenance,
        "extraction": asdict(extraction.totals),
        "analysis": analysis_info,
        "seconds": log.seconds,
        "timeline": log.timeline,
        "report": report_path,
    }
    store.write_json(store.path("run.json"), summary)
    t = extraction.totals
    n_s = sum(d.structures for d in extraction.datasets.values())
    n_a = sum(d.atoms for d in extraction.datasets.values())
    log("done", f"{n_s} structures, {n_a} atoms, {len(config.models)} models; units: "
                f"{t.ran} ran, {t.skipped} skipped; {t.failed} structure failures "
                f"in the units run")
    log("done", "time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in log.seconds.items()))
    log("done", f"report: {report_path}")
    return summary


def provenance(config: Config, extraction: ExtractionSummary, limit: int | None) -> dict:
    """What produced these numbers: versions, models with checkpoint hashes and their
    family's distribution and version, data counts."""
    import ray

    versions = {"latentray": __version__, "python": sys.version.split()[0],
                "numpy": np.__version__, "pyarrow": pa.__version__, "ray": ray.__version__,
                "platform": platform.platform()}
    models = []
    for m in config.models:
        d = extraction.descriptions[m.id]
        models.append({"id": m.id, "family": m.family, "checkpoint": m.checkpoint,
                       "modality": m.modality, "options": m.options, "dtype": m.dtype,
                       "checkpoint_sha256": d.checkpoint_sha256,
                       "checkpoint_file": os.path.basename(d.checkpoint_file),
                       "family_distribution": d.distribution,
                       "family_package_version": d.version,
                       "layers": {k: d.layer_widths[k] for k in extraction.layers[m.id]}})
    return {"config": config_to_dict(config), "config_source": config.source, "limit": limit,
            "versions": versions, "models": models,
            "datasets": {name: asdict(c) for name, c in extraction.datasets.items()},
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
