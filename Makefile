# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first.
# A torch that is already installed (a CUDA build, say) is kept: the venv sees the system packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RECIPE ?= cpu

.PHONY: setup run test bench reliability interop clean

$(VENV)/.done: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.done

run: setup
	$(PY) -m nanoseek run --recipe $(RECIPE)

test: setup
	$(PY) -m ruff check nanoseek tests
	$(PY) -m pytest tests -n auto --maxprocesses 4 --dist worksteal

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m nanoseek bench train --peer transformers
	$(PY) -m nanoseek bench decode --peer transformers --size 6
	@echo "bench grpo needs an SFT checkpoint: nanoseek bench grpo --ckpt runs/cpu/sft/final (after make run)"

clean:
	rm -rf $(VENV) runs

# The full fault, load and fuzz suite (about 10 minutes on 2 cores); `make test` runs a fast subset.
reliability: setup
	NANOSEEK_FAULTS=7 $(PY) -m pytest tests/test_reliability.py tests/test_checkpoint.py -q
	$(PY) benchmarks/load_test.py --clients 64 --requests 2 --max-tokens 32
	$(PY) benchmarks/fuzz_api.py --max-examples 25

# GGUF files against real llama.cpp: the recipe's checkpoint (trained first if missing) and random ones, compared
# on tokenization and greedy tokens. The first time builds llama-cpp-python from source (10-15 minutes on 2 cores).
interop: setup
	$(PY) -m pip install -q -e ".[interop]"
	test -d runs/$(RECIPE)/rl/final || $(PY) -m nanoseek run --recipe $(RECIPE)
	$(PY) benchmarks/interop.py --ckpt runs/$(RECIPE)/rl/final
