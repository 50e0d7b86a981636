# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TPROCESS := $(CURDIR)/$(VENV)/bin/tprocess
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-queues soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	bash tests/ensure_redis.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	bash examples/seed/demo.sh $(TPROCESS)

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests examples bench
	$(PY) -m compileall -q src tests examples bench

soak: setup
	$(PY) -m pytest -q --soak -m soak

bench: setup
	$(PY) bench/run.py --out BENCHMARKS.md

# Work queues (issue 7): tprocess vs Celery, RQ, dramatiq, huey, arq and a floor, on a local redis-server.
bench-queues: setup
	$(PY) bench/queues/run.py --append BENCHMARKS.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info
