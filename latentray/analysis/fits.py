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

Both gather what can be shared: in memory, the fits of one source side on the same rows and
split are one task (:class:`InMemoryFits`); streamed, all pairs of one kind of rows are one
pass over the shards of all their models (:class:`StreamedFits`).

This module and the modules it imports are the code a fit's numbers depend on
(:mod:`latentray.analysis.fit_cache`): orchestration lives in :mod:`latentray.analysis.stage`.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from ..method.cumulants import MAX_ORDER
from ..method.reconstruction import (
    _r_factor,
    pointwise_global_reconstruction_errors,
    pointwise_local_reconstruction_errors,
)
from ..method.splits import SplitError, paper_split, structure_n_test
from ..method.streaming import (HashSplit, all_pairs_at_scale, linear_cka,
                                reconstruction_at_scale)
from ..reader import Run
from ..store import Store, features_matrix
from .blocks import ModelSides, PairSource
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


def fit_in_memory(X: np.ndarray, view_x: tuple, train: np.ndarray, test: np.ndarray,
                  groups: dict[str, np.ndarray], targets: list[tuple], *Ys: np.ndarray):
    """The measures of ``X -> Y`` for every target ``Y`` of one source on one split, in
    float64, and their per-group breakdown (``groups``: labels of the test rows, in ``test``
    order); one result per target (a Ray task with one return per target).

    ``targets``: ``(view_y, metrics)`` per matrix in ``Ys``. A view ``(rows, n_columns,
    weights)`` selects a side's rows (the structures both models processed), leading columns
    (a cumulant order) and row weights (atom counts, for sum pooling) inside the task, so that
    the driver ships each model's matrix once. GFRE and GFRD come from one fit per target
    (the source scaled once), CKA per target;
    LFRE (the paper's ``n_local_points = min(dim X, dim Y)``, capped by the number of training
    rows on small data) shares the source's neighbour search and local factorizations between
    the targets (:func:`pointwise_local_reconstruction_errors`: the same numbers as one target
    at a time). CKA is computed on the training rows.
    """
    from threadpoolctl import threadpool_limits

    X = _view(X, *view_x)
    Ys = [_view(Y, *view_y) for Y, (view_y, _) in zip(Ys, targets)]
    pointwise = [{} for _ in Ys]
    values = [{} for _ in Ys]
    # one BLAS thread per task: the task holds one CPU, and on small VMs a second BLAS
    # thread made LAPACK calls ~100x slower (measured: a 256x256 SVD, 12 ms vs 1.3 s)
    with threadpool_limits(limits=1, user_api="blas"):
        global_metrics: dict[tuple, list[int]] = {}  # the targets that want each set
        for t, (_, metrics) in enumerate(targets):
            wanted = tuple(m for m in ("gfre", "gfrd") if m in metrics)
            if wanted:
                global_metrics.setdefault(wanted, []).append(t)
        for wanted, ts in global_metrics.items():
            errors = pointwise_global_reconstruction_errors(
                X, [Ys[t] for t in ts], test_idx=test, train_idx=train, metrics=wanted)
            for t, e in zip(ts, errors):
                pointwise[t].update(e)
        for t, (Y, (_, metrics)) in enumerate(zip(Ys, targets)):
            if "cka" in metrics:
                values[t]["cka"] = in_memory_cka(X[train], Y[train])
        local = [t for t, (_, metrics) in enumerate(targets) if "lfre" in metrics]
        if local:
            errors = pointwise_local_reconstruction_errors(
                X, [Ys[t] for t in local],
                [min(X.shape[1], Ys[t].shape[1], len(train)) for t in local],
                test_idx=test, train_idx=train)
            for t, e in zip(local, errors):
                pointwise[t]["lfre"] = e
    out = []
    for t in range(len(targets)):
        values[t].update({m: float(np.sqrt(np.mean(e ** 2))) for m, e in pointwise[t].items()})
        out.append({"values": values[t], "groups": by_group(pointwise[t], groups)})
    return out if len(out) > 1 else out[0]


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


class _Pending:
    """One in-memory fit waiting for its group's task: its future once the group is sent."""

    ref = None


class InMemoryFits:
    """The in-memory fits of a run, gathered by what their source side shares: the source
    (model, layer, features, order), the rows (the structures both models processed) and the
    split. :meth:`flush` sends each group as one Ray task (:func:`fit_in_memory`, one return
    per fit), so that a source's neighbour search and local factorizations serve all its
    targets; which fits run is decided by the fit cache before, fit by fit."""

    def __init__(self):
        import ray

        self._task = ray.remote(num_cpus=1)(fit_in_memory)
        self._groups: dict[tuple, tuple[tuple, list]] = {}
        self.sides_read = 0  # sides whose features were read for these fits

    def add(self, key: tuple, shared: tuple, y_ref, view_y: tuple, metrics) -> _Pending:
        pending = _Pending()
        self._groups.setdefault(key, (shared, []))[1].append((y_ref, view_y, metrics, pending))
        return pending

    def flush(self) -> None:
        for shared, fits in self._groups.values():
            refs = self._task.options(num_returns=len(fits)).remote(
                *shared, [(view_y, metrics) for _, view_y, metrics, _ in fits],
                *[y_ref for y_ref, *_ in fits])
            for (*_, pending), ref in zip(fits, refs if len(fits) > 1 else [refs]):
                pending.ref = ref
        self._groups = {}


def _in_memory_launchers(store: Store, d, sides: dict[str, tuple[str, str]], n_shards: int,
                         a, fits: InMemoryFits, log, structure: bool = True):
    """Read the row ids of every side's latents (and, with ``structure``, cumulants), a side
    being a label -> (model, layer); return ``launch(src, tgt, comparison, seed)`` for the
    fits between sides, ``src`` and ``tgt`` labels. A side's features are read, and put in
    the object store, once and only when a fit that needs them runs: a re-run whose fits are
    all cached reads ids alone."""
    import ray

    run = Run(store)
    latents = {label: run.latents(d.name, m, layer, n_shards, features=False)
               for label, (m, layer) in sides.items()}
    structures = run.structures(d.name, ["structure_index", "subset"]).to_pandas()
    subset_of = structures.set_index("structure_index")["subset"]
    done = {m: np.unique(x.structure_index) for m, x in latents.items()}
    feats = {}  # label -> (structure_index, n_atoms)
    if structure and "structure" in a.levels:
        for label, (m, layer) in sides.items():
            table = run.cumulants_table(d.name, m, layer, MAX_ORDER, range(n_shards),
                                        ["structure_index", "n_atoms"])
            feats[label] = (table["structure_index"].to_numpy(), table["n_atoms"].to_numpy())
    refs: dict[tuple[str, str], object] = {}

    def ref(label: str, kind: str):
        """A side's features in the object store ("atoms": latents, "cumulants": [k1 .. k8]),
        read on first use."""
        if (label, kind) not in refs:
            t, (m, layer) = time.perf_counter(), sides[label]
            if kind == "atoms":
                rows = run.latents(d.name, m, layer, n_shards)
                ids = latents[label]
                if not (np.array_equal(rows.structure_index, ids.structure_index)
                        and np.array_equal(rows.atom_index, ids.atom_index)):
                    raise RuntimeError(f"latents of {m} {layer} on {d.name} changed during the run")
                X = rows.X
            else:
                table = run.cumulants_table(d.name, m, layer, MAX_ORDER, range(n_shards))
                if not np.array_equal(table["structure_index"].to_numpy(), feats[label][0]):
                    raise RuntimeError(f"cumulants of {m} {layer} on {d.name} changed during "
                                       f"the run")
                X = np.ascontiguousarray(features_matrix(table["features"]))
            refs[label, kind] = ray.put(X)  # each side's matrix goes to the object store once
            fits.sides_read += 1
            log("analyse", f"{d.name}: read the {kind} of {m} {layer} in "
                           f"{time.perf_counter() - t:.1f} s")
        return refs[label, kind]

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
            kind, views = "atoms", ((ra, None, None), (rb, None, None))
            source_side = (src, "atoms", None)
        else:
            (ia, na), (ib, nb) = feats[src], feats[tgt]
            ra, rb = np.flatnonzero(np.isin(ia, common)), np.flatnonzero(np.isin(ib, common))
            labels = subset_of.loc[ia[ra]].to_numpy()
            train, test = paper_split(len(ra), structure_n_test(len(ra), a.n_test), seed=seed,
                                      labels=labels if d.subset_key else None)
            groups = {"subset": labels[test]}
            summed = comparison.features == "sum"
            kind = "cumulants"
            views = ((ra, comparison.columns(latents[src].width, 0), na[ra] if summed else None),
                     (rb, comparison.columns(latents[tgt].width, 1), nb[rb] if summed else None))
            source_side = (src, comparison.features, comparison.source_order)
        # fits with the same source side, rows and split share one task
        key = (d.name, *sides[source_side[0]], *source_side[1:], seed,
               hashlib.sha256(ra.tobytes()).hexdigest())
        return _Launch(lambda metrics: fits.add(
            key, (ref(src, kind), views[0], train, test, groups), ref(tgt, kind), views[1],
            metrics), {"n_train": len(train), "n_test": len(test)})

    return launch


def _streaming_launcher(store: Store, dataset: str, src: tuple[str, str, int],
                        tgt: tuple[str, str, int], comparison: Comparison, seed: int,
                        n_shards: int, a, stratified: bool, streamed: "StreamedFits"):
    """A deferred streaming fit of side ``src`` -> ``tgt`` (each (model, layer, width of its
    latents)): gathered with the other fits one pass can serve (:class:`StreamedFits`), or,
    between two cumulant orders (the order analysis), a Ray task of its own that itself runs
    the block tasks."""
    import ray

    atoms = comparison.level == "atom"
    if comparison.source_order == comparison.target_order:
        widths = [side[2] if atoms else comparison.columns(side[2], k)
                  for k, side in enumerate((src, tgt))]
        return _Launch(lambda metrics: streamed.add(
            dataset, n_shards, (*src[:2], widths[0]), (*tgt[:2], widths[1]), comparison, seed,
            stratified, metrics))
    source = PairSource(store.uri, dataset, src[:2], tgt[:2],
                        list(range(n_shards)), kind="latents" if atoms else "cumulants",
                        orders=(comparison.source_order or 1, comparison.target_order or 1),
                        sum_pooling=comparison.features == "sum", stratify=stratified)
    # the driver of one streaming fit holds no CPU: its block tasks do the work
    task = ray.remote(num_cpus=0)(fit_streaming)
    return _Launch(lambda metrics: task.remote(source, seed, a.n_test, stratified, not atoms,
                                               metrics))


def fit_all_pairs_streaming(sides: ModelSides, pairs: list[tuple[int, int]], seed: int,
                            n_test: int, stratified: bool, at_most_half: bool,
                            metrics: dict[tuple[int, int], tuple[str, ...]]):
    """Every pair's measures from one pass over the shards of all ``sides`` (Ray tasks);
    one result per pair, as :func:`fit_streaming`'s."""
    results = all_pairs_at_scale(sides, pairs, n_test, seed=seed, stratified=stratified,
                                 at_most_half=at_most_half, metrics=metrics,
                                 executor=RayExecutor())
    out = [{"values": r.values, "groups": by_group(r.pointwise, r.groups),
            "n_train": r.n_train, "n_test": r.n_test, "alpha": r.alpha}
           for r in (results[pair] for pair in pairs)]
    return out if len(out) > 1 else out[0]


#: The most columns (all sides together) of one pass's joint statistics: a state holds
#: ``(1 + width)^2`` float64 per pattern and fold (2048: 34 MB).
JOINT_MAX_WIDTH = 2048


class StreamedFits:
    """The streamed fits of a run, gathered by what one pass over the shards can serve: the
    same dataset, kind of rows (atoms, structure features of one order, sum pooling) and
    seed. :meth:`flush` runs each gathering as one Ray task per pass of
    :func:`fit_all_pairs_streaming` over the sides its pairs use, at most
    :data:`JOINT_MAX_WIDTH` columns per pass: beyond, the sides are cut into blocks of half
    that width and each pair of blocks is one pass. Fits between two orders of one model (the
    order analysis, nested columns of one file) stay one fit per pair."""

    def __init__(self, store: Store, a, max_width: int = JOINT_MAX_WIDTH):
        import ray

        self._store, self._a, self.max_width = store, a, max_width
        self._task = ray.remote(num_cpus=0)(fit_all_pairs_streaming)
        self._groups: dict[tuple, list] = {}

    def add(self, dataset: str, n_shards: int, src: tuple, tgt: tuple,
            comparison: Comparison, seed: int, stratified: bool, metrics) -> _Pending:
        """``src``, ``tgt``: ``(model, layer, width)``."""
        pending = _Pending()
        order = comparison.source_order or 1
        key = (dataset, n_shards, comparison.level, comparison.features, order, seed,
               stratified)
        self._groups.setdefault(key, []).append((src, tgt, tuple(metrics), pending))
        return pending

    def _passes(self, fits: list) -> list[tuple[list, list]]:
        """``(sides, fits)`` per pass: sides in first-use order, cut into blocks."""
        sides: dict[tuple, int] = {}
        for src, tgt, *_ in fits:
            sides.setdefault(src, len(sides))
            sides.setdefault(tgt, len(sides))
        block_of, blocks, width = {}, [[]], 0
        for side in sides:
            if blocks[-1] and width + side[2] > self.max_width // 2:
                blocks.append([])
                width = 0
            blocks[-1].append(side)
            block_of[side] = len(blocks) - 1
            width += side[2]
        if len(blocks) == 1 or sum(s[2] for s in sides) <= self.max_width:
            return [(list(sides), fits)]
        passes: dict[tuple[int, int], list] = {}
        for fit in fits:
            i, j = sorted((block_of[fit[0]], block_of[fit[1]]))
            passes.setdefault((i, j), []).append(fit)
        return [((blocks[i] + blocks[j]) if i != j else blocks[i], members)
                for (i, j), members in passes.items()]

    def flush(self) -> None:
        a = self._a
        for (dataset, n_shards, level, features, order, seed, stratified), fits in \
                self._groups.items():
            for sides, members in self._passes(fits):
                used = [s for s in sides if any(s in f[:2] for f in members)]
                index = {s: m for m, s in enumerate(used)}
                atoms = level == "atom"
                source = ModelSides(self._store.uri, dataset, [s[:2] for s in used],
                                    list(range(n_shards)), [s[2] for s in used],
                                    kind="latents" if atoms else "cumulants", order=order,
                                    sum_pooling=features == "sum", stratify=stratified)
                metrics: dict[tuple[int, int], tuple] = {}
                for src, tgt, ms, _ in members:  # a pair asked for twice runs once
                    pair = (index[src], index[tgt])
                    metrics[pair] = tuple(dict.fromkeys(metrics.get(pair, ()) + ms))
                pairs = list(metrics)
                refs = self._task.options(num_returns=len(pairs)).remote(
                    source, pairs, seed, a.n_test, stratified, not atoms, metrics)
                refs = refs if len(pairs) > 1 else [refs]
                for src, tgt, _, pending in members:
                    pending.ref = refs[pairs.index((index[src], index[tgt]))]
        self._groups = {}
