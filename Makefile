# `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench lint docs docs-serve wheel-check clean

install: $(STAMP)

# torch first, pinned to the CPU build this machine has on disk; the package itself declares a range.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,bench,docs,gpu]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) examples/demo.py
	$(PY) -m softtopk.bench --quick

bench: $(STAMP)
	$(PY) -m softtopk.bench --write README.md docs/benchmarks.md

# the documentation site, built strictly: a broken reference or an undocumented parameter fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# the release check: a wheel, installed into a fresh venv, runs the README quickstart and the benchmark CLI from
# outside the checkout
wheel-check: $(STAMP)
	rm -rf build/wheel-venv dist
	$(PY) -m pip wheel --quiet --no-deps -w dist .
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet torch==2.13.0 dist/softtopk-*.whl
	cd build && wheel-venv/bin/python ../.ci/quickstart.py ../README.md
	cd build && wheel-venv/bin/softtopk-bench --quick --tag core --only hard --no-files > /dev/null

lint: $(STAMP)
	$(PY) -m ruff check src tests examples docs .ci
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info .pytest_cache .hypothesis
