"""Job entry point, and the target of ``ray submit cluster.yaml jobs/compare.py``.

    python jobs/compare.py --config jobs/configs/demo.yaml [--output DIR] [--limit N]

does the same as ``latentray run CONFIG``. On a cluster head node it connects to the
running Ray cluster; elsewhere it starts a local one.
"""

import argparse
import sys

from latentray.cli import add_run_options, run_from_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config")
    add_run_options(parser)
    sys.exit(run_from_args(parser.parse_args()))
