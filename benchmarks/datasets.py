"""Frames per second and peak memory of latentray's dataset readers, against what a user
would otherwise do, in the same run.

    .venv/bin/python benchmarks/datasets.py [--data /tmp/latentray-datasets-bench]
        [--mptrj-gb 1.0] [--naive-mb 100] [--max-naive-gb 16] [--out results.json]

Inputs (generated once under ``--data`` and reused on later runs):

* MPtrj JSON, native schema ``{mp_id: {frame_id: {"structure": ..., ...}}}``, ``--mptrj-gb``
  big, written material by material from the 11 real frames of ``tests/data/mptrj-sample.json``
  (all MPtrj keys: force, stress, magmom, ...), re-labelled (new mp ids and frame ids) and with
  jittered fractional coordinates ("abc", and "xyz" to match); plus a ``--naive-mb`` file made
  the same way, whose materials are the first ones of the big file (a prefix);
* extxyz: the embedded MAD file ``mad-val-1000.xyz`` repeated 20 times (20,000 frames);
* Parquet: that extxyz file through ``latentray prepare`` (latentray's structures Parquet, the
  recommended cluster input).

Methods: latentray ``iter_shards`` (shards of 1,000; the shards are dropped after counting);
naive MPtrj: ``json.load`` then ``pymatgen.core.Structure.from_dict`` per frame (taking its
cartesian coordinates, numbers and lattice: what latentray yields); naive extxyz:
``ase.io.read(path, index=":")``. The naive MPtrj reader runs on the ``--naive-mb`` file, and on
the big file too where its peak RSS, extrapolated from the small file, stays under
``--max-naive-gb``; latentray runs on both, so one comparison is at equal size.

Every measurement is a child process of this script (one BLAS thread). Seconds:
``perf_counter`` around the read alone (imports done before). Peak RSS: the child's
``VmHWM`` (interpreter and imports included; its own, not the parent's at the fork). GB = 1e9 bytes, MB = 1e6 bytes. Where
latentray and a naive reader read the same file, their frame and atom counts and a checksum of
the positions must agree (asserted).
"""

from __future__ import annotations

import os

_BLAS_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
os.environ.update(_BLAS_ENV)  # before numpy: this process and its children, one BLAS thread

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from machine_info import describe, peak_rss_gb  # noqa: E402  (benchmarks/machine_info.py)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "mptrj-sample.json"
MAD = ROOT / "latentray" / "data" / "mad-val-1000.xyz"
MAD_REPEATS = 20
MAD_NAME = f"mad-x{MAD_REPEATS}"  # the dataset name of the prepared Parquet
SHARD_SIZE = 1000
JITTER = 1e-3  # standard deviation of the fractional-coordinate jitter
GENERATOR = 1  # bump when the data recipe changes: cached files are then rewritten
METHODS = {
    "latentray": "latentray `iter_shards`",
    "naive-mptrj": "`json.load` + `Structure.from_dict`",
    "naive-extxyz": "`ase.io.read(index=\":\")`",
    "prepare": "`latentray prepare` (extxyz -> Parquet)",
}


# --------------------------------------------------------------------------------------------
# data


def _cached(path: Path, recipe: dict) -> bool:
    marker = path.with_name(path.name + ".recipe.json")
    return path.exists() and marker.exists() and json.loads(marker.read_text()) == recipe


def _mark(path: Path, recipe: dict) -> None:
    path.with_name(path.name + ".recipe.json").write_text(json.dumps(recipe))


def mptrj_templates() -> list[list[tuple[str, dict, np.ndarray]]]:
    """The sample's materials: for each, its frames as (frame id, doc, abc array)."""
    sample = json.loads(SAMPLE.read_text())
    return [[(frame_id, doc, np.array([s["abc"] for s in doc["structure"]["sites"]]))
             for frame_id, doc in frames.items()] for frames in sample.values()]


def mptrj_material(m: int, templates) -> tuple[str, str]:
    """Material ``m`` (deterministic): its mp id and its frames as JSON text. The template
    docs are modified in place (every jittered field is rewritten from the template arrays)."""
    rng = np.random.default_rng([GENERATOR, m])
    template = templates[m % len(templates)]
    mp_id, task = f"mp-{1_000_000 + m}", f"mp-{3_000_000 + m}"
    frames = {}
    for frame_id, doc, abc in template:
        calc_step = frame_id.rsplit("-", 2)[-2:]  # "<task>-<calc>-<ionic step>"
        new_abc = abc + rng.normal(0.0, JITTER, abc.shape)
        xyz = new_abc @ np.asarray(doc["structure"]["lattice"]["matrix"])
        for site, a, x in zip(doc["structure"]["sites"], new_abc.tolist(), xyz.tolist()):
            site["abc"], site["xyz"] = a, x
        doc["mp_id"] = mp_id
        frames["-".join([task, *calc_step])] = doc
    return mp_id, json.dumps(frames)


def ensure_mptrj(path: Path, target_bytes: int) -> dict:
    """Write an MPtrj JSON of about ``target_bytes`` (materials 0, 1, ... until the size is
    reached), streaming, unless it is already there; return its size and frame count."""
    recipe = {"target_bytes": target_bytes, "generator": GENERATOR, "jitter": JITTER}
    if _cached(path, recipe):
        return json.loads(path.with_name(path.name + ".recipe.json").read_text())
    t = time.perf_counter()
    templates = mptrj_templates()
    tmp = path.with_name(path.name + ".tmp")
    size = frames = materials = 0
    with open(tmp, "w") as f:
        f.write("{")
        while size < target_bytes:
            mp_id, text = mptrj_material(materials, templates)
            chunk = ("" if materials == 0 else ", ") + json.dumps(mp_id) + ": " + text
            size += f.write(chunk)  # ASCII only: characters = bytes
            frames += len(templates[materials % len(templates)])
            materials += 1
        f.write("}")
    tmp.rename(path)
    recipe.update(bytes=path.stat().st_size, frames=frames, materials=materials)
    _mark(path, recipe)
    print(f"  wrote {path} ({recipe['bytes'] / 1e6:,.0f} MB, {frames:,} frames) in "
          f"{time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return recipe


def ensure_extxyz(path: Path) -> None:
    recipe = {"source": str(MAD), "repeats": MAD_REPEATS, "bytes": MAD.stat().st_size}
    if _cached(path, recipe):
        return
    text = MAD.read_text()
    with open(path, "w") as f:
        for _ in range(MAD_REPEATS):
            f.write(text if text.endswith("\n") else text + "\n")
    _mark(path, recipe)


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# one measured run (in a child process)


def _read_latentray(path: str, fmt: str):
    from latentray.datasets import iter_shards

    subset_key = "mp_id" if fmt == "mptrj-json" else "subset"

    def call():
        frames = atoms = 0
        checksum = 0.0
        for shard in iter_shards("bench", path, fmt, subset_key, shard_size=SHARD_SIZE):
            frames += len(shard)
            atoms += int(shard.n_atoms.sum())
            checksum += float(np.abs(shard.positions).sum())
        return {"frames": frames, "atoms": atoms, "checksum": checksum}
    return call


def _read_naive_mptrj(path: str):
    from pymatgen.core import Structure

    def call():
        frames = atoms = 0
        checksum = 0.0
        with open(path) as f:
            doc = json.load(f)
        for material in doc.values():
            for frame in material.values():
                structure = Structure.from_dict(frame["structure"])
                positions = structure.cart_coords
                numbers = structure.atomic_numbers
                _ = structure.lattice.matrix, frame["corrected_total_energy"]
                frames += 1
                atoms += len(numbers)
                checksum += float(np.abs(positions).sum())
        return {"frames": frames, "atoms": atoms, "checksum": checksum}
    return call


def _read_naive_extxyz(path: str):
    from ase.io import read

    def call():
        images = read(path, index=":")
        return {"frames": len(images), "atoms": sum(len(a) for a in images),
                "checksum": float(sum(np.abs(a.positions).sum() for a in images))}
    return call


def _prepare(path: str, output: str):
    from latentray.cli import main as cli

    def call():
        shutil.rmtree(output, ignore_errors=True)
        code = cli(["prepare", path, "--output", output, "--name", MAD_NAME,
                    "--shard-size", str(SHARD_SIZE)])
        if code:
            raise RuntimeError(f"latentray prepare exited {code}")
        import pyarrow.parquet as pq

        files = sorted(Path(output, "structures", f"dataset={MAD_NAME}").glob("*.parquet"))
        return {"frames": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}
    return call


def measure(job: dict) -> dict:
    method, path = job["method"], job["path"]
    if method == "latentray":
        call = _read_latentray(path, job["format"])
    elif method == "naive-mptrj":
        call = _read_naive_mptrj(path)
    elif method == "naive-extxyz":
        call = _read_naive_extxyz(path)
    else:
        call = _prepare(path, job["output"])
    out = {"peak_before_gb": peak_rss_gb()}
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    out.update(call())
    out["seconds"] = time.perf_counter() - t
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = (cpu_after.ru_utime - cpu.ru_utime) + (cpu_after.ru_stime - cpu.ru_stime)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def child_main(spec: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    try:
        result = measure(json.loads(spec))
    except Exception as e:  # report, don't hide: the parent puts it in the table
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


def run_child(job: dict, timeout: float = 3 * 3600) -> dict:
    """This script as a child process (one BLAS thread) measuring one method on one input."""
    env = {**os.environ, **_BLAS_ENV}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                               json.dumps(job)], env=env, stdout=subprocess.PIPE, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        why = "killed: out of memory?" if proc.returncode == -9 else f"exit {proc.returncode}"
        return {"error": f"child failed ({why})"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# the table


def machine() -> dict:
    import ijson

    return describe(ijson=f"{version('ijson')} ({ijson.backend})", ase=version("ase"),
                    pymatgen=version("pymatgen"), numpy=np.__version__,
                    pyarrow=version("pyarrow"))


def fmt_size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.0f} MB"


def ratio(r: dict, base: dict | None) -> str:
    """latentray against the naive reader: how many times the frames/s, and of the memory."""
    if base is None or r is base or "seconds" not in r or "seconds" not in base:
        return ""
    speed = (r["frames"] / r["seconds"]) / (base["frames"] / base["seconds"])
    where = "" if base["input"] == r["input"] else f" (vs naive on {base['input']})"
    return f"{speed:.2f}x frames/s, {r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x memory{where}"


def table(results: list[dict]) -> str:
    lines = ["| input | size | method | frames | seconds | frames/s | MB/s | peak RSS GB | "
             "ratio (vs naive) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        head = f"| {r['input']} | {fmt_size(r['bytes'])} | {METHODS[r['method']]} |"
        if "seconds" not in r:
            why = f"skipped ({r['skipped']})" if "skipped" in r else f"failed ({r['error']})"
            lines.append(f"{head} {why} | | | | | |")
            continue
        lines.append(f"{head} {r['frames']:,} | {r['seconds']:.1f} | "
                     f"{r['frames'] / r['seconds']:,.0f} | {r['bytes'] / 1e6 / r['seconds']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} | {ratio(r, r.get('base'))} |")
    return "\n".join(lines)


def checks(results: list[dict]) -> list[tuple[str, bool]]:
    """latentray against the naive reader of the same structures (``same``: the same file,
    or the Parquet made from it): frames, and atoms and a checksum of the positions."""
    out = []
    for r in results:
        base = r.get("base")
        if not (base and r.get("same")) or "frames" not in r or "frames" not in base:
            continue
        ok = r["frames"] == base["frames"]
        line = (f"{r['input']}: {METHODS[r['method']]} {r['frames']:,} frames, "
                f"{METHODS[base['method']]} on {base['input']} {base['frames']:,}")
        if "atoms" in r:
            ok = (ok and r["atoms"] == base["atoms"]
                  and abs(r["checksum"] - base["checksum"]) <= 1e-9 * abs(base["checksum"]))
            line += (f"; atoms {r['atoms']:,} / {base['atoms']:,}; sum |positions| "
                     f"{r['checksum']:.6f} / {base['checksum']:.6f}")
        out.append((line, ok))
    return out


# --------------------------------------------------------------------------------------------
# the plan


def mptrj_runs(data: Path, big_gb: float, naive_mb: float, max_naive_gb: float) -> list[dict]:
    """The naive reader and latentray on the small file, then on the big one."""
    small_bytes = int(min(naive_mb * 1e6, big_gb * 1e9))
    small = data / f"mptrj-{naive_mb:g}mb.json"
    big = data / f"mptrj-{big_gb:g}gb.json"
    results = []
    for path, target in ((small, small_bytes), (big, int(big_gb * 1e9))):
        print(f"MPtrj {fmt_size(target)}: data", file=sys.stderr, flush=True)
        info = ensure_mptrj(path, target)
        label = f"MPtrj JSON {fmt_size(info['bytes'])}"
        naive_small = next((r for r in results if r["method"] == "naive-mptrj"
                            and "seconds" in r), None)
        naive = {"skipped": "no smaller run to extrapolate from"}
        if path == small:
            naive = run_child({"method": "naive-mptrj", "path": str(path)})
        elif naive_small:
            expected = naive_small["peak_rss_gb"] * info["bytes"] / naive_small["bytes"]
            naive = (run_child({"method": "naive-mptrj", "path": str(path)})
                     if expected <= max_naive_gb else
                     {"skipped": f"needs ~{expected:.0f} GB > {max_naive_gb:g} GB"})
        naive = {"input": label, "bytes": info["bytes"], "method": "naive-mptrj", **naive}
        print(f"  naive: {json.dumps(naive)}", file=sys.stderr, flush=True)
        ours = run_child({"method": "latentray", "path": str(path), "format": "mptrj-json"})
        ours = {"input": label, "bytes": info["bytes"], "method": "latentray", **ours}
        print(f"  latentray: {json.dumps(ours)}", file=sys.stderr, flush=True)
        ours["base"] = naive if "seconds" in naive else naive_small
        ours["same"] = ours["base"] is naive
        results += [naive, ours]
        if path == small and small_bytes == int(big_gb * 1e9):
            break
    return results


def extxyz_runs(data: Path) -> list[dict]:
    """ase.io.read and latentray on the repeated MAD file; prepare it; read the Parquet back."""
    path = data / f"mad-val-1000-x{MAD_REPEATS}.xyz"
    ensure_extxyz(path)
    label, size = f"MAD extxyz x{MAD_REPEATS}", path.stat().st_size
    output = data / "parquet"
    parts = output / "structures" / f"dataset={MAD_NAME}"
    print(label, file=sys.stderr, flush=True)

    def row(method: str, base: dict | None = None, **job) -> dict:
        r = {"input": label, "bytes": size, "method": method, "base": base,
             "same": base is not None, **run_child({"method": method, "path": str(path), **job})}
        print(f"  {method} {r['input']}: "
              f"{json.dumps({k: v for k, v in r.items() if k != 'base'})}",
              file=sys.stderr, flush=True)
        return r

    naive = row("naive-extxyz")
    ours = row("latentray", naive, format="extxyz")
    prep = row("prepare", naive, output=str(output))
    path, label = parts, f"MAD Parquet x{MAD_REPEATS}"  # read back what prepare wrote
    size = disk_bytes(parts) if parts.exists() else 0
    back = row("latentray", naive, format="parquet")
    return [naive, ours, prep, back]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/latentray-datasets-bench", help="input cache")
    parser.add_argument("--mptrj-gb", type=float, default=1.0, help="size of the big MPtrj JSON")
    parser.add_argument("--naive-mb", type=float, default=100.0,
                        help="size of the MPtrj JSON that the naive reader always runs on")
    parser.add_argument("--max-naive-gb", type=float, default=16.0,
                        help="skip the naive MPtrj reader above this expected peak RSS")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child)

    t0 = time.perf_counter()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = mptrj_runs(data, args.mptrj_gb, args.naive_mb, args.max_naive_gb)
    results += extxyz_runs(data)
    total = time.perf_counter() - t0

    print(f"CPU: {info['cpu']}, {info['cores']} cores, {info['ram_gb']:.1f} GB RAM; "
          f"Python {info['python']}, ijson {info['ijson']}, ase {info['ase']}, "
          f"pymatgen {info['pymatgen']}, numpy {info['numpy']}, pyarrow {info['pyarrow']}; "
          f"one process per measurement, one BLAS thread\n")
    print(table(results))
    print()
    found = checks(results)
    for line, ok in found:
        print(f"check: {line}: {'OK' if ok else 'FAIL'}")
    print(f"\nTotal wall time: {total:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "command": sys.argv, "total_wall_s": total,
                       "results": [{k: v for k, v in r.items() if k != "base"}
                                   for r in results]}, f, indent=1)
    assert found and all(ok for _, ok in found), "latentray and the naive reader disagree"


if __name__ == "__main__":
    main()
