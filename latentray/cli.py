"""Command line.

``latentray run CONFIG [--output DIR] [--limit N] [--address ADDR]``: the whole job.
``latentray prepare CONFIG|INPUT --output DIR [--format F] [--name N] [--shard-size S]``:
datasets (every one of a config, or one input file) -> sharded structures Parquet.
``latentray status OUTPUT [--config CONFIG] [--json]``: units done, pending, failed, stale
(exit status 0 when every unit is done, 1 otherwise).
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .datasets import DatasetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentray",
        description="Extract the latent features of uMLIPs with Ray and compare them "
                    "(GFRE, LFRE between every pair of models).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job: extraction, cumulants, fits, report")
    run.add_argument("config", help="YAML config (see jobs/configs/demo.yaml)")
    add_run_options(run)
    prep = sub.add_parser("prepare", help="convert datasets to sharded structures Parquet")
    prep.add_argument("input", help="a YAML config (its datasets) or one input file/glob")
    prep.add_argument("--output", required=True, help="output directory or URI")
    prep.add_argument("--format", default=None,
                      help="format of INPUT: extxyz, mptrj-json, ase-db, parquet "
                           "(default: from the file name)")
    prep.add_argument("--name", default=None, help="dataset name (default: the file's stem)")
    prep.add_argument("--subset-key", default="subset", help="info key / field of the subset")
    prep.add_argument("--shard-size", type=int, default=250, help="structures per shard")
    prep.add_argument("--on-error", default="raise", choices=["raise", "skip"])
    stat = sub.add_parser("status", help="which extraction units are done, pending, failed "
                                         "or stale (exit 0 when all are done)")
    stat.add_argument("output", help="a job's output directory or URI")
    stat.add_argument("--config", default=None,
                      help="compare with this config (default: the last run's, in run.json)")
    stat.add_argument("--json", action="store_true", help="one JSON record per unit")
    return parser


def _guess_format(path: str) -> str:
    name = path.lower()
    if name.startswith("builtin:"):
        return "extxyz"
    for suffix, fmt in ((".json", "mptrj-json"), (".db", "ase-db"), (".parquet", "parquet"),
                        (".xyz", "extxyz"), (".extxyz", "extxyz")):
        if name.endswith(suffix):
            return fmt
    raise ConfigError(f"cannot tell the format of {path!r}: give --format")


def prepare_from_args(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import parse_dataset
    from .prepare import prepare_dataset

    try:
        if args.shard_size <= 0:
            raise ConfigError(f"--shard-size must be a positive integer, got {args.shard_size}")
        if args.input.endswith((".yaml", ".yml")):
            datasets = load_config(args.input, output=args.output).datasets
        else:
            name = args.name or Path(args.input).stem.replace(" ", "-")
            raw = {"name": name, "path": args.input,
                   "format": args.format or _guess_format(args.input),
                   "subset_key": args.subset_key, "on_error": args.on_error}
            datasets = [parse_dataset(raw, "latentray prepare")]
        for dataset in datasets:
            prepare_dataset(dataset, args.output, args.shard_size,
                            log=lambda m: print(f"latentray prepare: {m}"))
    except (ConfigError, DatasetError) as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="output directory or URI (overrides the config)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N structures of each dataset (quick runs)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address; default: a running cluster if any, "
                             "else a local one")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run_from_args(args: argparse.Namespace) -> int:
    from .extraction.stage import UnitsFailed
    from .job import run
    from .method.splits import SplitError

    try:
        config = load_config(args.config, output=args.output)
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit must be a positive integer, got {args.limit}")
        run(config, limit=args.limit, address=args.address, quiet=args.quiet)
    except (ConfigError, DatasetError, SplitError) as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return 2
    except UnitsFailed as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return 1
    return 0


def status_from_args(args: argparse.Namespace) -> int:
    from .status import status

    try:
        config = load_config(args.config, output=args.output) if args.config else None
        text, complete = status(args.output, config, as_json=args.json)
    except ConfigError as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0 if complete else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": run_from_args, "prepare": prepare_from_args, "status": status_from_args}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
