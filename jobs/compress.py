"""Ray Jobs entry point, a thin wrapper over `farm compress`:

    ray job submit --working-dir . -- python jobs/compress.py --config configs/demo.yaml out_dir=$PWD/farm_runs/demo

A Ray Job runs in Ray's temporary copy of the working dir, deleted with the session: give `out_dir`
as an absolute path outside it (on a cluster, a filesystem every node mounts; the default MLflow
store sits beside it, or set `tracking.uri` to the head's server). A relative one is refused before
any work. `farm submit --config configs/demo.yaml` pins every path for you. Inside a Ray Job the
driver joins the cluster through RAY_ADDRESS.
"""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
