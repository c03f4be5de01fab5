# The two commands of the README. Each creates/refreshes .venv by itself.
#   make smoke   set up, then run the main job (local smoke run)
#   make test    set up, then run the test suite (what CI runs)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled
export DS_ACCELERATOR ?= cpu

.PHONY: setup smoke test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The synthetic temporal benchmark (one pair of time-reversed classes), then Side4Video on 2 Ray workers with the
# ZeRO-3 partitioned tiny backbone, then the frame-order-invariant linear probe on the same data for contrast.
smoke: setup
	$(BIN)/i2v data synth --out data/synth --classes move_right move_left --train 384 --val 128 --seed 0 --frames 16 --size 64
	rm -rf runs/smoke runs/smoke-linear-probe
	$(BIN)/i2v train configs/smoke.yaml --out runs/smoke
	$(BIN)/i2v train configs/smoke.yaml method.name=linear_probe --out runs/smoke-linear-probe

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check i2v tests benchmarks
	$(BIN)/ruff format --check i2v tests benchmarks

clean:
	rm -rf $(VENV) runs
