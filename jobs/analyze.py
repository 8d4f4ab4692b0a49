"""Ray Jobs entry point: `python jobs/analyze.py MODEL_DIR --out DIR`. A thin wrapper over `farm analyze`."""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
