"""Command line: ``latentray run CONFIG [--output DIR] [--limit N] [--address ADDR]``."""

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
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="output directory or URI (overrides the config)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N structures of each dataset (quick runs)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address; default: a running cluster if any, "
                             "else a local one")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run_from_args(args: argparse.Namespace) -> int:
    from .pipeline import run

    try:
        config = load_config(args.config, output=args.output)
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit must be a positive integer, got {args.limit}")
        run(config, limit=args.limit, address=args.address, quiet=args.quiet)
    except (ConfigError, DatasetError) as exc:
        print(f"latentray: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_from_args(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
