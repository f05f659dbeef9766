"""Analysis stage: structure features by cumulants, and reconstruction measures between
every ordered pair of models, at atom and at structure level.

For a pair (A, B) the rows compared are the atoms (or structures) of the structures that
both models processed, in dataset order (structure_index, then atom_index). Two paths, the
same measures:

* **in memory** (data up to ``analyses.in_memory_limit_mb``): every model's rows are read
  whole and the split is the paper's (:func:`latentray.splits.paper_split`, stratified by
  subset); the numbers are skmatter's.
* **streaming** (larger data): the fits run from mergeable statistics over the Parquet
  shards (:mod:`latentray.streaming`), never holding a model's rows whole, with the split
  rule that needs no per-row state (:class:`latentray.streaming.HashSplit`: the ``n_test``
  rows of smallest hash key, stratified by subset; fold from the key's last bit).

The table says which path (and so which split) each number came from, and how many
structures were left out. Cumulant features are a stage of their own: one Parquet file per
(model, layer, shard), recomputed only when that shard's latents change. Within each model,
the same measures compare cumulant orders (n -> n + 1) and, with ``analyses.layer_metrics``,
the last layer with each backbone layer (rows with ``layers = "ll-vs-bb"``); the 2-D maps of
the structure features (:mod:`latentray.maps`) are Ray tasks beside the fits.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .blocks import PairSource, read_cumulants
from .config import Config
from .cumulants import MAX_ORDER, cumulant_features
from .maps import MAP_COLUMNS, model_map, sample
from .reconstruction import (
    pointwise_global_reconstruction_distortion,
    pointwise_global_reconstruction_error,
    pointwise_local_reconstruction_error,
)
from .splits import SplitError, paper_split, structure_n_test
from .store import Store, features_matrix
from .streaming import HashSplit, RayExecutor, linear_cka, reconstruction_at_scale

RESULT_COLUMNS = ["metric", "level", "features", "dataset", "source", "target", "layers",
                  "source_layer", "target_layer", "source_order", "target_order", "value",
                  "n_train", "n_test", "seed", "n_structures", "n_left_out", "path"]
GROUP_COLUMNS = ["metric", "level", "features", "dataset", "source", "target", "layers",
                 "source_order", "target_order", "seed", "path", "group_kind", "group",
                 "n_test", "value"]
_DERIVED = ("n_structures",)  # row fields that do not change a fit
_ORDER_COLUMNS = ("source_order", "target_order")


def pair_values(rows: pd.DataFrame) -> dict[tuple[str, str], float]:
    """``{(source, target): value}`` of result rows (one metric, level, layer and seed)."""
    return {(s, t): v for s, t, v in zip(rows.source, rows.target, rows.value)}


def measured_both_ways(values: dict[tuple[str, str], float]) -> list[tuple[str, str]]:
    """The unordered pairs ``(A, B)``, A < B, of ``values`` that hold A -> B and B -> A."""
    return sorted({tuple(sorted(k)) for k in values if k[::-1] in values})


@dataclass(frozen=True)
class Comparison:
    """What is compared: atom features, or structure features of some kind and order.

    ``features``: ``atoms`` (atom level); ``cumulants`` ([k1 .. k_order]), ``mean`` or ``sum``
    (mean / sum pooling of the atom features, the baselines; mean pooling is k1).
    Within one model, ``cumulants`` of order n -> n + 1 (or 1 -> 8) is the order analysis.
    """

    level: str
    features: str
    source_order: int | None = None
    target_order: int | None = None

    def columns(self, width: int, side: int) -> int | None:
        """Leading columns of the stored [k1 .. k8] this side uses (None: all)."""
        if self.features == "atoms":
            return None
        order = (self.source_order, self.target_order)[side]
        return width * (order or 1)  # pooling: the k1 block (sum pooling: times n_atoms)


def comparisons(a) -> tuple[list[Comparison], list[Comparison]]:
    """(between models, within one model) for the analysis config ``a``."""
    between, within = [], []
    if "atom" in a.levels:
        between.append(Comparison("atom", "atoms"))
    if "structure" in a.levels:
        between.append(Comparison("structure", "cumulants", a.order, a.order))
        between += [Comparison("structure", b) for b in a.baselines]
        if a.order_metrics:
            within = [Comparison("structure", "cumulants", n, n + 1) for n in range(1, MAX_ORDER)]
            within.append(Comparison("structure", "cumulants", 1, MAX_ORDER))
    return between, within


@dataclass
class Latents:
    """One (dataset, model, layer): per-atom rows in dataset order, and the features."""

    structure_id: np.ndarray  # (atoms,) str
    structure_index: np.ndarray  # (atoms,) int64
    Z: np.ndarray  # (atoms,)
    X: np.ndarray  # (atoms, width) float32
    width: int

    @classmethod
    def read(cls, store: Store, dataset: str, model: str, layer: str,
             shards: int | None = None) -> "Latents":
        table = store.read_table(store.latents_dir(dataset, model, layer), shards)
        if table is None:
            raise FileNotFoundError(f"no latents for {dataset}/{model}/{layer} in {store.uri}")
        table = table.sort_by([("structure_index", "ascending"), ("atom_index", "ascending")])
        width = int(table.schema.metadata[b"latentray.width"])
        return cls(structure_id=np.asarray(table["structure_id"].to_numpy(zero_copy_only=False)),
                   structure_index=table["structure_index"].to_numpy(),
                   Z=table["Z"].to_numpy(),
                   X=features_matrix(table["features"], width), width=width)

    def rows_of(self, structure_indices: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(self.structure_index, structure_indices))


def concrete_layer(name: str, available: list[str]) -> str | None:
    """``bb`` -> the model's last backbone layer; None when the model lacks the layer."""
    if name == "bb":
        backbone = [a for a in available if a.startswith("bb")]
        return backbone[-1] if backbone else None
    return name if name in available else None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _code_digest() -> str:
    """The code a fit's number depends on."""
    from . import blocks, cumulants, reconstruction, splits, streaming

    return _digest([hashlib.sha256(open(module.__file__, "rb").read()).hexdigest()
                    for module in (blocks, cumulants, reconstruction, splits, streaming)])


def _fit_cache(store: Store) -> dict[str, dict]:
    """Fits of earlier runs, by the digest of everything they depend on."""
    path = store.path("results", "fits.parquet")
    if not store.exists(path):
        return {}
    table = pq.read_table(path, filesystem=store.fs)
    return {k: json.loads(v) for k, v in zip(table["key"].to_pylist(), table["values"].to_pylist())}


# --------------------------------------------------------------------------------------------
# cumulant features, one file per (model, layer, shard)


def shard_cumulants(uri: str, dataset: str, model: str, layer: str, shard: int,
                    inputs_digest: str) -> bool:
    """Cumulant features (orders 1-8) of one latents shard; False when already up to date.

    Writes ``cumulants/dataset=D/model=M/layer=L/order=N/part-SHARD.parquet`` for N = 1..8:
    one row per structure (structure_id, structure_index, n_atoms, subset), ``features`` =
    k_N of every column (root-transformed for N >= 2; ``width`` float64 values). The order-n
    descriptor of the paper is orders 1..n side by side.
    """
    store = Store(uri)
    paths = [f"{store.cumulants_dir(dataset, model, layer, n)}/{store.part(shard)}"
             for n in range(1, MAX_ORDER + 1)]
    if all(store.parquet_metadata(p).get("latentray.inputs") == inputs_digest for p in paths):
        return False
    latents = pq.read_table(f"{store.latents_dir(dataset, model, layer)}/{store.part(shard)}",
                            filesystem=store.fs)
    width = int(latents.schema.metadata[b"latentray.width"])
    latents = latents.sort_by([("structure_index", "ascending"), ("atom_index", "ascending")])
    structure_index = latents["structure_index"].to_numpy()
    structures = pq.read_table(store.structures_path(dataset, shard), filesystem=store.fs,
                               columns=["structure_id", "structure_index", "subset"])
    if len(structure_index):
        index, feats = cumulant_features(features_matrix(latents["features"], width),
                                         structure_index, order=MAX_ORDER)
    else:
        index, feats = np.zeros(0, np.int64), np.zeros((0, MAX_ORDER * width))
    _, n_atoms = np.unique(structure_index, return_counts=True)
    at = np.searchsorted(structures["structure_index"].to_numpy(), index)
    ids = {"structure_id": structures["structure_id"].take(at),
           "structure_index": pa.array(index, pa.int64()),
           "n_atoms": pa.array(n_atoms, pa.int64()),
           "subset": structures["subset"].take(at)}
    offsets = pa.array(np.arange(0, (len(index) + 1) * width, width, dtype=np.int32))
    for n, path in enumerate(paths, start=1):
        k_n = np.ascontiguousarray(feats[:, (n - 1) * width: n * width])
        table = pa.table({**ids, "features": pa.ListArray.from_arrays(
            offsets, pa.array(k_n.reshape(-1)))}).replace_schema_metadata({
                "latentray.inputs": inputs_digest, "latentray.width": str(width),
                "latentray.order": str(n),
                "latentray.transform": "k1" if n == 1 else f"sign(k{n}) |k{n}|^(1/{n})"})
        store.write_table(path, table)
    return True


def _cumulant_stage(store: Store, dataset: str, chosen: dict[str, str], n_shards: int,
                    shard_digests: dict[str, list[str]], log) -> None:
    import ray

    task = ray.remote(num_cpus=1)(shard_cumulants)
    t = time.perf_counter()
    futures = [task.remote(store.uri, dataset, m, layer, s, shard_digests[m][s])
               for m, layer in chosen.items() for s in range(n_shards)]
    computed = sum(ray.get(futures))
    log("analyse", f"cumulant features (orders 1-{MAX_ORDER}) of {len(chosen)} models x "
                   f"{n_shards} shard(s): {computed} computed, {len(futures) - computed} "
                   f"unchanged ({time.perf_counter() - t:.1f} s)")


# --------------------------------------------------------------------------------------------
# fits


def by_group(pointwise: dict[str, np.ndarray], groups: dict[str, np.ndarray]) -> list[dict]:
    """RMS of each metric's per-test-row errors within each element / subset."""
    from ase.data import chemical_symbols

    out = []
    for kind, labels in groups.items():
        labels = np.asarray(labels)
        names = ([chemical_symbols[int(z)] for z in labels] if kind == "Z" else labels)
        names = np.asarray(names, dtype=object)
        for group in sorted(set(names.tolist())):
            rows = names == group
            for metric, errors in pointwise.items():
                out.append({"metric": metric, "group_kind": "element" if kind == "Z" else kind,
                            "group": str(group), "n_test": int(rows.sum()),
                            "value": float(np.sqrt(np.mean(errors[rows] ** 2)))})
    return out


def _view(M: np.ndarray, rows: np.ndarray | None, n_columns: int | None,
          weights: np.ndarray | None) -> np.ndarray:
    """``M[rows, :n_columns]`` in float64, each row times its weight (sum pooling)."""
    out = np.asarray((M if rows is None else M[rows])[:, :n_columns], dtype=np.float64)
    return out if weights is None else out * np.asarray(weights, dtype=np.float64)[:, None]


def fit_in_memory(X: np.ndarray, Y: np.ndarray, view_x: tuple, view_y: tuple,
                  train: np.ndarray, test: np.ndarray, metrics: tuple[str, ...],
                  groups: dict[str, np.ndarray]) -> dict:
    """The measures of ``X -> Y`` on the given split, in float64, and their per-group
    breakdown (``groups``: labels of the test rows, in ``test`` order).

    ``view_x``, ``view_y``: ``(rows, n_columns, weights)`` select each side's rows (the
    structures both models processed), leading columns (a cumulant order) and row weights
    (atom counts, for sum pooling) inside the task, so that the driver ships each model's
    matrix once. LFRE uses the paper's ``n_local_points = min(dim X, dim Y)``, capped by the
    number of training rows on small data; CKA is computed on the training rows. A Ray task.
    """
    from threadpoolctl import threadpool_limits

    X, Y = _view(X, *view_x), _view(Y, *view_y)
    pointwise, values = {}, {}
    # one BLAS thread per task: the task holds one CPU, and on small VMs a second BLAS
    # thread made LAPACK calls ~100x slower (measured: a 256x256 SVD, 12 ms vs 1.3 s)
    with threadpool_limits(limits=1, user_api="blas"):
        if "gfre" in metrics:
            pointwise["gfre"] = pointwise_global_reconstruction_error(
                X, Y, test_idx=test, train_idx=train)
        if "gfrd" in metrics:
            pointwise["gfrd"] = pointwise_global_reconstruction_distortion(
                X, Y, test_idx=test, train_idx=train)
        if "lfre" in metrics:
            k = min(X.shape[1], Y.shape[1], len(train))
            pointwise["lfre"] = pointwise_local_reconstruction_error(
                X, Y, k, test_idx=test, train_idx=train)
        if "cka" in metrics:
            values["cka"] = in_memory_cka(X[train], Y[train])
    values.update({m: float(np.sqrt(np.mean(e ** 2))) for m, e in pointwise.items()})
    return {"values": values, "groups": by_group(pointwise, groups)}


def in_memory_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of the rows given, from the R factor of the centred ``[X | Y]``."""
    from .reconstruction import _r_factor

    A = np.concatenate([X, Y], axis=1)
    return linear_cka(_r_factor(A - A.mean(axis=0)), X.shape[1])


def fit_streaming(source: PairSource, seed: int, n_test: int, stratified: bool,
                  at_most_half: bool, metrics: tuple[str, ...]) -> dict:
    """The same measures from mergeable statistics over ``source``'s shards (Ray tasks)."""
    split = HashSplit(n_test, seed=seed, stratified=stratified, at_most_half=at_most_half)
    result = reconstruction_at_scale(source, split, metrics, executor=RayExecutor())
    return {"values": result.values, "groups": by_group(result.pointwise, result.groups),
            "n_train": result.n_train, "n_test": result.n_test, "alpha": result.alpha}


# --------------------------------------------------------------------------------------------
# the stage


def _failed(store: Store, dataset: str, model: str) -> np.ndarray:
    table = store.read_table(store.failures_dir(dataset, model))
    return np.zeros(0, np.int64) if table is None else table["structure_index"].to_numpy()


def run_analysis(config: Config, store: Store, extraction: dict, log) -> tuple[pd.DataFrame, dict]:
    """Fit every measure the config asks for; write ``results/reconstruction.{csv,parquet}``
    and ``results/by_group.{csv,parquet}``."""
    import ray

    fit = ray.remote(num_cpus=1)(fit_in_memory)
    a = config.analyses
    seeds = (a.seed, *a.spread_seeds)
    jobs: list[tuple[dict, tuple, str, object]] = []
    cache = _fit_cache(store)
    code = _code_digest()
    info: dict = {"paths": {}, "left_out": {}}
    models = [m.id for m in config.models]
    map_task = ray.remote(num_cpus=1)(model_map)
    maps: list = []  # futures of the 2-D maps' rows
    sampled: dict = {}  # dataset -> the structures mapped (None: all)

    def submit(base: dict, metrics: tuple[str, ...], digest: dict, stratified: bool,
               launch) -> None:
        """Run a fit unless one with the same inputs is in ``results/fits.parquet``."""
        key = _digest({"row": {k: v for k, v in base.items() if k not in _DERIVED},
                       "source": digest[base["source"]], "target": digest[base["target"]],
                       "metrics": sorted(metrics), "n_test": a.n_test, "code": code,
                       "stratified": stratified})
        done = key in cache and set(cache[key]["values"]) >= set(metrics)
        jobs.append((base, metrics, key, None if done else launch(metrics)))

    for d in config.datasets:
        stratified = d.subset_key is not None
        n_all = extraction["datasets"][d.name]["structures"]
        n_shards = extraction["datasets"][d.name]["shards"]
        # what each model's latents came from (its units' manifest inputs, per shard) and
        # which structures it could not process: read once per dataset, for every layer
        shard_digests = {m: [_digest(store.read_json(store.manifest_path(d.name, m, s))
                                     ["inputs"]) for s in range(n_shards)] for m in models}
        digest = {m: _digest(shard_digests[m]) for m in models}
        failed = {m: _failed(store, d.name, m) for m in models}
        for m in models:
            info["left_out"][f"{d.name}/{m}"] = len(failed[m])
        for layer_name in a.layers:
            chosen = {m: concrete_layer(layer_name, extraction["layers"][m]) for m in models}
            missing = [m for m, layer in chosen.items() if layer is None]
            if missing:
                log("analyse", f"layer {layer_name}: not extracted for {missing}; those are left out")
            chosen = {m: layer for m, layer in chosen.items() if layer is not None}
            present = list(chosen)
            widths = {m: extraction["descriptions"][m]["info"]["layer_widths"][chosen[m]]
                      for m in present}
            size_mb = extraction["datasets"][d.name]["atoms"] * sum(widths.values()) * 4 / 2**20
            path = "in-memory" if size_mb <= a.in_memory_limit_mb else "streaming"
            info["paths"][f"{d.name}/{layer_name}"] = path
            log("analyse", f"{d.name} layer {layer_name}: {size_mb:.0f} MB of latents "
                           f"({len(present)} models) {'<=' if path == 'in-memory' else '>'} "
                           f"in_memory_limit_mb={a.in_memory_limit_mb}: {path} fits"
                           + ("" if path == "in-memory" else " (hash split)"))

            if "structure" in a.levels:
                _cumulant_stage(store, d.name, chosen, n_shards, shard_digests, log)
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
                    fit, log)
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
                        launch = _streaming_launcher(store, d.name, (src, chosen[src]),
                                                     (tgt, chosen[tgt]), comparison, seed,
                                                     n_shards, a, stratified)
                    submit(row, metrics, digest, stratified, launch)
        if a.layer_metrics:
            for m in models:
                _layer_analysis(store, d, m, extraction, n_shards, a, seeds, n_all,
                                len(failed[m]), stratified, fit,
                                lambda row, launch: submit(row, a.layer_metrics, digest,
                                                           stratified, launch), info, log)

    t0 = time.perf_counter()
    pending = [future for *_, future in jobs if future is not None]
    log("analyse", f"{len(jobs)} fits: {len(jobs) - len(pending)} already done (inputs "
                   f"unchanged), {len(pending)} to run")
    info["fits_run"], info["fits_reused"] = len(pending), len(jobs) - len(pending)
    while pending:
        _, pending = ray.wait(pending, num_returns=min(len(pending), max(1, len(jobs) // 8)))
        log("analyse", f"{len(jobs) - len(pending)}/{len(jobs)} fits done "
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
    keys = [key for _, _, key, _ in jobs]
    store.write_table(store.path("results", "fits.parquet"), pa.table({
        "key": keys, "values": [json.dumps(cache[k], sort_keys=True) for k in keys]}))
    results = _write_results(store, "reconstruction", rows, RESULT_COLUMNS)
    _write_results(store, "by_group", group_rows, GROUP_COLUMNS)
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
    for column in _ORDER_COLUMNS:
        table[column] = table[column].astype("Int64")
    store.write_bytes(store.path("results", f"{name}.csv"),
                      table.to_csv(index=False, float_format="%.10g").encode())
    store.write_table(store.path("results", f"{name}.parquet"),
                      pa.Table.from_pandas(table, preserve_index=False))
    return table


LAYER_ANALYSIS = "ll-vs-bb"  # the ``layers`` value of the within-model layer rows


def _layer_analysis(store: Store, d, model: str, extraction: dict, n_shards: int, a,
                    seeds: tuple, n_all: int, n_failed: int, stratified: bool, fit, submit,
                    info: dict, log) -> None:
    """Within one model, at atom level: ``ll -> bbK`` and ``bbK -> ll`` for every extracted
    backbone layer K (how much of each layer the last layer keeps, and the reverse)."""
    available = extraction["layers"][model]
    backbone = [layer for layer in available if layer.startswith("bb")]
    if "ll" not in available or not backbone:
        log("analyse", f"layer analysis: {model} has no extracted ll or bb layer; skipped")
        return
    sides = {layer: (model, layer) for layer in backbone + ["ll"]}
    widths = extraction["descriptions"][model]["info"]["layer_widths"]
    size_mb = extraction["datasets"][d.name]["atoms"] * sum(widths[k] for k in sides) * 4 / 2**20
    path = "in-memory" if size_mb <= a.in_memory_limit_mb else "streaming"
    info["paths"][f"{d.name}/{model}/{LAYER_ANALYSIS}"] = path
    atoms = Comparison("atom", "atoms")
    if path == "in-memory":
        launchers = _in_memory_launchers(store, d, sides, n_shards, a, fit, log, structure=False)
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
                    launch = _streaming_launcher(store, d.name, sides[src], sides[tgt], atoms,
                                                 seed, n_shards, a, stratified)
                submit(row, launch)


class _Launch:
    """A deferred fit (called with its metrics only when the cache misses) and the split
    sizes it will use."""

    def __init__(self, call, sizes: dict | None = None):
        self.call, self.sizes = call, sizes or {}

    def __call__(self, metrics):
        return self.call(metrics)


def _in_memory_launchers(store: Store, d, sides: dict[str, tuple[str, str]], n_shards: int,
                         a, fit, log, structure: bool = True):
    """Read the latents (and, with ``structure``, the cumulants) of every side once, a side
    being a label -> (model, layer); return ``launch(src, tgt, comparison, seed)`` for the
    fits between sides, ``src`` and ``tgt`` labels."""
    import ray

    t = time.perf_counter()
    latents = {label: Latents.read(store, d.name, m, layer, n_shards)
               for label, (m, layer) in sides.items()}
    log("analyse", f"{d.name}: read latents of {len(latents)} model layers in "
                   f"{time.perf_counter() - t:.1f} s")
    structures = store.read_table(store.path("structures", f"dataset={d.name}"),
                                  columns=["structure_index", "subset"]).to_pandas()
    subset_of = structures.set_index("structure_index")["subset"]
    done = {m: np.unique(x.structure_index) for m, x in latents.items()}
    feats = {}  # label -> (structure_index, n_atoms, [k1 .. k8])
    if structure and "structure" in a.levels:
        for label, (m, layer) in sides.items():
            table = read_cumulants(store, d.name, m, layer, MAX_ORDER, range(n_shards))
            feats[label] = (table["structure_index"].to_numpy(), table["n_atoms"].to_numpy(),
                            features_matrix(table["features"]))
    # each model's matrix goes to the object store once
    x_refs = {m: ray.put(x.X) for m, x in latents.items()}
    f_refs = {m: ray.put(np.ascontiguousarray(f[2])) for m, f in feats.items()}

    def launch(src, tgt, comparison: Comparison, seed):
        common = np.intersect1d(done[src], done[tgt])
        if comparison.level == "atom":
            A, B = latents[src], latents[tgt]
            ra, rb = A.rows_of(common), B.rows_of(common)
            if not np.array_equal(A.Z[ra], B.Z[rb]):
                raise RuntimeError(f"{src} and {tgt} rows do not align on {d.name}")
            labels = subset_of.loc[A.structure_index[ra]].to_numpy()
            if a.n_test >= len(ra):
                raise SplitError(f"dataset {d.name}: analyses.n_test={a.n_test} test atoms, but "
                                 f"{src} and {tgt} share only {len(ra)} atoms: lower n_test "
                                 f"or use more structures")
            train, test = paper_split(len(ra), a.n_test, seed=seed,
                                      labels=labels if d.subset_key else None)
            groups = {"Z": A.Z[ra][test], "subset": labels[test]}
            refs, views = (x_refs[src], x_refs[tgt]), ((ra, None, None), (rb, None, None))
        else:
            (ia, na, _), (ib, nb, _) = feats[src], feats[tgt]
            ra, rb = np.flatnonzero(np.isin(ia, common)), np.flatnonzero(np.isin(ib, common))
            labels = subset_of.loc[ia[ra]].to_numpy()
            train, test = paper_split(len(ra), structure_n_test(len(ra), a.n_test), seed=seed,
                                      labels=labels if d.subset_key else None)
            groups = {"subset": labels[test]}
            summed = comparison.features == "sum"
            refs = (f_refs[src], f_refs[tgt])
            views = ((ra, comparison.columns(latents[src].width, 0), na[ra] if summed else None),
                     (rb, comparison.columns(latents[tgt].width, 1), nb[rb] if summed else None))
        return _Launch(lambda metrics: fit.remote(refs[0], refs[1], views[0], views[1], train,
                                                  test, metrics, groups),
                       {"n_train": len(train), "n_test": len(test)})

    return launch


def _streaming_launcher(store: Store, dataset: str, src: tuple[str, str], tgt: tuple[str, str],
                        comparison: Comparison, seed: int, n_shards: int, a, stratified: bool):
    """A deferred streaming fit of side ``src`` -> ``tgt`` (each (model, layer)): a Ray task
    that itself runs the block tasks."""
    import ray

    atoms = comparison.level == "atom"
    source = PairSource(store.uri, dataset, src, tgt,
                        list(range(n_shards)), kind="latents" if atoms else "cumulants",
                        orders=(comparison.source_order or 1, comparison.target_order or 1),
                        sum_pooling=comparison.features == "sum", stratify=stratified)
    # the driver of one streaming fit holds no CPU: its block tasks do the work
    task = ray.remote(num_cpus=0)(fit_streaming)
    return _Launch(lambda metrics: task.remote(source, seed, a.n_test, stratified, not atoms,
                                               metrics))
