"""The job: datasets -> latents (Ray actors) -> cumulants and fits -> report.

The driver reads the datasets into shards, puts them in Ray's object store, asks the
actors to describe each model, skips every (shard, model) unit whose manifest entry
matches its inputs, runs the rest, then runs the analysis and writes the report. It
never imports a model package.
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from . import __version__
from .config import Config, config_to_dict
from .datasets import iter_shards
from .extract import ExtractionWorker, unit_inputs
from .models.base import resolve_layers
from .store import FAILURE_SCHEMA, INPUT, Store


class UnitsFailed(RuntimeError):
    """Extraction units that failed after Ray's retries; the finished ones are kept."""


@dataclass
class StageLog:
    """Progress lines on stdout and the time spent per stage."""

    quiet: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def __call__(self, stage: str, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self._start
            print(f"[{elapsed:7.1f}s] {stage:<8} {message}", flush=True)

    def timed(self, stage: str):
        log = self

        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                log.seconds[stage] = log.seconds.get(stage, 0.0) + time.perf_counter() - self.t

        return _Timer()


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


def environment_groups(config: Config) -> list[tuple[dict | None, list]]:
    """Models grouped by the environment their family's actors run in, in config order.

    ``environments: {FAMILY: {python: PATH}}`` runs the family's actors with that interpreter
    (a prepared environment: offline, built once); ``{pip: [REQUIREMENT, ...]}`` lets Ray
    build the environment (once, then cached by Ray). Either way the workers import the
    driver's own latentray (``PYTHONPATH``: its source must be at the same path on every node,
    as on one machine or a shared file system; elsewhere install latentray into the family's
    environment with ``pip install --no-deps``). Families without an entry run in the
    driver's environment (``None``).
    """
    import latentray

    groups: dict[str, tuple[dict | None, list]] = {}
    for m in config.models:
        spec = config.environments.get(m.family)
        key = json.dumps(spec, sort_keys=True) if spec else ""
        if key not in groups:
            runtime_env = None
            if spec:
                source = os.path.dirname(os.path.dirname(os.path.abspath(latentray.__file__)))
                runtime_env = {"env_vars": {"PYTHONPATH": source}}
                if "python" in spec:
                    runtime_env["py_executable"] = os.path.abspath(spec["python"])
                if "pip" in spec:
                    runtime_env["pip"] = list(spec["pip"])
            groups[key] = (runtime_env, [])
        groups[key][1].append(m)
    return list(groups.values())


def _n_actors(config: Config, ray, pending: int) -> int:
    """``extraction.actors``, or as many extraction actors as the cluster's resources hold
    now, each with its CPUs, its GPUs and its graph builders' CPUs."""
    e = config.extraction
    if e.actors:
        n = e.actors
    else:
        res = ray.cluster_resources()
        n = int(res.get("CPU", 1) // (e.cpus_per_actor + e.graph_builders))
        if e.gpus_per_actor:
            n = min(n, int(res.get("GPU", 0) // e.gpus_per_actor))
    return max(1, min(n, max(pending, 1)))


@dataclass
class Slot:
    """An extraction actor and the graph builders (CPU actors) that work ahead of it; with
    builders, the three live in one placement group, packed onto one node where it fits."""

    actor: Any
    builders: list
    group: Any = None  # the placement group, or None

    def bundle(self, index: int) -> dict:
        """Ray options that place an actor in bundle ``index`` of the group."""
        if self.group is None:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=index)}

    def kill(self, ray) -> None:
        for actor in [self.actor, *self.builders]:
            ray.kill(actor)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)


def _start_slot(worker_cls, config: Config, runtime_env: dict | None) -> Slot:
    e = config.extraction
    slot = Slot(actor=None, builders=[])
    if e.graph_builders:
        from ray.util.placement_group import placement_group

        main = {"CPU": e.cpus_per_actor, **({"GPU": e.gpus_per_actor} if e.gpus_per_actor
                                             else {})}
        slot.group = placement_group([main] + [{"CPU": 1}] * e.graph_builders, strategy="PACK")
        slot.builders = [worker_cls.options(runtime_env=runtime_env, num_cpus=1, num_gpus=0,
                                            **slot.bundle(k + 1)).remote(torch_threads=1)
                         for k in range(e.graph_builders)]
    slot.actor = _new_actor(worker_cls, config, runtime_env, slot)
    return slot


def _new_actor(worker_cls, config: Config, runtime_env: dict | None, slot: Slot):
    return worker_cls.options(runtime_env=runtime_env, **slot.bundle(0)).remote(
        torch_threads=config.extraction.cpus_per_actor)


def write_shard_tables(store: Store, shard) -> None:
    """A shard's structures (with geometry), the frames that could not be read
    (``failures/.../model=input``) and those the filters dropped (``dropped/``); structures
    are rewritten only when their content changed (keeps re-runs cheap)."""
    path = store.structures_path(shard.dataset, shard.shard)
    if store.parquet_metadata(path).get("latentray.shard_sha256") != shard.content_hash():
        store.write_table(path, shard.table())
    store.write_table(
        posixpath.join(store.failures_dir(shard.dataset, INPUT), store.part(shard.shard)),
        pa.table({"structure_id": pa.array([f for f, _ in shard.failures], pa.string()),
                  "structure_index": pa.array([-1] * len(shard.failures), pa.int64()),
                  "n_atoms": pa.array([-1] * len(shard.failures), pa.int64()),
                  "stage": pa.array(["read"] * len(shard.failures), pa.string()),
                  "reason": pa.array([r for _, r in shard.failures], pa.string())},
                 schema=FAILURE_SCHEMA))
    store.write_table(
        store.path("dropped", f"dataset={shard.dataset}", store.part(shard.shard)),
        pa.table({"structure_id": pa.array([f for f, _ in shard.dropped], pa.string()),
                  "reason": pa.array([r for _, r in shard.dropped], pa.string())}))


def run_extraction(config: Config, store: Store, ray, log: StageLog,
                   limit: int | None = None) -> dict:
    """Read datasets, run every pending (shard, model) unit; return the extraction summary."""
    e = config.extraction
    shards = []  # (dataset, shard number, hash, object ref, n structures, n atoms)
    counts = {}
    with log.timed("read"):
        for d in config.datasets:
            n_max = min(x for x in (limit, d.limit, float("inf")) if x is not None)
            n_max = None if n_max == float("inf") else int(n_max)
            c = counts[d.name] = {"structures": 0, "atoms": 0, "shards": 0, "failed": 0,
                                  "dropped": 0}
            for shard in iter_shards(d.name, d.path, d.format, d.subset_key, e.shard_size,
                                     n_max, d.filters, d.on_error):
                write_shard_tables(store, shard)
                shards.append((d.name, shard.shard, shard.content_hash(), ray.put(shard),
                               len(shard), int(shard.n_atoms.sum())))
                c["structures"] += len(shard)
                c["atoms"] += int(shard.n_atoms.sum())
                c["shards"] += 1
                c["failed"] += len(shard.failures)
                c["dropped"] += len(shard.dropped)
                for structure_id, reason in shard.failures[:3]:
                    log("read", f"    cannot read {structure_id}: {reason}")
            log("read", f"{d.name}: {c['structures']} structures, {c['atoms']} atoms, "
                        f"{c['shards']} shard(s) of {e.shard_size}; {c['failed']} frame(s) "
                        f"could not be read (failures/), {c['dropped']} dropped by filters "
                        f"(dropped/)")

    worker_cls = ray.remote(num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor,
                            max_restarts=2, max_task_retries=2)(ExtractionWorker)
    descriptions: dict = {}
    layers: dict = {}
    totals = {"units": 0, "skipped": 0, "ran": 0, "structures": 0, "atoms": 0, "failed": 0}
    failed_units: list[str] = []
    # one pool of actors per environment, one pool at a time (each holds the CPUs it needs)
    for runtime_env, models in environment_groups(config):
        n_group_units = len(shards) * len(models)
        slots = [_start_slot(worker_cls, config, runtime_env)
                 for _ in range(_n_actors(config, ray, n_group_units))]
        actors = [slot.actor for slot in slots]
        if runtime_env:
            log("extract", f"{', '.join(m.id for m in models)}: {len(actors)} actor(s) in the "
                           f"environment of family {models[0].family!r}")
        if e.graph_builders:
            log("extract", f"{e.graph_builders} graph builder(s) per extraction actor")

        with log.timed("describe"):
            descriptions.update(zip(
                [m.id for m in models],
                ray.get([actors[i % len(actors)].describe.remote(m)
                         for i, m in enumerate(models)])))
        layers.update({m.id: resolve_layers(m.layers,
                                            list(descriptions[m.id]["info"]["layer_widths"]))
                       for m in models})
        for m in models:
            widths = descriptions[m.id]["info"]["layer_widths"]
            log("models", f"{m.id}: {m.family} {m.checkpoint}"
                          f"{' (' + m.modality + ')' if m.modality else ''}, layers "
                          + ", ".join(f"{name}[{widths[name]}]" for name in layers[m.id]))

        # plan: model-major, so that each actor keeps loading the same model
        todo, skipped = [], 0
        for m in models:
            for dataset, number, shard_hash, ref, n_s, n_a in shards:
                inputs = unit_inputs(shard_hash, dataset, number, m, layers[m.id], descriptions[m.id])
                entry = store.read_json(store.manifest_path(dataset, m.id, number))
                if entry is not None and entry.get("inputs") == inputs and all(
                        store.exists(p) for p in entry["outputs"]["files"].values()):
                    skipped += 1
                    continue
                todo.append((m, dataset, number, ref, inputs))
        log("extract", f"{n_group_units} unit(s): {skipped} already done (manifest matches), "
                       f"{len(todo)} to run on {len(actors)} actor(s)")
        totals["units"] += n_group_units
        totals["skipped"] += skipped
        with log.timed("extract"):
            t_start = time.perf_counter()
            group_results = _run_units(
                todo, slots, lambda slot: _new_actor(worker_cls, config, runtime_env, slot),
                layers, store, e.batch_atoms, ray, log, totals, failed_units)
            if todo:
                wall = time.perf_counter() - t_start
                atoms = sum(int(r["atoms"]) for r in group_results)
                log("extract", f"ran {len(todo)} unit(s) in {wall:.1f} s: "
                               f"{atoms / wall:.0f} atoms/s over all actors")
            else:
                log("extract", "nothing to extract: every unit is already done")
        for slot in slots:
            slot.kill(ray)
    if failed_units:
        raise UnitsFailed(f"{len(failed_units)} extraction unit(s) failed, so nothing was "
                          f"analysed (the units that finished are kept; a re-run does only "
                          f"the rest; `latentray status {store.uri}` lists them): "
                          + "; ".join(failed_units[:5]))
    return {"descriptions": descriptions, "layers": layers, "totals": totals,
            "datasets": counts}


def _run_units(todo: list, slots: list[Slot], new_actor, layers: dict, store: Store,
               batch_atoms: int, ray, log: StageLog, totals: dict, failed_units: list) -> list:
    """Run ``todo`` units, one unit per idle extraction actor; record each unit in the
    manifest as it finishes. A unit that fails (after Ray's retries: an actor killed in the
    middle of a unit is restarted and the unit run again) is recorded with its error and the
    others go on; an actor that is gone for good is replaced."""
    queue, running, results, idle = list(todo), {}, [], list(slots)
    n_done = 0
    while queue or running:
        while queue and idle:
            slot = idle.pop()
            m, dataset, number, ref, inputs = unit = queue.pop(0)
            running[slot.actor.run_unit.remote(m, layers[m.id], [ref], store.uri, batch_atoms,
                                               slot.builders)] = (slot, unit)
        done, _ = ray.wait(list(running), num_returns=1)
        for future in done:
            slot, (m, dataset, number, ref, inputs) = running.pop(future)
            manifest = store.manifest_path(dataset, m.id, number)
            finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            n_done += 1
            try:
                result = ray.get(future)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                if isinstance(exc, ray.exceptions.RayActorError):
                    reason = f"the extraction actor died and its restarts are spent: {exc}"
                    ray.kill(slot.actor)
                    slot.actor = new_actor(slot)
                else:
                    cause = getattr(exc, "cause", None) or exc
                    reason = f"{type(cause).__name__}: {cause}"
                reason = " ".join(reason.split())[:2000]
                store.write_json(manifest, {"inputs": inputs, "error": reason,
                                            "requested_layers": list(m.layers),
                                            "finished": finished})
                failed_units.append(f"{m.id} {dataset} shard {number}: {reason[:300]}")
                log("extract", f"[{n_done}/{len(todo)}] {m.id} {dataset} shard {number}: "
                               f"FAILED: {reason[:300]}")
                idle.append(slot)
                continue
            idle.append(slot)
            results.append(result)
            store.write_json(manifest, {
                "inputs": inputs,
                "requested_layers": list(m.layers),
                "outputs": {"files": result["files"], "structures": result["structures"],
                            "processed": result["processed"], "failed": result["failed"],
                            "atoms": result["atoms"]},
                "seconds": result["seconds"],
                "worker": result["worker"],
                "finished": finished,
            })
            totals["ran"] += 1
            for key in ("structures", "atoms", "failed"):
                totals[key] += result[key]
            rate = result["atoms"] / max(result["seconds"]["wall"], 1e-9)
            log("extract", f"[{n_done}/{len(todo)}] {m.id} {dataset} shard {number}: "
                           f"{result['processed']}/{result['structures']} structures, "
                           f"{result['atoms']} atoms, {result['failed']} failed, "
                           f"{rate:.0f} atoms/s")
            for example in result["failure_examples"]:
                log("extract", f"    failed: {example}")
    return results


def run(config: Config, *, limit: int | None = None, address: str | None = None,
        quiet: bool = False) -> dict:
    """Run the whole job; return a summary (also written to ``OUTPUT/run.json``)."""
    from .analysis import run_analysis
    from .report import write_report

    log = StageLog(quiet=quiet)
    store = Store(config.output)
    log("start", f"latentray {__version__}: config {config.source}, output {store.uri}"
                 + (f", first {limit} structures of each dataset" if limit else ""))
    ray = _ray_init(address, log)
    extraction = run_extraction(config, store, ray, log, limit=limit)
    with log.timed("analyse"):
        results, analysis_info = run_analysis(config, store, extraction, log)
    run_provenance = provenance(config, extraction, limit)
    with log.timed("report"):
        report_path = write_report(config, store, results, extraction, analysis_info,
                                   run_provenance, log)
    summary = {
        "provenance": run_provenance,
        "extraction": extraction["totals"],
        "analysis": analysis_info,
        "seconds": log.seconds,
        "report": report_path,
    }
    store.write_json(store.path("run.json"), summary)
    t = extraction["totals"]
    n_s = sum(d["structures"] for d in extraction["datasets"].values())
    n_a = sum(d["atoms"] for d in extraction["datasets"].values())
    log("done", f"{n_s} structures, {n_a} atoms, {len(config.models)} models; units: "
                f"{t['ran']} ran, {t['skipped']} skipped; {t['failed']} structure failures "
                f"in the units run")
    log("done", "time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in log.seconds.items()))
    log("done", f"report: {report_path}")
    return summary


def provenance(config: Config, extraction: dict, limit: int | None) -> dict:
    """What produced these numbers: versions, models with checkpoint hashes, data counts."""
    import ray

    versions = {"latentray": __version__, "python": sys.version.split()[0],
                "numpy": np.__version__, "pyarrow": pa.__version__, "ray": ray.__version__,
                "platform": platform.platform()}
    models = []
    for m in config.models:
        d = extraction["descriptions"][m.id]
        models.append({"id": m.id, "family": m.family, "checkpoint": m.checkpoint,
                       "modality": m.modality, "options": m.options, "dtype": m.dtype,
                       "checkpoint_sha256": d["info"]["checkpoint_sha256"],
                       "checkpoint_file": os.path.basename(d["info"]["checkpoint_file"]),
                       "family_package_version": d["code"]["family_package_version"],
                       "layers": {k: d["info"]["layer_widths"][k]
                                  for k in extraction["layers"][m.id]}})
    return {"config": config_to_dict(config), "config_source": config.source, "limit": limit,
            "versions": versions, "models": models, "datasets": extraction["datasets"],
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
