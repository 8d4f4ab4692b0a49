"""Ray Jobs entry point, a thin wrapper over `farm analyze`:

    python jobs/analyze.py --config configs/demo.yaml [key=value ...]   # every model of a compress job
    python jobs/analyze.py MODEL_DIR --out DIR                          # one compact model
"""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
