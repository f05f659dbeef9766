"""GFRE time and peak memory: scikit-matter against latentray, in memory and streamed from Parquet.

    .venv/bin/python benchmarks/reconstruction.py [--sizes 1e4,1e5,1e6] [--big 1e7] [--no-big]
        [--data /tmp/latentray-bench] [--out results.json]

For every size n and width pair (dx, dy) in (128, 128), (256, 64), on the same synthetic data:

* ``skmatter.metrics.global_reconstruction_error`` (in memory);
* ``latentray.method.reconstruction.global_reconstruction_error`` (in memory, same signature);
* ``latentray.method.streaming.reconstruction_at_scale`` over a
  ``latentray.analysis.blocks.PairSource`` (Parquet, one shard at a time, serial executor), with
  ``IndexSplit`` (the split of the two above, so the value must equal skmatter's to ~1e-8;
  n <= 1e6) and with ``HashSplit(1000)`` (the split at scale: another test set, so a slightly
  different value);

and the streamed fit alone at ``--big`` rows (dx=256 -> dy=64, HashSplit), in one process and
as Ray tasks on every core (``RayExecutor`` on a local Ray instance, as the analysis stage runs
it; its memory: the proportional set size of this process and every Ray process it started,
sampled every second in one call; its time: a second call, unsampled).
The in-memory split is ``latentray.method.splits.paper_split(n, 1000, seed=0)``.

Data: X = G M + mu (G standard normal, M a fixed mixing with singular values over 3 decades),
Y = tanh(X B) + 0.1 noise, float32, generated shard by shard (200,000 rows; "structures" of 20
atoms) and written once per size to ``DATA/n{n}-{dx}x{dy}/`` in latentray's layout (reused on
later runs). The in-memory methods get the same values read back from Parquet, as float64
(skmatter computes float32 input in float32, which alone moves its GFRE by ~1e-5).

Every run is a child process of this script (one BLAS thread). Wall time: ``perf_counter``
around the call only (in-memory: not the loading; streaming: the whole call, Parquet reading
included). Peak RSS: the child's ``VmHWM`` over the call: the high-water mark is reset
(``/proc/self/clear_refs``) just before it, so it counts the resident data and interpreter but
not the loading (the JSON also has the peak including the loading). GB = 1e9 bytes. skmatter
is skipped where its extrapolated memory or time would exceed ``--max-mem-gb`` / ``--max-sk-s``.
"""

from __future__ import annotations

import os

_BLAS_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
os.environ.update(_BLAS_ENV)  # before numpy: this process and its children, one BLAS thread

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import posixpath  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
from machine_info import describe, peak_rss_gb  # noqa: E402  (benchmarks/machine_info.py)

SHAPES = [(128, 128), (256, 64)]
DATASET, SOURCE, TARGET = "bench", ("a", "bb"), ("b", "bb")
ATOMS = 20  # rows per "structure"
SHARD_ROWS = 200_000  # rows per shard (10,000 structures)
N_TEST, SEED = 1000, 0
INDEX_SPLIT_MAX = 10**6  # IndexSplit holds one label per row: run it up to this size
GENERATOR = 1  # bump when the data recipe changes: cached data is then rewritten
METHODS = {
    "skmatter": "skmatter (in memory)",
    "latentray": "latentray (in memory)",
    "stream-index": "latentray streaming, IndexSplit",
    "stream-hash": "latentray streaming, HashSplit",
    "stream-ray": "latentray streaming, HashSplit, Ray tasks on every core",
}


# --------------------------------------------------------------------------------------------
# data


def _mixing(dx: int, dy: int):
    """The fixed maps of the data recipe: M (dx x dx), B (dx x dy), mu (dx)."""
    rng = np.random.default_rng([SEED, dx, dy])
    decay = 10.0 ** (-3 * np.arange(dx) / dx)
    Q, _ = np.linalg.qr(rng.standard_normal((dx, dx)))
    M = decay[:, None] * Q
    B = 2 * rng.standard_normal((dx, dy)) / np.linalg.norm(decay)
    mu = rng.standard_normal(dx)
    return M.astype(np.float32), B.astype(np.float32), mu.astype(np.float32)


def synthetic_block(shard: int, rows: int, dx: int, dy: int):
    """Rows of shard ``shard``: X = G M + mu, Y = tanh(X B) + 0.1 noise (float32)."""
    M, B, mu = _mixing(dx, dy)
    rng = np.random.default_rng([SEED, dx, dy, shard])
    X = rng.standard_normal((rows, dx), dtype=np.float32) @ M + mu
    Y = np.tanh(X @ B) + np.float32(0.1) * rng.standard_normal((rows, dy), dtype=np.float32)
    return X, Y


def shard_rows(n: int) -> list[int]:
    if n % ATOMS:
        raise ValueError(f"n={n} must be a multiple of {ATOMS} (atoms per structure)")
    return [min(SHARD_ROWS, n - start) for start in range(0, n, SHARD_ROWS)]


def data_dir(root: str, n: int, dx: int, dy: int) -> str:
    return os.path.join(root, f"n{n}-{dx}x{dy}")


def write_structures(store, shard: int, first: int, rows: int):
    """The structures file of one shard: ``rows // ATOMS`` structures of ``ATOMS`` atoms from
    structure_index ``first``, every third a "surface", the rest "bulk"; returns their ids,
    indices, atom counts and the atoms' element numbers."""
    import pyarrow as pa

    index = first + np.arange(rows // ATOMS, dtype=np.int64)
    ids = np.array([f"bench-{i:09d}" for i in index])
    n_atoms = np.full(len(index), ATOMS, dtype=np.int64)
    numbers = 1 + (first * ATOMS + np.arange(rows)) % 94
    store.write_table(store.structures_path(DATASET, shard), pa.table({
        "structure_id": pa.array(ids, pa.string()), "structure_index": index,
        "n_atoms": n_atoms, "subset": pa.array(np.where(index % 3, "bulk", "surface"),
                                               pa.string())}))
    return ids, index, n_atoms, numbers


def ensure_data(root: str, n: int, dx: int, dy: int) -> str:
    """Write the Parquet data of one case once (shard by shard); reuse it when already there."""
    from latentray.store import Store, latent_table

    directory = data_dir(root, n, dx, dy)
    store = Store(directory)
    marker = store.path("bench.json")
    recipe = {"n": n, "dx": dx, "dy": dy, "atoms": ATOMS, "shard_rows": SHARD_ROWS,
              "seed": SEED, "generator": GENERATOR}
    if store.read_json(marker) == recipe:
        return directory
    t = time.perf_counter()
    first = 0  # structure_index of the shard's first structure
    for shard, rows in enumerate(shard_rows(n)):
        X, Y = synthetic_block(shard, rows, dx, dy)
        ids, index, n_atoms, numbers = write_structures(store, shard, first, rows)
        for (model, layer), features in ((SOURCE, X), (TARGET, Y)):
            store.write_table(posixpath.join(store.latents_dir(DATASET, model, layer),
                                            store.part(shard)),
                              latent_table(ids, index, n_atoms, numbers, features, metadata={}))
        first += len(index)
    store.write_json(marker, recipe)
    print(f"  wrote {directory} ({disk_gb(directory):.2f} GB) in {time.perf_counter() - t:.0f} s",
          file=sys.stderr, flush=True)
    return directory


def disk_gb(directory: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory)
               for f in files) / 1e9


def load_arrays(directory: str, n: int, dx: int, dy: int):
    """The Parquet features of both models as float64 (n, dx) and (n, dy), shard by shard."""
    import pyarrow.parquet as pq

    from latentray.store import Store, features_matrix

    store = Store(directory)
    X, Y = np.empty((n, dx)), np.empty((n, dy))
    start = 0
    for shard, rows in enumerate(shard_rows(n)):
        for (model, layer), out in ((SOURCE, X), (TARGET, Y)):
            path = posixpath.join(store.latents_dir(DATASET, model, layer), store.part(shard))
            table = pq.read_table(path, columns=["features"])
            out[start: start + rows] = features_matrix(table["features"], out.shape[1])
            del table
        start += rows
    return X, Y


# --------------------------------------------------------------------------------------------
# one measured run (in a child process)


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(method: str, n: int, dx: int, dy: int, directory: str) -> dict:
    """Run one method once; time and peak memory of the call alone."""
    from latentray.method.splits import paper_split

    train_idx, test_idx = paper_split(n, N_TEST, seed=SEED)
    out: dict = {}
    if method in ("skmatter", "latentray"):
        if method == "skmatter":
            from skmatter.metrics import global_reconstruction_error as gfre
        else:
            from latentray.method.reconstruction import global_reconstruction_error as gfre
        X, Y = load_arrays(directory, n, dx, dy)
        out["data_gb"] = (X.nbytes + Y.nbytes) / 1e9

        def call():
            return {"gfre": float(gfre(X, Y, test_idx=test_idx, train_idx=train_idx))}
    else:
        from latentray.analysis.blocks import PairSource
        from latentray.method.streaming import (HashSplit, IndexSplit, SerialExecutor,
                                         reconstruction_at_scale)

        source = PairSource(directory, DATASET, SOURCE, TARGET,
                            shards=list(range(len(shard_rows(n)))), kind="latents",
                            stratify=False)
        split = (IndexSplit(n, train_idx, test_idx) if method == "stream-index"
                 else HashSplit(N_TEST, seed=SEED, stratified=False))
        out["data_gb_on_disk"] = disk_gb(directory)
        executor = SerialExecutor()
        if method == "stream-ray":  # as the analysis stage runs it: a task per shard
            import ray

            from latentray.analysis.executors import RayExecutor

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False,
                     log_to_driver=False)
            executor = RayExecutor()

        def call():
            r = reconstruction_at_scale(source, split, metrics=("gfre",), executor=executor)
            return {"gfre": r.values["gfre"], "alpha": r.alpha, "n_train": r.n_train,
                    "n_test": r.n_test}
    gc.collect()
    out["peak_incl_loading_gb"] = peak_rss_gb()
    out["rss_before_gb"] = _rss_gb()
    out["peak_reset"] = _reset_peak()
    tree = _TreeMemory() if method == "stream-ray" else None
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    out.update(call())
    out["wall_s"] = time.perf_counter() - t
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_user_s"] = cpu_after.ru_utime - cpu.ru_utime
    out["cpu_sys_s"] = cpu_after.ru_stime - cpu.ru_stime
    out["peak_rss_gb"] = peak_rss_gb()
    out["peak_incl_loading_gb"] = max(out["peak_incl_loading_gb"], out["peak_rss_gb"])
    if tree is not None:  # the memory of every process of the run, not the driver's alone
        out["driver_peak_rss_gb"] = out["peak_rss_gb"]
        out["pss_before_gb"], out["peak_rss_gb"] = tree.stop()
        out["sampler_cpu_s"] = tree.cpu_s
        # the time again, unsampled (the sampler slows what it samples); the same value
        out["wall_s_sampled"] = out["wall_s"]
        t = time.perf_counter()
        again = call()
        out["wall_s"] = time.perf_counter() - t
        if again["gfre"] != out["gfre"]:
            raise RuntimeError(f"the unsampled run gave another GFRE: {again} vs {out}")
    return out


def _tree_pss_gb() -> float:
    """Proportional set size (shared pages split between the processes that map them, so
    that nothing counts twice) of this process and all its descendants (Ray's GCS, raylet,
    workers), GB."""
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me] + me.children(recursive=True):
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass  # gone meanwhile
    return total * 1024 / 1e9


class _TreeMemory:
    """Samples :func:`_tree_pss_gb` every ``interval`` s in a thread; ``stop()``: (first,
    peak). Reading every process's ``smaps_rollup`` walks its page tables (kernel time of
    this process, and a lock the sampled processes wait on): at 0.2 s that took 17 s of CPU
    in a 105 s run at 1e7 rows, so it samples every second and reports its own CPU time
    (``sampler_cpu_s``) beside the wall time it perturbs."""

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval, self.cpu_s = interval, 0.0
        self.first = self.peak = _tree_pss_gb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(self.interval):
            t = time.thread_time()
            self.peak = max(self.peak, _tree_pss_gb())
            self.cpu_s += time.thread_time() - t

    def stop(self) -> tuple[float, float]:
        self._done.set()
        self._thread.join()
        return self.first, max(self.peak, _tree_pss_gb())


def child_main(spec: str) -> None:
    job = json.loads(spec)
    try:
        result = measure(job["method"], job["n"], job["dx"], job["dy"], job["dir"])
    except Exception as e:  # report, don't hide: the parent puts it in the table
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


def run_child(method: str, n: int, dx: int, dy: int, directory: str, timeout: float) -> dict:
    """This script as a child process (one BLAS thread) measuring one method."""
    spec = json.dumps({"method": method, "n": n, "dx": dx, "dy": dy, "dir": directory})
    env = {**os.environ, **_BLAS_ENV}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec],
                              env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        why = "killed: out of memory?" if proc.returncode == -9 else f"exit {proc.returncode}"
        return {"error": f"child failed ({why})"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# the table


def fmt_n(n: int) -> str:
    e = int(round(np.log10(n)))
    return f"1e{e}" if 10**e == n else f"{n:,}"


def machine() -> dict:
    import skmatter

    return describe(numpy=np.__version__, skmatter=skmatter.__version__, blas_threads=1)


def ratio(r: dict, sk: dict | None) -> str:
    if r["method"] == "skmatter" or not sk or "wall_s" not in sk or "wall_s" not in r:
        return ""
    return (f"{sk['wall_s'] / r['wall_s']:.1f}x faster, "
            f"{r['peak_rss_gb'] / sk['peak_rss_gb']:.2f}x memory")


def rel_diff(r: dict, sk: dict | None) -> str:
    if r["method"] == "skmatter" or not sk or "gfre" not in sk or "gfre" not in r:
        return ""
    d = abs(r["gfre"] - sk["gfre"]) / abs(sk["gfre"])
    return (f"({d:.1e}, other split)" if r["method"] in ("stream-hash", "stream-ray")
            else f"{d:.1e}")


def table(results: list[dict]) -> str:
    lines = ["| n | dx->dy | method | wall s | peak RSS GB | data GB | GFRE | "
             "rel. diff vs skmatter | ratio (vs skmatter) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        sk = next((s for s in results if s["method"] == "skmatter" and s["n"] == r["n"]
                   and (s["dx"], s["dy"]) == (r["dx"], r["dy"])), None)
        head = f"| {fmt_n(r['n'])} | {r['dx']}->{r['dy']} | {METHODS[r['method']]} |"
        if "wall_s" not in r:
            why = f"skipped ({r['skipped']})" if "skipped" in r else f"failed ({r['error']})"
            lines.append(f"{head} {why} | | | | | |")
            continue
        data = (f"{r['data_gb']:.2f}" if "data_gb" in r
                else f"{r['data_gb_on_disk']:.2f} on disk")
        lines.append(f"{head} {r['wall_s']:.2f} | {r['peak_rss_gb']:.2f} | {data} | "
                     f"{r['gfre']:.10f} | {rel_diff(r, sk)} | {ratio(r, sk)} |")
    return "\n".join(lines)


def checks(results: list[dict], parity: float = 1e-8, big_gb: float = 4.0) -> list[str]:
    """Lines for what must hold: IndexSplit parity with skmatter, the big run's memory."""
    out = [""]
    for r in results:
        sk = next((s for s in results if s["method"] == "skmatter" and s["n"] == r["n"]
                   and (s["dx"], s["dy"]) == (r["dx"], r["dy"]) and "gfre" in s), None)
        case = f"n={fmt_n(r['n'])} {r['dx']}->{r['dy']}"
        if r["method"] == "stream-index" and sk and "gfre" in r:
            d = abs(r["gfre"] - sk["gfre"]) / abs(sk["gfre"])
            out.append(f"{case} IndexSplit vs skmatter: {d:.1e} "
                       f"({'OK' if d <= parity else 'FAIL'}, limit {parity:.0e})")
        if (r["method"] in ("stream-hash", "stream-ray") and r["n"] > INDEX_SPLIT_MAX
                and "peak_rss_gb" in r):
            ok = r["peak_rss_gb"] < big_gb
            out.append(f"{case} streaming peak RSS {r['peak_rss_gb']:.2f} GB "
                       f"({'OK' if ok else 'FAIL'}, limit {big_gb:.0f} GB)")
    return out


# --------------------------------------------------------------------------------------------
# the plan


def skmatter_skip(n: int, dx: int, dy: int, done: list[dict], max_gb: float,
                  max_s: float) -> str | None:
    """Why skmatter should not run at this size, or None: its peak RSS and time extrapolated
    linearly (a + b n) from its two largest smaller runs of the same widths."""
    prev = sorted((r for r in done if r["method"] == "skmatter" and "wall_s" in r
                   and r["n"] < n and (r["dx"], r["dy"]) == (dx, dy)), key=lambda r: r["n"])
    if len(prev) >= 2:
        p, q = prev[-2:]
        gb, s = ((q[k] + (q[k] - p[k]) * (n - q["n"]) / (q["n"] - p["n"]))
                 for k in ("peak_rss_gb", "wall_s"))
    elif prev:
        gb, s = prev[0]["peak_rss_gb"] * n / prev[0]["n"], prev[0]["wall_s"] * n / prev[0]["n"]
    else:  # about 0.9 GB at 1e5 x (128 + 128)
        gb, s = 0.9 * (n / 1e5) * (dx + dy) / 256, 0.0
    if gb > max_gb:
        return f"needs ~{gb:.0f} GB > {max_gb:.0f} GB"
    if s > max_s:
        return f"would take ~{s / 60:.0f} min > {max_s / 60:.0f} min"
    return None


def cases(sizes: list[int], big: int | None) -> list[tuple[int, int, int, list[str]]]:
    out = []
    for n in sizes:
        for dx, dy in SHAPES:
            methods = ["skmatter", "latentray"]
            methods += ["stream-index"] if n <= INDEX_SPLIT_MAX else []
            out.append((n, dx, dy, methods + ["stream-hash"]))
    if big:
        out.append((big, 256, 64, ["stream-hash", "stream-ray"]))
    return out


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="rows, comma-separated")
    parser.add_argument("--big", default="1e7", help="rows of the streamed-only run")
    parser.add_argument("--no-big", action="store_true", help="skip the streamed-only run")
    parser.add_argument("--data", default="/tmp/latentray-bench", help="Parquet cache")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--max-mem-gb", type=float, default=18.0,
                        help="skip skmatter above this expected memory")
    parser.add_argument("--max-sk-s", type=float, default=900.0,
                        help="skip (or stop) skmatter above this time")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child)

    t0 = time.perf_counter()
    info = machine()
    big = None if args.no_big else int(float(args.big))
    results: list[dict] = []
    for n, dx, dy, methods in cases(parse_sizes(args.sizes), big):
        print(f"n={fmt_n(n)} {dx}->{dy}: data", file=sys.stderr, flush=True)
        directory = ensure_data(args.data, n, dx, dy)
        for method in methods:
            why = (skmatter_skip(n, dx, dy, results, args.max_mem_gb, args.max_sk_s)
                   if method == "skmatter" else None)
            r = ({"skipped": why} if why else
                 run_child(method, n, dx, dy, directory,
                           args.max_sk_s if method == "skmatter" else 4 * 3600))
            results.append({"n": n, "dx": dx, "dy": dy, "method": method, **r})
            print(f"  {METHODS[method]}: {json.dumps(r)}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0

    print(f"CPU: {info['cpu']}, {info['cores']} cores, {info['ram_gb']:.1f} GB RAM; "
          f"Python {info['python']}, numpy {info['numpy']}, skmatter {info['skmatter']}; "
          f"one BLAS thread per process\n")
    print(table(results))
    for line in checks(results):
        print(line)
    print(f"\nTotal wall time: {total:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "command": sys.argv, "total_wall_s": total,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
