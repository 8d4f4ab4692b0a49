"""Ray Jobs entry point, a thin wrapper over `farm teacher train`:

    ray job submit --working-dir . -- python jobs/train_teacher.py --config configs/teacher_v4_real.yaml \
        --out $PWD/farm_runs/teacher --tracking-uri sqlite:///$PWD/farm_runs/mlflow.db

`--out` and the MLflow store must be absolute and outside Ray's temporary copy of the working dir
(deleted with the session); a relative one, or no `--tracking-uri` (the default store under the
current directory), is refused before training.
"""

import sys

import _path  # noqa: F401  (repo root on sys.path)

from farm.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", "train", *sys.argv[1:]]))
