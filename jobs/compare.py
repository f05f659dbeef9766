"""Job entry point, and the target of ``ray submit cluster.yaml jobs/compare.py``.

    python jobs/compare.py --config jobs/configs/demo.yaml [--output DIR] [--limit N]

does the same as ``latentray run CONFIG``. On a cluster head node it connects to the
running Ray cluster; elsewhere it starts a local one. ``ray submit`` runs a copy of this
script from the head node's home directory: a relative ``--config`` that does not exist
there is looked up in the latentray checkout the nodes installed (``cluster.yaml`` mounts it
at ``~/latentray``), so ``--config jobs/configs/mptrj.yaml`` works from either place.
"""

import argparse
import os
import sys
from pathlib import Path

from latentray.cli import add_run_options, run_from_args


def config_path(path: str) -> str:
    """``path``, or the same relative path inside the installed latentray checkout."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    import latentray

    checkout = Path(latentray.__file__).resolve().parents[1] / path
    return str(checkout) if checkout.exists() else path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    add_run_options(parser)
    args = parser.parse_args()
    args.config = config_path(args.config)
    sys.exit(run_from_args(args))
