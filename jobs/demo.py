"""Ray Jobs entry point for the demo: `ray job submit --working-dir . -- python jobs/demo.py`."""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
