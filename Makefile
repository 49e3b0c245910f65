# Two entry points for a fresh machine: `make demo` (the embedded scaling experiment) and
# `make test`. Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned here (not in pyproject) so this machine takes its local CPU build;
	# it is installed in the same command as deepspeed so pip never resolves a CUDA torch.
	$(PY) -m pip install -q "torch==2.13.0" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	BIN=$(VENV)/bin scripts/experiment.sh sweeps/tiny.yaml

# The Slurm tests need the local single-node Slurm: started here (idempotent) where we can
# (root on Debian); elsewhere they fail with a message saying how to start it.
test: install
	$(VENV)/bin/ruff check polar_scaling analysis tests benchmarks
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then bash slurm/local/start.sh; fi
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check polar_scaling analysis tests benchmarks

clean:
	rm -rf $(VENV) .cache runs
