"""Make the uploaded working dir (the repo root) importable when a job runs ``python jobs/x.py``."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
