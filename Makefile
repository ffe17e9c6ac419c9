# Every target runs the project's own virtualenv (.venv), made from requirements.lock the
# first time a target needs it: a fresh clone needs only `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
STAMP := $(VENV)/.installed-from-lock
PLATFORM ?=
export PYTHONDONTWRITEBYTECODE ?=

.PHONY: setup lock test test-fast check lint types demo pyz bench clean

# The venv is (re)installed whenever the lock or pyproject.toml is newer than the stamp.
# --require-hashes: every wheel must match the hash PyPI published when the lock was made.
# --no-build-isolation: the project itself builds with the lock's setuptools and wheel.
$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || { echo "· creating $(VENV) from $(LOCK)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)  ## create or update .venv from the lock (done by every target that needs it)

lock: $(STAMP)  ## re-resolve requirements.lock from pyproject.toml against PyPI (see README: dependencias)
	$(PY) -m piptools compile -q --generate-hashes --allow-unsafe --strip-extras \
	    --no-emit-find-links --no-emit-index-url --extra dev \
	    $(if $(UPGRADE),--upgrade-package '$(UPGRADE)') -o $(LOCK) pyproject.toml

test: $(STAMP)  ## the whole suite (unit, integration, faults) against private mosquitto/redis
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## unit tests only
	$(PY) -m pytest -q tests/unit

check: lint types

lint: $(STAMP)
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m ruff format --check src

types: $(STAMP)
	$(PY) -m mypy --strict src

demo: $(STAMP)  ## the main job on embedded defaults: private broker, reference backend, log WhatsApp, memory queues
	$(PY) scripts/demo.py

# `make pyz` for this machine; `make pyz PLATFORM=linux-aarch64` for a 64-bit Raspberry Pi.
pyz: $(STAMP)
	$(PY) scripts/build_pyz.py $(if $(PLATFORM),--platform $(PLATFORM))

bench: $(STAMP)  ## throughput, CPU, latency, backlog drain and RSS against Node-RED 4 (npm-installed into bench/.node-red) and a naive forwarder (writes bench/results/latest.md)
	$(PY) bench/run.py
	$(MAKE) pyz
	$(PY) scripts/pyz_stats.py dist/botonera-bridge.pyz

clean:
	rm -rf dist build .pytest_cache .mypy_cache .ruff_cache tests/artifacts
