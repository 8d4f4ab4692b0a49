"""Ray Jobs entry point: `ray job submit --working-dir . -- python jobs/compress.py --config configs/demo.yaml`.

A thin wrapper over `farm compress`; inside a Ray Job it joins the cluster through RAY_ADDRESS.
"""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
