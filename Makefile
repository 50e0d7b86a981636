# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TPROCESS := $(CURDIR)/$(VENV)/bin/tprocess
STAMP := $(VENV)/.installed

.PHONY: setup test-deps demo test lint bench bench-queues soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	bash examples/seed/demo.sh $(TPROCESS)

# the queue tests run a real redis-server: Debian's package, installed when missing
test-deps:
	bash tests/ensure_redis.sh

test: setup test-deps lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests examples bench
	$(PY) -m compileall -q src tests examples bench

soak: setup test-deps
	$(PY) -m pytest -q --soak -m soak

bench: setup
	$(PY) bench/run.py --out BENCHMARKS.md
	$(PY) bench/ops.py --append BENCHMARKS.md

# Work queues (issue 7): tprocess vs Celery, RQ, dramatiq, huey, arq and a floor, on a local redis-server.
bench-queues: setup
	$(PY) bench/queues/run.py --append BENCHMARKS.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info
