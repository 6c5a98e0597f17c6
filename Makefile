# The commands of the README: `make demo` (install + run the example job), `make test` (every test,
# as CI runs them; `make test-quick` without the deployed form), and
# `make rehearse` (the deployed form: both image environments apart, S3, an MLflow server, Airflow).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
ROUNDS ?= 5

.PHONY: install demo test test-quick test-deployed lint rehearse

# The dev venv: uv (pinned by constraints.txt) installs airfed[dev] through images/install_env.py, the
# script the images and the rehearsal install with: torch first and pinned (constraints.txt; an
# unpinned torch pulls several GB of CUDA packages), everything at its pin, airfed editable.
$(BIN)/airfed: pyproject.toml constraints.txt images/install_env.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt uv
	$(BIN)/python images/install_env.py install dev --python $(BIN)/python --installer uv --editable
	touch $(BIN)/airfed

install: $(BIN)/airfed

demo: install
	$(BIN)/airfed run dags/digits.yaml --rounds $(ROUNDS)

# Three workers on two cores: the suite waits on servers and subprocesses often enough that a third
# worker keeps both cores busy (measured on 2 cores: 7m21s of pytest instead of 9m15s with two, the
# machine 94% busy; four workers measured no better: 5m17s of make test against 5m21s). PYTEST_WORKERS
# overrides it.
PYTEST_WORKERS ?= 3
PYTEST  = $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The whole suite, what CI runs (.ci/run) and the README names: lint, the tests and the deployed form
# (both image environments built under .rehearse/, the rehearsal and its faults). mypy type-checks
# while the tests run (from an empty cache it takes ~45 s of one core, the suite leaves gaps); its
# report follows pytest's, and either failing fails the target.
test: install
	$(BIN)/ruff check .
	@$(BIN)/mypy > $(VENV)/mypy-report.txt 2>&1 & typecheck=$$!; \
	echo "$(PYTEST)  (and $(BIN)/mypy meanwhile)"; $(PYTEST); tests=$$?; \
	wait $$typecheck; typed=$$?; \
	echo "$(BIN)/mypy"; cat $(VENV)/mypy-report.txt; \
	exit $$(( tests || typed ))

# The developer loop: everything but the deployed form (tests marked `deployed`).
test-quick: lint
	$(PYTEST) -m "not deployed"

test-deployed: install
	$(PYTEST) -m deployed

# Builds (or reuses, under .rehearse/) the Airflow and fl-task images' environments with
# images/install_env.py, deploys them on loopback and runs the digits job through the REST API.
rehearse: install
	$(BIN)/python images/rehearse.py --rounds 2

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
