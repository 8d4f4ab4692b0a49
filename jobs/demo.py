"""Ray Jobs entry point for the demo, a thin wrapper over `farm demo`:

    ray job submit --working-dir . -- python jobs/demo.py --out $PWD/farm_runs/demo

`--out` must be absolute and outside Ray's temporary copy of the working dir (see jobs/compress.py).
"""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
