# Two entry points: `make demo` and `make test`. Both create or reuse .venv and install
# what they need. PYTHON may point at another interpreter (Python >= 3.10).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch that exists on PyPI; pinned so that pip never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Tests, examples and CI read MNIST from this local mirror when it exists.
export MANIFOLD_NETS_MIRROR ?= $(abspath ../shared/data)

.PHONY: demo test lint docs bench clean install

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m manifold_nets.experiments.cli demo

lint: $(STAMP)
	$(PY) -m ruff check .

# The docs build (HTML, nitpicky, warnings as errors; then every doctest) runs before pytest.
test: $(STAMP) lint docs
	$(PY) -m pytest -q

docs: $(STAMP)
	$(PY) -m sphinx -n -W --keep-going -q -b html docs docs/_build/html
	$(PY) -m sphinx -W --keep-going -q -b doctest docs docs/_build/doctest

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .ruff_cache
