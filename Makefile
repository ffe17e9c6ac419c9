PYTHON ?= python3
export PYTHONDONTWRITEBYTECODE ?=

.PHONY: setup test test-fast check lint types demo pyz bench clean

setup:  ## install the project and its dev tools
	$(PYTHON) -m pip install -q -e '.[dev]'

test:  ## the whole suite (unit, integration, faults) against private mosquitto/redis
	$(PYTHON) -m pytest -q

test-fast:  ## unit tests only
	$(PYTHON) -m pytest -q tests/unit

check: lint types

lint:
	$(PYTHON) -m ruff check src tests bench scripts
	$(PYTHON) -m ruff format --check src

types:
	$(PYTHON) -m mypy --strict src

demo:  ## the main job on embedded defaults: private broker, reference backend, log WhatsApp, memory queues
	$(PYTHON) scripts/demo.py

pyz: dist/botonera-bridge.pyz

dist/botonera-bridge.pyz: shiv.toml pyproject.toml $(shell find src -name '*.py' -o -name '*.html')
	$(PYTHON) scripts/build_pyz.py

bench:  ## throughput, CPU, latency, backlog drain and RSS against Node-RED 4 (npm-installed into bench/.node-red) and a naive forwarder (writes bench/results/latest.md)
	$(PYTHON) bench/run.py

clean:
	rm -rf dist build .pytest_cache .mypy_cache .ruff_cache tests/artifacts
