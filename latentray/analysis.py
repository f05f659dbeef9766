"""Analysis stage: structure features by cumulants, and reconstruction errors between
every ordered pair of models, at atom and at structure level.

For a pair (A, B) the rows compared are the atoms (or structures) of the structures that
both models processed, in dataset order (structure_index, then atom_index); the split is
drawn over those rows as the paper draws it (:func:`latentray.splits.paper_split`,
stratified by subset). The table says how many structures were left out.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import Config
from .cumulants import cumulant_features
from .reconstruction import global_reconstruction_error, local_reconstruction_error
from .splits import paper_split, structure_n_test
from .store import Store, features_matrix

MAX_ORDER = 8
RESULT_COLUMNS = ["metric", "level", "dataset", "source", "target", "layers", "source_layer",
                  "target_layer", "order", "value", "n_train", "n_test", "seed",
                  "n_structures", "n_left_out"]


@dataclass
class Latents:
    """One (dataset, model, layer): per-atom rows in dataset order, and the features."""

    structure_id: np.ndarray  # (atoms,) str
    structure_index: np.ndarray  # (atoms,) int64
    Z: np.ndarray  # (atoms,)
    X: np.ndarray  # (atoms, width) float32
    width: int

    @classmethod
    def read(cls, store: Store, dataset: str, model: str, layer: str) -> "Latents":
        table = store.read_table(store.latents_dir(dataset, model, layer))
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
    from . import cumulants, reconstruction, splits

    return _digest([hashlib.sha256(open(module.__file__, "rb").read()).hexdigest()
                    for module in (cumulants, reconstruction, splits)])


def _fit_cache(store: Store) -> dict[str, dict[str, float]]:
    """Fits of earlier runs, by the digest of everything they depend on."""
    path = store.path("results", "fits.parquet")
    if not store.exists(path):
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(path, filesystem=store.fs)
    return {k: json.loads(v) for k, v in zip(table["key"].to_pylist(), table["values"].to_pylist())}


def structure_features(store: Store, dataset: str, model: str, layer: str, latents: Latents,
                       structures: pd.DataFrame, inputs_digest: str) -> tuple[np.ndarray, np.ndarray]:
    """Cumulant features up to order 8 for every structure the model processed.

    Written to ``cumulants/dataset=D/model=M/layer=L/part-0.parquet`` (one row per
    structure, ``features`` = [k1 .. k8], 8 * width float64 values) and reused while the
    latents it was computed from are unchanged. Returns (structure_index, features).
    """
    path = store.path("cumulants", f"dataset={dataset}", f"model={model}", f"layer={layer}",
                      "part-0.parquet")
    directory = path.rsplit("/", 1)[0]
    cached = store.read_table(directory)
    if cached is not None and (cached.schema.metadata or {}).get(b"latentray.inputs") == \
            inputs_digest.encode():
        return (cached["structure_index"].to_numpy(),
                features_matrix(cached["features"], MAX_ORDER * latents.width))
    index, feats = cumulant_features(latents.X, latents.structure_index, order=MAX_ORDER)
    info = structures.set_index("structure_index").loc[index]
    n, width = feats.shape
    table = pa.table({
        "structure_id": pa.array(info["structure_id"].tolist(), pa.string()),
        "structure_index": pa.array(index, pa.int64()),
        "n_atoms": pa.array(info["n_atoms"].to_numpy(), pa.int64()),
        "subset": pa.array(info["subset"].tolist(), pa.string()),
        "features": pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32)),
            pa.array(feats.reshape(-1))),
    }).replace_schema_metadata({"latentray.inputs": inputs_digest,
                                "latentray.width": str(latents.width),
                                "latentray.orders": str(MAX_ORDER),
                                "latentray.layout": "k1[0:w] k2[w:2w] ... k8 (root-transformed)"})
    store.write_table(path, table)
    return index, feats


def fit_measures(X: np.ndarray, Y: np.ndarray, rows_x: np.ndarray | None,
                 rows_y: np.ndarray | None, train: np.ndarray, test: np.ndarray,
                 metrics: tuple[str, ...]) -> dict[str, float]:
    """GFRE and/or LFRE(X[rows_x] -> Y[rows_y]) on the given split, in float64.

    LFRE uses the paper's ``n_local_points = min(dim X, dim Y)``, capped by the number of
    training rows on small data. Runs as a Ray task: one per (pair, level).
    """
    from threadpoolctl import threadpool_limits

    X = np.asarray(X if rows_x is None else X[rows_x], dtype=np.float64)
    Y = np.asarray(Y if rows_y is None else Y[rows_y], dtype=np.float64)
    out = {}
    # one BLAS thread per task: the task holds one CPU, and on small VMs a second BLAS
    # thread made LAPACK calls ~100x slower (measured: a 256x256 SVD, 12 ms vs 1.3 s)
    with threadpool_limits(limits=1, user_api="blas"):
        if "gfre" in metrics:
            out["gfre"] = float(global_reconstruction_error(X, Y, test_idx=test, train_idx=train))
        if "lfre" in metrics:
            k = min(X.shape[1], Y.shape[1], len(train))
            out["lfre"] = float(local_reconstruction_error(X, Y, k, test_idx=test,
                                                           train_idx=train))
    return out


def run_analysis(config: Config, store: Store, extraction: dict, log) -> tuple[pd.DataFrame, dict]:
    """Fit every measure the config asks for; write ``results/reconstruction.{csv,parquet}``."""
    import ray

    fit = ray.remote(num_cpus=1)(fit_measures)
    a = config.analyses
    rows: list[dict] = []
    jobs: list[tuple[dict, str, object]] = []
    cache = _fit_cache(store)
    code = _code_digest()

    def submit(base: dict, digest: dict, launch) -> None:
        """Run a fit unless one with the same inputs is in ``results/fits.parquet``."""
        key = _digest({"row": {k: v for k, v in base.items() if k not in ("n_structures",)},
                       "source": digest[base["source"]], "target": digest[base["target"]],
                       "metrics": sorted(a.metrics), "n_test": a.n_test, "code": code,
                       "stratified": config.datasets[[x.name for x in config.datasets]
                                                     .index(base["dataset"])].subset_key})
        jobs.append((base, key, None if set(cache.get(key, {})) >= set(a.metrics) else launch()))
    info: dict = {"path": "in-memory", "pairs": {}, "left_out": {}}
    models = [m.id for m in config.models]
    for d in config.datasets:
        structures = store.read_table(store.path("structures", f"dataset={d.name}")).to_pandas()
        structures = structures[structures["structure_index"] <
                                extraction["datasets"][d.name]["structures"]]
        structures = structures.sort_values("structure_index").reset_index(drop=True)
        subset_of = structures.set_index("structure_index")["subset"]
        n_all = len(structures)
        for layer_name in a.layers:
            chosen = {m: concrete_layer(layer_name, extraction["layers"][m]) for m in models}
            missing = [m for m, layer in chosen.items() if layer is None]
            if missing:
                log("analyse", f"layer {layer_name}: not extracted for {missing}; those are left out")
            present = [m for m in models if chosen[m] is not None]
            t = time.perf_counter()
            latents = {m: Latents.read(store, d.name, m, chosen[m]) for m in present}
            done = {m: np.unique(latents[m].structure_index) for m in present}
            for m in present:
                info["left_out"][f"{d.name}/{m}"] = n_all - len(done[m])
            log("analyse", f"{d.name} layer {layer_name}: read latents of {len(present)} models "
                           f"in {time.perf_counter() - t:.1f} s")

            # what each model's latents came from: its units' manifest inputs
            digest = {m: _digest([store.read_json(store.manifest_path(d.name, m, s))["inputs"]
                                  for s in range(-(-n_all // config.extraction.shard_size))])
                      for m in present}
            feats = {}
            if "structure" in a.levels:
                t = time.perf_counter()
                for m in present:
                    feats[m] = structure_features(store, d.name, m, chosen[m], latents[m],
                                                  structures, digest[m])
                log("analyse", f"cumulant features (orders 1-{MAX_ORDER}) of {len(present)} "
                               f"models in {time.perf_counter() - t:.1f} s")

            # one Ray task per (pair, level); each model's matrix goes to the object store once
            x_refs = {m: ray.put(latents[m].X) for m in present}
            f_refs = {m: ray.put(np.ascontiguousarray(feats[m][1][:, :latents[m].width * a.order]))
                      for m in feats}
            for src, tgt in [(s, t_) for s in present for t_ in present if s != t_]:
                common = np.intersect1d(done[src], done[tgt])
                base = {"dataset": d.name, "source": src, "target": tgt, "layers": layer_name,
                        "source_layer": chosen[src], "target_layer": chosen[tgt],
                        "seed": a.seed, "n_structures": len(common),
                        "n_left_out": n_all - len(common)}
                if "atom" in a.levels:
                    A, B = latents[src], latents[tgt]
                    ra, rb = A.rows_of(common), B.rows_of(common)
                    if not np.array_equal(A.Z[ra], B.Z[rb]):
                        raise RuntimeError(f"{src} and {tgt} rows do not align on {d.name}")
                    labels = subset_of.loc[A.structure_index[ra]].to_numpy()
                    train, test = paper_split(len(ra), a.n_test, seed=a.seed,
                                              labels=labels if d.subset_key else None)
                    submit({**base, "level": "atom", "order": pd.NA, "n_train": len(train),
                            "n_test": len(test)}, digest,
                           lambda: fit.remote(x_refs[src], x_refs[tgt], ra, rb, train, test,
                                              a.metrics))
                if "structure" in a.levels:
                    ia, ib = feats[src][0], feats[tgt][0]
                    sa, sb = np.flatnonzero(np.isin(ia, common)), np.flatnonzero(np.isin(ib, common))
                    labels = subset_of.loc[ia[sa]].to_numpy()
                    train, test = paper_split(len(sa), structure_n_test(len(sa), a.n_test),
                                              seed=a.seed, labels=labels if d.subset_key else None)
                    submit({**base, "level": "structure", "order": a.order,
                            "n_train": len(train), "n_test": len(test)}, digest,
                           lambda: fit.remote(f_refs[src], f_refs[tgt], sa, sb, train, test,
                                              a.metrics))

    t0 = time.perf_counter()
    pending = [future for _, _, future in jobs if future is not None]
    log("analyse", f"{len(jobs)} fits: {len(jobs) - len(pending)} already done (inputs "
                   f"unchanged), {len(pending)} to run")
    info["fits_run"], info["fits_reused"] = len(pending), len(jobs) - len(pending)
    while pending:
        _, pending = ray.wait(pending, num_returns=min(len(pending), max(1, len(jobs) // 8)))
        log("analyse", f"{len(jobs) - len(pending)}/{len(jobs)} fits done "
                       f"({time.perf_counter() - t0:.1f} s)")
    for base, key, future in jobs:
        if future is not None:
            cache[key] = ray.get(future)
        for metric, value in cache[key].items():
            rows.append({**base, "metric": metric, "value": value})
    keys = [key for _, key, _ in jobs]
    store.write_table(store.path("results", "fits.parquet"), pa.table({
        "key": keys, "values": [json.dumps(cache[k], sort_keys=True) for k in keys]}))
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    results["order"] = results["order"].astype("Int64")
    store.write_bytes(store.path("results", "reconstruction.csv"),
                      results.to_csv(index=False, float_format="%.10g").encode())
    store.write_table(store.path("results", "reconstruction.parquet"),
                      pa.Table.from_pandas(results, preserve_index=False))
    log("analyse", f"{len(results)} numbers in results/reconstruction.csv")
    return results, info
