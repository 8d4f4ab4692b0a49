"""Ray Jobs entry point: `ray job submit --working-dir . -- python jobs/train_teacher.py --config
configs/teacher_v4_real.yaml --out farm_runs/teacher`. A thin wrapper over `farm teacher train`."""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", "train", *sys.argv[1:]]))
