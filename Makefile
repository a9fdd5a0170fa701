# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO_DIR ?= demo_out
# pytest workers: 2 cores on CI; override with `make test PYTEST_WORKERS=1`.
PYTEST_WORKERS ?= 2

.PHONY: demo test lint format sample clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(TEST_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@ $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m tiktalk_jax.main --mode=demo --workdir=$(DEMO_DIR)

test: $(TEST_STAMP) lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(TEST_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
