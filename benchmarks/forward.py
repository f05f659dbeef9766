"""Atoms per second of each adapter's graph building and batched forward pass, in one
process, by batch budget (atoms per batch) and torch thread count.

    .venv/bin/python benchmarks/forward.py [--models chgnet:0.3.0 sevenn:7net-0 ...]
        [--structures 120] [--budgets 64 256 1024] [--threads 1]

Structures: the first N of the embedded MAD set. Each configuration runs the whole set
once after one warm-up batch; the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[
        "chgnet:0.3.0", "sevenn:7net-0", "sevenn:7net-l3i5"])
    parser.add_argument("--structures", type=int, default=120)
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    args = parser.parse_args()

    import torch
    from ase.io import read

    from latentray.datasets import resolve_paths
    from latentray.extraction.worker import by_atoms
    from latentray.models import load_adapter

    warnings.simplefilter("ignore")
    frames = read(str(resolve_paths("builtin:mad-val-1000")[0]), index=f":{args.structures}")
    n_atoms = sum(len(a) for a in frames)
    print(f"{len(frames)} MAD structures, {n_atoms} atoms; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print("| model | threads | atoms per batch | prepare (atoms/s) | forward (atoms/s) | both (atoms/s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in args.models:
        family, checkpoint = spec.split(":", 1)
        modality = "PBE" if checkpoint == "7net-mf-0" else None
        adapter = load_adapter(family, checkpoint, modality=modality)
        t = time.perf_counter()
        prepared = [adapter.prepare(a) for a in frames]
        t_prepare = time.perf_counter() - t
        for threads in args.threads:
            torch.set_num_threads(threads)
            for budget in args.budgets:
                batches = [[p for _, p in batch] for batch in by_atoms(
                    zip(frames, prepared), lambda item: len(item[0]), budget)]
                adapter.forward(batches[0], ["all"])  # warm-up
                t = time.perf_counter()
                for b in batches:
                    adapter.forward(b, ["all"])
                t_forward = time.perf_counter() - t
                both = n_atoms / (t_prepare + t_forward)
                print(f"| {family} {checkpoint} | {threads} | {budget} | {n_atoms / t_prepare:,.0f} "
                      f"| {n_atoms / t_forward:,.0f} | {both:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
