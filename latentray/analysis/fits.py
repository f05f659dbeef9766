"""One fit: the rows and split it uses, and the measures on them, in memory or streamed.

For a pair (A, B) the rows compared are the atoms (or structures) of the structures that
both models processed, in dataset order (structure_index, then atom_index). Two paths, the
same measures:

* **in memory** (data up to ``analyses.in_memory_limit_mb``): every model's rows are read
  whole and the split is the paper's (:func:`latentray.method.splits.paper_split`,
  stratified by subset); the numbers are skmatter's;
* **streaming** (larger data): from mergeable statistics over the Parquet shards
  (:mod:`latentray.method.streaming`), never holding a model's rows whole, with the split
  rule that needs no per-row state (:class:`~latentray.method.streaming.HashSplit`).

This module and the modules it imports are the code a fit's numbers depend on
(:mod:`latentray.analysis.fit_cache`): orchestration lives in :mod:`latentray.analysis.stage`.
"""

from __future__ import annotations

import time

import numpy as np

from ..method.cumulants import MAX_ORDER
from ..method.reconstruction import (
    _r_factor,
    pointwise_global_reconstruction_distortion,
    pointwise_global_reconstruction_error,
    pointwise_local_reconstruction_error,
)
from ..method.splits import SplitError, paper_split, structure_n_test
from ..method.streaming import HashSplit, linear_cka, reconstruction_at_scale
from ..reader import Run
from ..store import Store, features_matrix
from .blocks import PairSource
from .executors import RayExecutor
from .plan import Comparison


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
    A = np.concatenate([X, Y], axis=1)
    return linear_cka(_r_factor(A - A.mean(axis=0)), X.shape[1])


def fit_streaming(source: PairSource, seed: int, n_test: int, stratified: bool,
                  at_most_half: bool, metrics: tuple[str, ...]) -> dict:
    """The same measures from mergeable statistics over ``source``'s shards (Ray tasks)."""
    split = HashSplit(n_test, seed=seed, stratified=stratified, at_most_half=at_most_half)
    result = reconstruction_at_scale(source, split, metrics, executor=RayExecutor())
    return {"values": result.values, "groups": by_group(result.pointwise, result.groups),
            "n_train": result.n_train, "n_test": result.n_test, "alpha": result.alpha}


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
    run = Run(store)
    latents = {label: run.latents(d.name, m, layer, n_shards)
               for label, (m, layer) in sides.items()}
    log("analyse", f"{d.name}: read latents of {len(latents)} model layers in "
                   f"{time.perf_counter() - t:.1f} s")
    structures = run.structures(d.name, ["structure_index", "subset"]).to_pandas()
    subset_of = structures.set_index("structure_index")["subset"]
    done = {m: np.unique(x.structure_index) for m, x in latents.items()}
    feats = {}  # label -> (structure_index, n_atoms, [k1 .. k8])
    if structure and "structure" in a.levels:
        for label, (m, layer) in sides.items():
            table = run.cumulants_table(d.name, m, layer, MAX_ORDER, range(n_shards))
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
