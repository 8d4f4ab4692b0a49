"""Ray Jobs entry point: `ray job submit --working-dir . -- python jobs/sweep.py --config configs/demo.yaml`.

A thin wrapper over `farm sweep`; inside a Ray Job it joins the cluster through RAY_ADDRESS.
"""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
