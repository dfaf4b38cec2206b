# fusediff: `make demo` and `make test` set everything up on a fresh CPU-only machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fusediff-installed
# torch is installed first, pinned, so that a CPU machine takes the CPU wheel and never pulls CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu bench gpu-session wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python examples/demo.py --out out/demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# GPU tier: real shapes, compiled Triton (run on a CUDA machine).
test-gpu:
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench:
	$(PY) benchmarks/run_all.py --out docs/benchmarks

# A short GPU lease: the GPU tier + the target-deciding benchmarks in one budgeted call
# (benchmarks/gpu_session.sh; results under $$OUT). `make wheels` first, here: the GPU machine
# has no package registry and no diffusers.
gpu-session:
	bash benchmarks/gpu_session.sh

wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps -d .whl "diffusers==$$($(BIN)/python -c 'import diffusers; print(diffusers.__version__)')"

clean:
	rm -rf $(VENV) out .pytest_cache
