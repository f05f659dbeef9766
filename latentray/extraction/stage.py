"""The extraction stage: describe every model, read the datasets, run the pending units.

Order matters for a clear failure: the models are described first (an actor per
environment loads each model and reports its layers, widths, hashes and versions), so that
a checkpoint, modality or layer that does not exist is refused (:class:`ConfigError`)
before any dataset is read or any file written. Then the datasets are read into shards
(written to ``structures/``), and every (shard, model) unit whose manifest entry does not
match its inputs (:mod:`latentray.extraction.manifest`) runs on a pool of extraction
actors, one pool per environment at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..config import Config, ConfigError, ExtractionConfig
from ..datasets import DatasetError, iter_shards, resolve_paths
from ..models.base import resolve_layers
from ..records import DatasetCounts, ExtractionSummary, ModelDescription, UnitTotals
from ..shards import write_shard_tables
from ..store import Store
from .manifest import ManifestEntry, UnitInputs, explain, read_entry
from .worker import ExtractionWorker

class UnitsFailed(RuntimeError):
    """Extraction units that failed after Ray's retries; the finished ones are kept."""


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


def n_actors(e: ExtractionConfig, resources: dict[str, float], pending: int) -> int:
    """``extraction.actors``, or as many extraction actors as ``resources`` (the cluster's,
    now) hold, each with its CPUs, its GPUs and its graph builders' CPUs; never more than the
    ``pending`` units, never fewer than one."""
    if e.actors:
        n = e.actors
    else:
        n = int(resources.get("CPU", 1) // (e.cpus_per_actor + e.graph_builders))
        if e.gpus_per_actor:
            n = min(n, int(resources.get("GPU", 0) // e.gpus_per_actor))
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


def _worker_class(config: Config, ray):
    e = config.extraction
    return ray.remote(num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor,
                      max_restarts=2, max_task_retries=2)(ExtractionWorker)


def describe_models(config: Config, ray, log) -> tuple[dict[str, ModelDescription],
                                                        dict[str, tuple[str, ...]]]:
    """Load every model once in an actor of its environment; return each model's
    description and the concrete layers its config names. A model that cannot be loaded
    as configured (checkpoint, modality, options) or a layer it does not have is a
    :class:`ConfigError` naming the model and the choices; nothing is written."""
    worker_cls = _worker_class(config, ray)
    index = {m.id: i for i, m in enumerate(config.models)}
    descriptions: dict[str, ModelDescription] = {}
    layers: dict[str, tuple[str, ...]] = {}
    with log.timed("describe"):
        for runtime_env, models in environment_groups(config):
            actors = [worker_cls.options(runtime_env=runtime_env).remote(
                torch_threads=config.extraction.cpus_per_actor)
                for _ in range(n_actors(config.extraction, ray.cluster_resources(),
                                        len(models)))]
            futures = [actors[i % len(actors)].describe.remote(m) for i, m in enumerate(models)]
            try:
                for m, future in zip(models, futures):
                    where = f"{config.source}: models[{index[m.id]}] ({m.id})"
                    try:
                        descriptions[m.id] = ray.get(future)
                    except ray.exceptions.RayTaskError as exc:
                        cause = getattr(exc, "cause", None) or exc
                        raise ConfigError(f"{where}: family {m.family!r} cannot load "
                                          f"checkpoint {m.checkpoint!r} as configured: "
                                          f"{type(cause).__name__}: {cause}") from None
                    try:
                        layers[m.id] = tuple(resolve_layers(
                            m.layers, list(descriptions[m.id].layer_widths)))
                    except ValueError as exc:
                        raise ConfigError(f"{where}.layers: {exc}") from None
            finally:
                for actor in actors:
                    ray.kill(actor)
    for m in config.models:
        d = descriptions[m.id]
        log("models", f"{m.id}: {m.family} {m.checkpoint}"
                      f"{' (' + m.modality + ')' if m.modality else ''} ({d.distribution} "
                      f"{d.version}), layers "
                      + ", ".join(f"{name}[{d.layer_widths[name]}]" for name in layers[m.id]))
    return descriptions, layers


def read_datasets(config: Config, store: Store, log, limit: int | None = None):
    """Read every dataset into shards, written to ``structures/`` (where the extraction units
    read them: the driver holds one shard at a time); return ``[(dataset, shard number,
    content hash)]`` and the counts."""
    e = config.extraction
    shards = []
    counts: dict[str, DatasetCounts] = {}
    with log.timed("read"):
        for d in config.datasets:
            n_max = min(x for x in (limit, d.limit, float("inf")) if x is not None)
            n_max = None if n_max == float("inf") else int(n_max)
            c = {"structures": 0, "atoms": 0, "shards": 0, "failed": 0, "dropped": 0}
            for shard in iter_shards(d.name, d.path, d.format, d.subset_key, e.shard_size,
                                     n_max, d.filters, d.on_error):
                write_shard_tables(store, shard)
                shards.append((d.name, shard.shard, shard.content_hash()))
                c["structures"] += len(shard)
                c["atoms"] += int(shard.n_atoms.sum())
                c["shards"] += 1
                c["failed"] += len(shard.failures)
                c["dropped"] += len(shard.dropped)
                for structure_id, reason in shard.failures[:3]:
                    log("read", f"    cannot read {structure_id}: {reason}")
            counts[d.name] = DatasetCounts(**c)
            log("read", f"{d.name}: {c['structures']} structures, {c['atoms']} atoms, "
                        f"{c['shards']} shard(s) of {e.shard_size}; {c['failed']} frame(s) "
                        f"could not be read (failures/), {c['dropped']} dropped by filters "
                        f"(dropped/)")
    return shards, counts


def run_extraction(config: Config, store: Store, ray, log,
                   limit: int | None = None) -> ExtractionSummary:
    """Check the datasets' paths, describe the models, read the datasets, run every pending
    (shard, model) unit."""
    e = config.extraction
    for i, d in enumerate(config.datasets):
        try:
            resolve_paths(d.path)
        except DatasetError as exc:
            raise ConfigError(f"{config.source}: datasets[{i}] ({d.name}).path: {exc}") from None
    descriptions, layers = describe_models(config, ray, log)
    shards, counts = read_datasets(config, store, log, limit)
    worker_cls = _worker_class(config, ray)
    totals = {"units": 0, "skipped": 0, "ran": 0, "structures": 0, "atoms": 0, "failed": 0}
    failed_units: list[str] = []
    # one pool of actors per environment, one pool at a time (each holds the CPUs it needs)
    for runtime_env, models in environment_groups(config):
        n_group_units = len(shards) * len(models)
        # plan: model-major, so that each actor keeps loading the same model
        todo, skipped = [], 0
        for m in models:
            for dataset, number, shard_hash in shards:
                inputs = UnitInputs.of(dataset, number, shard_hash, m, layers[m.id],
                                       descriptions[m.id])
                state, _ = explain(read_entry(store, dataset, m.id, number),
                                   dataclasses.asdict(inputs), store)
                if state == "done":
                    skipped += 1
                    continue
                todo.append((m, dataset, number, shard_hash, inputs))
        totals["units"] += n_group_units
        totals["skipped"] += skipped
        if not todo:
            log("extract", f"{n_group_units} unit(s): {skipped} already done (manifest "
                           f"matches), 0 to run")
            continue
        slots = [_start_slot(worker_cls, config, runtime_env)
                 for _ in range(n_actors(config.extraction, ray.cluster_resources(), len(todo)))]
        if runtime_env:
            log("extract", f"{', '.join(m.id for m in models)}: {len(slots)} actor(s) in the "
                           f"environment of family {models[0].family!r}")
        if e.graph_builders:
            log("extract", f"{e.graph_builders} graph builder(s) per extraction actor")
        log("extract", f"{n_group_units} unit(s): {skipped} already done (manifest matches), "
                       f"{len(todo)} to run on {len(slots)} actor(s)")
        with log.timed("extract"):
            t_start = time.perf_counter()
            group_results = _run_units(
                todo, slots, lambda slot: _new_actor(worker_cls, config, runtime_env, slot),
                layers, descriptions, store, e.batch_atoms, ray, log, totals, failed_units)
            wall = time.perf_counter() - t_start
            atoms = sum(int(r["atoms"]) for r in group_results)
            log("extract", f"ran {len(todo)} unit(s) in {wall:.1f} s: "
                           f"{atoms / wall:.0f} atoms/s over all actors")
        for slot in slots:
            slot.kill(ray)
    if failed_units:
        raise UnitsFailed(f"{len(failed_units)} extraction unit(s) failed, so nothing was "
                          f"analysed (the units that finished are kept; a re-run does only "
                          f"the rest; `latentray status {store.uri}` lists them): "
                          + "; ".join(failed_units[:5]))
    return ExtractionSummary(descriptions=descriptions, layers=layers,
                             totals=UnitTotals(**totals), datasets=counts)


def _run_units(todo: list, slots: list[Slot], new_actor, layers: dict, descriptions: dict,
               store: Store, batch_atoms: int, ray, log, totals: dict,
               failed_units: list) -> list:
    """Run ``todo`` units, one unit per idle extraction actor; record each unit in the
    manifest as it finishes. A unit that fails (after Ray's retries: an actor killed in the
    middle of a unit is restarted and the unit run again) is recorded with its error and the
    others go on; an actor that is gone for good is replaced."""
    queue, running, results, idle = list(todo), {}, [], list(slots)
    n_done = 0
    while queue or running:
        while queue and idle:
            slot = idle.pop()
            m, dataset, number, shard_hash, inputs = unit = queue.pop(0)
            running[slot.actor.run_unit.remote(m, layers[m.id], dataset, number, shard_hash,
                                               store.uri, batch_atoms, slot.builders)] = \
                (slot, unit)
        done, _ = ray.wait(list(running), num_returns=1)
        for future in done:
            slot, (m, dataset, number, _, inputs) = running.pop(future)
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
                store.write_json(manifest, ManifestEntry(
                    inputs=inputs, requested_layers=tuple(m.layers),
                    layer_widths=descriptions[m.id].layer_widths, error=reason,
                    finished=finished).as_dict())
                failed_units.append(f"{m.id} {dataset} shard {number}: {reason[:300]}")
                log("extract", f"[{n_done}/{len(todo)}] {m.id} {dataset} shard {number}: "
                               f"FAILED: {reason[:300]}")
                idle.append(slot)
                continue
            idle.append(slot)
            results.append(result)
            store.write_json(manifest, ManifestEntry(
                inputs=inputs, requested_layers=tuple(m.layers),
                layer_widths=descriptions[m.id].layer_widths,
                outputs={"files": result["files"], "structures": result["structures"],
                         "processed": result["processed"], "failed": result["failed"],
                         "atoms": result["atoms"]},
                seconds=result["seconds"], worker=result["worker"],
                finished=finished).as_dict())
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
