# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first.
# A torch that is already installed (a CUDA build, say) is kept: the venv sees the system packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/default

.PHONY: setup run test lint bench clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.done

run: setup
	$(PY) -m nanoseek init --size 6 --out $(RUN_DIR)/init

test: setup
	$(PY) -m ruff check nanoseek tests
	$(PY) -m pytest tests

bench: setup
	$(PY) -m nanoseek bench train --peer transformers --size 6

clean:
	rm -rf $(VENV) runs
