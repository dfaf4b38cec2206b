# fusediff: `make demo` and `make test` set everything up on a fresh CPU-only machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fusediff-installed
# The test environment: every package `make test` and CI install, pinned (`make lock` refreshes it).
LOCK := constraints.txt
# torch is installed first, pinned, so that a CPU machine takes the CPU wheel and never pulls CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The kernel tier and the lowering tests: what every leg of the version matrix must pass.
MATRIX_TESTS ?= tests/kernels tests/lowering tests/test_layout.py
# Interpreters for the matrix legs: the GPU image runs Python 3.12; the newest leg takes 3.13.
find_py = $(shell for p in $$(command -v python$(1)) $$HOME/.pyenv/versions/$(1)*/bin/python$(1) /usr/bin/python$(1); do \
	"$$p" -V >/dev/null 2>&1 && echo "$$p" && break; done)
PY312 ?= $(call find_py,3.12)
PY313 ?= $(call find_py,3.13)

.PHONY: setup demo test test-gpu bench gpu-session gpu-session-dry wheels clean lock \
	matrix matrix-locked matrix-gpu-image matrix-newest gpu-image-env

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH_SPEC)" setuptools
	$(BIN)/pip install -q -c $(LOCK) --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python examples/demo.py --out out/demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# Re-resolve the test environment from pyproject.toml's ranges (newest releases that fit, CPU torch),
# write the pins to $(LOCK); then run `make test` and commit both if it passes.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(TORCH_SPEC)" setuptools
	.venv-lock/bin/pip install -q --no-build-isolation -e ".[dev]"
	{ echo "# The pinned test environment of \`make test\` and CI (pip constraints). Refresh: make lock."; \
	  echo "# Resolved $$(date -u +%Y-%m-%d) with $$(.venv-lock/bin/python -V)."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable | grep -v '^pip==' | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); now: rm -f $(STAMP) && make test"

# Version matrix (CPU, Triton interpreted), one target per leg; each leg prints its pytest summary.
matrix: matrix-locked matrix-gpu-image matrix-newest

matrix-locked: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" $(MATRIX_TESTS) $(PYTEST_ARGS)

# The GPU machine's image (requirements/gpu-image.txt): Python 3.12, torch 2.11.0 (the default,
# large wheel: installed once, never in CI), triton 3.6.0, onnx 1.23.1, onnxruntime 1.30.0. fusediff and
# diffusers arrive as on the GPU machine: the wheels of `make wheels`, installed --target a folder on
# PYTHONPATH (the entry point comes from fusediff's wheel, the code from the checkout).
GPU_IMAGE_PY := .venv-gpu-image/bin/python
GPU_IMAGE_SITE := .venv-gpu-image/fusediff-site
gpu-image-env: wheels
	test -x $(GPU_IMAGE_PY) || $(PY312) -m venv .venv-gpu-image
	PIP_CONFIG_FILE=/dev/null $(GPU_IMAGE_PY) -m pip install -q -r requirements/gpu-image.txt
	rm -rf $(GPU_IMAGE_SITE)
	$(GPU_IMAGE_PY) -m pip install -q --no-index --no-deps --target $(GPU_IMAGE_SITE) .whl/*.whl

matrix-gpu-image: gpu-image-env
	PYTHONPATH=$(CURDIR)/$(GPU_IMAGE_SITE) TRITON_INTERPRET=1 $(GPU_IMAGE_PY) -m pytest -q -m "not gpu" -p no:cacheprovider \
		$(MATRIX_TESTS) $(PYTEST_ARGS)

# The newest releases of everything, on Python 3.13 (PIP_CONFIG_FILE=/dev/null: no site-wide pip cap on
# torch for this leg; the default torch wheel is large: installed once, never in CI).
matrix-newest:
	test -x .venv-newest/bin/python || $(PY313) -m venv .venv-newest
	PIP_CONFIG_FILE=/dev/null .venv-newest/bin/pip install -q --upgrade pip torch triton setuptools
	PIP_CONFIG_FILE=/dev/null .venv-newest/bin/pip install -q --upgrade --upgrade-strategy eager --no-build-isolation -e ".[dev]"
	TRITON_INTERPRET=1 .venv-newest/bin/python -m pytest -q -m "not gpu" -p no:cacheprovider $(MATRIX_TESTS) $(PYTEST_ARGS)

# GPU tier: real shapes, compiled Triton (run on a CUDA machine).
test-gpu:
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench:
	$(PY) benchmarks/run_all.py --out docs/benchmarks

# A short GPU lease: the GPU tier + the target-deciding benchmarks in one budgeted call
# (benchmarks/gpu_session.sh; results packed into one tarball under $$OUT). `make wheels` first, here:
# the GPU machine has no package registry and no diffusers.
gpu-session:
	bash benchmarks/gpu_session.sh

# The same script on this CPU machine, in the GPU image's versions, up to the first line that needs
# CUDA (imports, collection, argument parsing): the first GPU call then spends its minutes measuring.
gpu-session-dry: gpu-image-env
	FUSEDIFF_GPU_DRY_RUN=1 PY=$(GPU_IMAGE_PY) OUT=out/gpu-dry bash benchmarks/gpu_session.sh

# What the GPU machine lacks, as wheels in .whl/ (git-ignored; carried by the device call): fusediff
# itself (its entry points) and diffusers at the locked version.
wheels: $(STAMP)
	rm -rf .whl build *.egg-info && mkdir -p .whl
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl .
	$(BIN)/pip download -q --no-deps -d .whl "$$(grep -i '^diffusers==' $(LOCK))"

clean:
	rm -rf $(VENV) out .pytest_cache
