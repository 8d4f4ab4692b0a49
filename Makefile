# The README's two commands: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
# Be explicit about Ray token auth and telemetry (ecosystem.md §5f); token mode on real clusters.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

.PHONY: env demo test test-full
env:
	bash scripts/setup_env.sh $(VENV)

demo: env
	$(VENV)/bin/farm demo

# The fast suite (what CI runs): everything but the tests marked slow. 4-9 min on the 2-core VM (4 min 15 s on 2026-12-04, idle).
test: env
	$(PY) -m pytest -q -m "not slow"

# Everything, including real-data accuracy, Ray Jobs on a local head, an mlflow server, sweeps.
test-full: env
	$(PY) -m pytest -q
