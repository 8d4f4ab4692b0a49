"""Ray Jobs entry point, a thin wrapper over `farm sweep`:

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/demo.yaml out_dir=$PWD/farm_runs/demo

`out_dir` must be absolute and outside Ray's temporary copy of the working dir (see jobs/compress.py;
`farm submit --sweep --config ...` pins it for you). Inside a Ray Job the driver joins the cluster
through RAY_ADDRESS.
"""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
