"""Every ordered pair of M models, streamed from Parquet: one fit per pair against one pass.

    .venv/bin/python benchmarks/all_pairs.py [--sizes 1e5,1e6] [--models 2,4,8]
        [--data /tmp/latentray-bench-pairs] [--out all_pairs.json] [--methods per-pair,one pass]
        [--no-per-pair-above N] [--per-pair-at 1e6:8]

For every size N (rows: atoms) and number of models M, on the same synthetic latents (M
models x 128 features, float32, in latentray's layout: ``latents/dataset=bench/model=mK/
layer=bb/part-*.parquet``, shards of 60,000 rows: the atoms of one shard of
``jobs/configs/mptrj.yaml``, 2,000 structures of MPtrj's ~30 atoms; here structures of 20
atoms in two subsets),
every ordered pair (M (M - 1) of them) with GFRE, GFRD, LFRE (k = 128) and CKA, the hash
split (1,000 test rows, stratified by subset):

* **per pair**: ``latentray.method.streaming.reconstruction_at_scale`` over a
  ``latentray.analysis.blocks.PairSource`` for each pair, one after the other (what the
  analysis did before; each pair reads both models' shards four times);
* **one pass**: ``latentray.method.streaming.all_pairs_at_scale`` over a
  ``latentray.analysis.blocks.ModelSides`` of the M models (each stage reads every model once).

Both on one core (the serial executor, one BLAS thread), in a child process each. Reported:
wall time (the whole call, Parquet reading included), peak RSS over the call (the high-water
mark reset just before it: the resident data and interpreter, not the data generation), bytes
read (the compressed size of every Parquet column chunk read, summed over reads), and the
largest relative difference of any value between the two methods.

Data: a shared latent G (N x 16, standard normal) per row; model m's features are
``tanh(G A_m + 0.3 H_m) + 0.05 noise`` with fixed A_m (16 x 128), H_m a model-own latent (N x
8) mixed in: related but different models. Written once per N for the largest M and reused.
"""

from __future__ import annotations

import os

_BLAS_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
os.environ.update(_BLAS_ENV)  # before numpy: this process and its children, one BLAS thread

import argparse  # noqa: E402
import json  # noqa: E402
import posixpath  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
from machine_info import describe, peak_rss_gb  # noqa: E402  (benchmarks/machine_info.py)
from reconstruction import (  # noqa: E402  (its sibling benchmark: the same layout)
    ATOMS, DATASET, _reset_peak, disk_gb, fmt_n, write_structures)

WIDTH, SHARD_ROWS = 128, 60_000  # rows per shard: one mptrj.yaml shard's atoms
N_TEST, SEED, LATENT, OWN = 1000, 0, 16, 8
METRICS = ("gfre", "gfrd", "lfre", "cka")
LAYER = "bb"
GENERATOR = 2  # bump when the data recipe changes: cached data is then rewritten


def model_block(m: int, shard: int, G: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng([SEED, m])
    A = rng.standard_normal((LATENT, WIDTH)) / np.sqrt(LATENT)
    B = rng.standard_normal((OWN, WIDTH)) / np.sqrt(OWN)
    own = np.random.default_rng([SEED, m, shard])
    H = own.standard_normal((len(G), OWN))
    X = np.tanh(G @ A + 0.3 * H @ B) + 0.05 * own.standard_normal((len(G), WIDTH))
    return X.astype(np.float32)


def ensure_data(root: str, n: int, n_models: int) -> str:
    """Write the Parquet data of one size once (shard by shard); reuse it when already there."""
    from latentray.store import Store, latent_table

    directory = os.path.join(root, f"n{n}")
    store = Store(directory)
    marker = store.path("bench.json")
    recipe = {"n": n, "models": n_models, "width": WIDTH, "atoms": ATOMS,
              "shard_rows": SHARD_ROWS, "seed": SEED, "generator": GENERATOR}
    old = store.read_json(marker) if store.exists(marker) else None
    if old and old["models"] >= n_models and {**old, "models": n_models} == recipe:
        return directory
    t, first = time.perf_counter(), 0
    for shard, start in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - start)
        ids, index, n_atoms, numbers = write_structures(store, shard, first, rows)
        G = np.random.default_rng([SEED, shard]).standard_normal((rows, LATENT))
        for m in range(n_models):
            store.write_table(posixpath.join(store.latents_dir(DATASET, f"m{m}", LAYER),
                                             store.part(shard)),
                              latent_table(ids, index, n_atoms, numbers, model_block(m, shard, G),
                                           metadata={}))
        first += len(index)
    store.write_json(marker, recipe)
    print(f"  wrote {directory} ({disk_gb(directory):.2f} GB) in {time.perf_counter() - t:.0f} s",
          file=sys.stderr, flush=True)
    return directory


# --------------------------------------------------------------------------------------------
# one measured run (in a child process)


def _count_bytes_read() -> dict:
    """Wrap ``pyarrow.parquet.read_table``: add up the compressed size of the column chunks
    each call reads (all columns when none are named)."""
    import pyarrow.parquet as pq

    counter = {"bytes": 0}
    sizes: dict[str, dict[str, int]] = {}
    original = pq.read_table

    def read_table(source, *args, columns=None, filesystem=None, **kwargs):
        path = str(source)
        if path not in sizes:
            meta = pq.ParquetFile(path).metadata
            per: dict[str, int] = {}
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(g).column(c)
                    name = col.path_in_schema.split(".")[0]
                    per[name] = per.get(name, 0) + col.total_compressed_size
            sizes[path] = per
        per = sizes[path]
        counter["bytes"] += sum(v for k, v in per.items() if columns is None or k in columns)
        return original(source, *args, columns=columns, filesystem=filesystem, **kwargs)

    pq.read_table = read_table
    return counter


def measure(method: str, n: int, n_models: int, directory: str) -> dict:
    from latentray.analysis.blocks import ModelSides, PairSource
    from latentray.method.streaming import (HashSplit, SerialExecutor, all_pairs_at_scale,
                                            reconstruction_at_scale)

    counter = _count_bytes_read()
    shards = list(range(-(-n // SHARD_ROWS)))
    sides = [(f"m{m}", LAYER) for m in range(n_models)]
    pairs = [(a, b) for a in range(n_models) for b in range(n_models) if a != b]

    def per_pair():
        out = {}
        for a, b in pairs:
            r = reconstruction_at_scale(PairSource(directory, DATASET, sides[a], sides[b],
                                                   shards, kind="latents"),
                                        HashSplit(N_TEST, seed=SEED), METRICS,
                                        executor=SerialExecutor())
            out[f"{a}-{b}"] = r.values
        return out

    def one_pass():
        source = ModelSides(directory, DATASET, sides, shards, [WIDTH] * n_models)
        got = all_pairs_at_scale(source, pairs, N_TEST, seed=SEED, metrics=METRICS,
                                 executor=SerialExecutor())
        return {f"{a}-{b}": got[a, b].values for a, b in pairs}

    call = per_pair if method == "per-pair" else one_pass
    out = {"peak_reset": _reset_peak()}
    t = time.perf_counter()
    out["values"] = call()
    out["wall_s"] = time.perf_counter() - t
    out["peak_rss_gb"] = peak_rss_gb()
    out["read_gb"] = counter["bytes"] / 1e9
    return out


def child_main(spec: str) -> None:
    job = json.loads(spec)
    try:
        result = measure(job["method"], job["n"], job["models"], job["dir"])
    except Exception as e:  # report, don't hide: the parent puts it in the table
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


def run_child(method: str, n: int, n_models: int, directory: str) -> dict:
    spec = json.dumps({"method": method, "n": n, "models": n_models, "dir": directory})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec],
                          env={**os.environ, **_BLAS_ENV}, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {"error": f"child failed (exit {proc.returncode})"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# the table


def max_rel_diff(a: dict, b: dict) -> float:
    return max(abs(a[p][m] - b[p][m]) / abs(b[p][m]) for p in b for m in b[p])


def table(results: list[dict]) -> str:
    lines = ["| N | M | pairs | method | wall s | peak RSS GB | read GB | vs per pair | "
             "max rel. diff |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        head = f"| {fmt_n(r['n'])} | {r['models']} | {r['models'] * (r['models'] - 1)} | " \
               f"{r['method']} |"
        if "wall_s" not in r:
            lines.append(f"{head} {r.get('skipped') or 'failed: ' + r['error']} | | | | |")
            continue
        ref = next((s for s in results if s["method"] == "per-pair" and s["n"] == r["n"]
                    and s["models"] == r["models"] and "wall_s" in s), None)
        speed = (f"**{ref['wall_s'] / r['wall_s']:.1f}x faster**"
                 if ref and r["method"] == "one pass" else "")
        diff = f"{max_rel_diff(r['values'], ref['values']):.1e}" if ref and ref is not r else ""
        lines.append(f"{head} {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['read_gb']:.2f} | {speed} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1e5,1e6")
    parser.add_argument("--models", default="2,4,8")
    parser.add_argument("--data", default="/tmp/latentray-bench-pairs")
    parser.add_argument("--out", default="all_pairs.json")
    parser.add_argument("--methods", default="per-pair,one pass")
    parser.add_argument("--no-per-pair-above", type=float, default=None,
                        help="skip the per-pair method above this many rows x pairs")
    parser.add_argument("--per-pair-at", default=None,
                        help="run the per-pair method only at these N:M, e.g. 1e6:8")
    args = parser.parse_args()
    if args.child:
        return child_main(args.child)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    models = [int(m) for m in args.models.split(",")]
    per_pair_at = None if args.per_pair_at is None else {
        (int(float(n)), int(m)) for n, m in (x.split(":") for x in args.per_pair_at.split(","))}
    results = []
    import skmatter

    info = describe(numpy=np.__version__, skmatter=skmatter.__version__, blas_threads=1)
    for n in sizes:
        directory = ensure_data(args.data, n, max(models))
        for m in models:
            for method in args.methods.split(","):
                work = n * m * (m - 1)
                if method == "per-pair" and args.no_per_pair_above and \
                        work > args.no_per_pair_above:
                    r = {"skipped": f"skipped (N x pairs > {args.no_per_pair_above:.0e})"}
                elif method == "per-pair" and per_pair_at is not None and \
                        (n, m) not in per_pair_at:
                    r = {"skipped": "skipped (not in --per-pair-at)"}
                else:
                    r = run_child(method, n, m, directory)
                r.update(n=n, models=m, method=method)
                results.append(r)
                print(f"N={fmt_n(n)} M={m} {method}: "
                      + (f"{r['wall_s']:.1f} s, {r['peak_rss_gb']:.2f} GB, "
                         f"{r['read_gb']:.2f} GB read" if "wall_s" in r
                         else r.get("skipped") or r.get("error")),
                      file=sys.stderr, flush=True)
                with open(args.out, "w") as f:
                    json.dump({"machine": info, "results": results}, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
