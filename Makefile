# One command each, from a clean clone: the venv is made and filled on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test demo bench bench-publish lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,examples,dask]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# 4 flaky prediction servers, the batch client over 100,000 rows, the report (examples/predict).
demo: $(STAMP)
	$(PY) -m examples.predict demo

# The bench extra (uvloop, aiometer, matplotlib) on top of the usual set-up, with its own stamp.
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,examples,bench]'
	rm -f $(VENV)/.bench-installed-*
	touch $(BENCH_STAMP)

# A plain run writes only to benchmarks/results/local/ (ignored by git): the clone stays clean.
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks

# The explicit step: the tracked results and README.md's two benchmark tables (the instruction
# counts need valgrind; without it that part says so and is skipped).
bench-publish: $(BENCH_STAMP)
	$(PY) -m benchmarks --publish
	$(PY) -m benchmarks --instructions --publish

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
