"""The analysis stage: cumulant files, then every fit the config asks for, then the tables.

For each dataset and compared layer it decides the path (in memory or streaming, from the
size of the latents), brings the cumulant files up to date, plans every fit (ordered pairs of
models, cumulant orders within a model, the last layer against each backbone layer), runs the
ones not in the fit cache (:mod:`latentray.analysis.fit_cache`) as Ray tasks, and writes
``results/reconstruction``, ``results/by_group`` and ``results/maps``. The numbers themselves
are computed in :mod:`latentray.analysis.fits` and :mod:`latentray.analysis.cumulant_stage`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa

from ..config import Config
from ..extraction.manifest import read_entry
from ..method.cumulants import MAX_ORDER
from ..records import ExtractionSummary
from ..results import GROUP_COLUMNS, LAYER_ANALYSIS, ORDER_COLUMNS, RESULT_COLUMNS
from ..store import Store
from .cumulant_stage import shard_cumulants
from .fit_cache import cumulant_code, digest, fit_code, fit_key, read_fits, write_fits
from .fits import (InMemoryFits, StreamedFits, _in_memory_launchers, _Pending,
                   _streaming_launcher)
from .maps import MAP_COLUMNS, model_map, sample
from .plan import Comparison, comparisons, concrete_layer, fit_path


def _failed(store: Store, dataset: str, model: str) -> np.ndarray:
    table = store.read_table(store.failures_dir(dataset, model))
    return np.zeros(0, np.int64) if table is None else table["structure_index"].to_numpy()


def run_analysis(config: Config, store: Store, extraction: ExtractionSummary, log) -> tuple[pd.DataFrame, dict]:
    """Fit every measure the config asks for; write ``results/reconstruction.{csv,parquet}``
    and ``results/by_group.{csv,parquet}``."""
    import ray

    a = config.analyses
    fits = InMemoryFits()
    streamed = StreamedFits(store, a)
    seeds = (a.seed, *a.spread_seeds)
    jobs: list[tuple[dict, tuple, str, object]] = []
    cache = read_fits(store)
    info: dict = {"paths": {}, "left_out": {}}
    models = [m.id for m in config.models]
    map_task = ray.remote(num_cpus=1)(model_map)
    maps: list = []  # futures of the 2-D maps' rows
    sampled: dict = {}  # dataset -> the structures mapped (None: all)

    def submit(base: dict, metrics: tuple[str, ...], inputs: dict, stratified: bool,
               launch) -> None:
        """Run a fit unless one with the same inputs is in ``results/fits.parquet``."""
        key = fit_key(base, inputs[base["source"]], inputs[base["target"]], metrics,
                      a.n_test, stratified)
        done = key in cache and set(cache[key]["values"]) >= set(metrics)
        jobs.append((base, metrics, key, None if done else launch(metrics)))

    for d in config.datasets:
        stratified = d.subset_key is not None
        n_all = extraction.datasets[d.name].structures
        n_shards = extraction.datasets[d.name].shards
        # what each model's latents came from (its units' manifest inputs, per shard) and
        # which structures it could not process: read once per dataset, for every layer
        shard_digests = {m: [read_entry(store, d.name, m, s).inputs.digest()
                             for s in range(n_shards)] for m in models}
        inputs = {m: digest(shard_digests[m]) for m in models}
        failed = {m: _failed(store, d.name, m) for m in models}
        for m in models:
            info["left_out"][f"{d.name}/{m}"] = len(failed[m])
        for layer_name in a.layers:
            chosen = {m: concrete_layer(layer_name, extraction.layers[m]) for m in models}
            missing = [m for m, layer in chosen.items() if layer is None]
            if missing:
                log("analyse", f"layer {layer_name}: not extracted for {missing}; those are left out")
            chosen = {m: layer for m, layer in chosen.items() if layer is not None}
            present = list(chosen)
            widths = {m: extraction.width(m, chosen[m]) for m in present}
            path, size_mb = fit_path(extraction.datasets[d.name].atoms, widths.values(),
                                     a.in_memory_limit_mb)
            info["paths"][f"{d.name}/{layer_name}"] = path
            log("analyse", f"{d.name} layer {layer_name}: {size_mb:.0f} MB of latents "
                           f"({len(present)} models) {'<=' if path == 'in-memory' else '>'} "
                           f"in_memory_limit_mb={a.in_memory_limit_mb}: {path} fits"
                           + ("" if path == "in-memory" else " (hash split)"))

            if "structure" in a.levels:
                with log.timed("cumulants"):
                    computed, reused = _cumulant_stage(store, d.name, chosen, n_shards,
                                                       shard_digests, log)
                info["cumulants_computed"] = info.get("cumulants_computed", 0) + computed
                info["cumulants_reused"] = info.get("cumulants_reused", 0) + reused
                if a.maps:
                    if d.name not in sampled:
                        everything = store.read_table(
                            store.path("structures", f"dataset={d.name}"), n_shards,
                            columns=["structure_index"])["structure_index"].to_numpy()
                        sampled[d.name] = sample(everything, a.maps_max_structures, a.seed)
                    maps += [map_task.remote(store.uri, d.name, layer_name, m, layer, a.order,
                                             n_shards, sampled[d.name], a.maps)
                             for m, layer in chosen.items()]

            between, within = comparisons(a)
            tasks = [(s, t, c, a.metrics) for s in present for t in present if s != t
                     for c in between if a.metrics]
            tasks += [(m, m, c, a.order_metrics) for m in present for c in within]
            if path == "in-memory":
                launchers = _in_memory_launchers(
                    store, d, {m: (m, layer) for m, layer in chosen.items()}, n_shards, a,
                    fits, log)
            for src, tgt, comparison, metrics in tasks:
                n_left = len(np.union1d(failed[src], failed[tgt]))
                for seed in seeds:
                    row = {"dataset": d.name, "source": src, "target": tgt,
                           "layers": layer_name, "source_layer": chosen[src],
                           "target_layer": chosen[tgt], "seed": seed,
                           "n_structures": n_all - n_left, "n_left_out": n_left, "path": path,
                           "level": comparison.level, "features": comparison.features,
                           "source_order": comparison.source_order,
                           "target_order": comparison.target_order}
                    if path == "in-memory":
                        launch = launchers(src, tgt, comparison, seed)
                        row.update(launch.sizes)
                    else:
                        launch = _streaming_launcher(
                            store, d.name, (src, chosen[src], widths[src]),
                            (tgt, chosen[tgt], widths[tgt]), comparison, seed, n_shards, a,
                            stratified, streamed)
                    submit(row, metrics, inputs, stratified, launch)
        if a.layer_metrics:
            for m in models:
                _layer_analysis(store, d, m, extraction, n_shards, a, seeds, n_all,
                                len(failed[m]), stratified, fits, streamed,
                                lambda row, launch: submit(row, a.layer_metrics, inputs,
                                                           stratified, launch), info, log)

    with log.timed("fits"):
        t0 = time.perf_counter()
        fits.flush()
        streamed.flush()
        jobs = [(base, metrics, key, future.ref if isinstance(future, _Pending) else future)
                for base, metrics, key, future in jobs]
        pending = [future for *_, future in jobs if future is not None]
        log("fits", f"{len(jobs)} fits: {len(jobs) - len(pending)} already done (inputs "
                    f"unchanged), {len(pending)} to run")
        info["fits_run"], info["fits_reused"] = len(pending), len(jobs) - len(pending)
        info["in_memory_sides_read"] = fits.sides_read
        while pending:
            _, pending = ray.wait(pending, num_returns=min(len(pending), max(1, len(jobs) // 8)))
            log("fits", f"{len(jobs) - len(pending)}/{len(jobs)} fits done "
                        f"({time.perf_counter() - t0:.1f} s)")
        rows, group_rows = [], []
        for base, metrics, key, future in jobs:
            if future is not None:
                cache[key] = ray.get(future)
            got = cache[key]
            sizes = {k: got[k] for k in ("n_train", "n_test") if k in got}
            for metric in metrics:
                rows.append({**base, **sizes, "metric": metric, "value": got["values"][metric]})
            for g in got["groups"]:
                group_rows.append({**{k: base[k] for k in GROUP_COLUMNS if k in base}, **g})
        write_fits(store, [key for _, _, key, _ in jobs], cache,
                   [fit_code(base["level"]) for base, *_ in jobs])
        results = _write_results(store, "reconstruction", rows, RESULT_COLUMNS)
        _write_results(store, "by_group", group_rows, GROUP_COLUMNS)
    with log.timed("maps"):
        map_rows = pd.concat(ray.get(maps), ignore_index=True) if maps else \
            pd.DataFrame(columns=MAP_COLUMNS)
    store.write_bytes(store.path("results", "maps.csv"),
                      map_rows.to_csv(index=False, float_format="%.10g").encode())
    store.write_table(store.path("results", "maps.parquet"),
                      pa.Table.from_pandas(map_rows, preserve_index=False))
    info["maps"] = len(map_rows)
    log("analyse", f"{len(results)} numbers in results/reconstruction.csv, "
                   f"{len(group_rows)} in results/by_group.csv")
    return results, info


def _write_results(store: Store, name: str, rows: list[dict], columns: list[str]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=columns)
    for column in ORDER_COLUMNS:
        table[column] = table[column].astype("Int64")
    store.write_bytes(store.path("results", f"{name}.csv"),
                      table.to_csv(index=False, float_format="%.10g").encode())
    store.write_table(store.path("results", f"{name}.parquet"),
                      pa.Table.from_pandas(table, preserve_index=False))
    return table


def _layer_analysis(store: Store, d, model: str, extraction: dict, n_shards: int, a,
                    seeds: tuple, n_all: int, n_failed: int, stratified: bool,
                    fits: InMemoryFits, streamed: StreamedFits, submit,
                    info: dict, log) -> None:
    """Within one model, at atom level: ``ll -> bbK`` and ``bbK -> ll`` for every extracted
    backbone layer K (how much of each layer the last layer keeps, and the reverse)."""
    available = extraction.layers[model]
    backbone = [layer for layer in available if layer.startswith("bb")]
    if "ll" not in available or not backbone:
        log("analyse", f"layer analysis: {model} has no extracted ll or bb layer; skipped")
        return
    sides = {layer: (model, layer) for layer in backbone + ["ll"]}
    widths = extraction.descriptions[model].layer_widths
    path, _ = fit_path(extraction.datasets[d.name].atoms, [widths[k] for k in sides],
                       a.in_memory_limit_mb)
    info["paths"][f"{d.name}/{model}/{LAYER_ANALYSIS}"] = path
    atoms = Comparison("atom", "atoms")
    if path == "in-memory":
        launchers = _in_memory_launchers(store, d, sides, n_shards, a, fits, log,
                                         structure=False)
    for layer in backbone:
        for src, tgt in ((layer, "ll"), ("ll", layer)):
            for seed in seeds:
                row = {"dataset": d.name, "source": model, "target": model,
                       "layers": LAYER_ANALYSIS, "source_layer": src, "target_layer": tgt,
                       "seed": seed, "n_structures": n_all - n_failed, "n_left_out": n_failed,
                       "path": path, "level": "atom", "features": "atoms",
                       "source_order": None, "target_order": None}
                if path == "in-memory":
                    launch = launchers(src, tgt, atoms, seed)
                    row.update(launch.sizes)
                else:
                    launch = _streaming_launcher(
                        store, d.name, (*sides[src], widths[src]), (*sides[tgt], widths[tgt]),
                        atoms, seed, n_shards, a, stratified, streamed)
                submit(row, launch)


def _cumulant_stage(store: Store, dataset: str, chosen: dict[str, str], n_shards: int,
                    shard_digests: dict[str, list[str]], log) -> tuple[int, int]:
    """Bring the cumulant files of every (model, layer, shard) up to date, as Ray tasks;
    return how many shards were computed and how many were already up to date."""
    import ray

    task = ray.remote(num_cpus=1)(shard_cumulants)
    t = time.perf_counter()
    code = cumulant_code()
    futures = [task.remote(store.uri, dataset, m, layer, s,
                           digest({"inputs": shard_digests[m][s], "code": code}))
               for m, layer in chosen.items() for s in range(n_shards)]
    computed = sum(ray.get(futures))
    log("cumulants", f"cumulant features (orders 1-{MAX_ORDER}) of {len(chosen)} models x "
                     f"{n_shards} shard(s): {computed} computed, {len(futures) - computed} "
                     f"unchanged ({time.perf_counter() - t:.1f} s)")
    return computed, len(futures) - computed
