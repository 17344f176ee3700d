# Two entry points, each self-contained on a fresh machine with Python >= 3.10 and pip:
#   make demo   builds a venv, installs everything, runs the parity demo and the two default trainings
#   make test   builds a venv, installs everything the tests need, runs the whole suite (what CI runs)
# CI also runs `make compile-check` (its own venv with the CUDA plugin and libtpu, kept out of the core
# install: compiles every Pallas kernel for H100 and TPU v5e/v6e without either) and `make device-smoke`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: the default `torch` wheel on Linux pulls several GB of CUDA libraries.
# Override on machines with a different index, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2 -q

.PHONY: demo test test-isa lint bench clean compile-check device-smoke wheel-check docs doctest

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[torch,train,dev,notebooks]"
	# timm is a parity reference for SE-ResNets; its torchvision dependency has no CPU wheel here and
	# is never used by the models we compare against, so install timm alone (tests shim torchvision).
	$(PY) -m pip install -q --no-deps "timm==1.0.31"
	touch $@

# The main job: parity of one block per family against PyTorch, then the two default trainings
# (digits classification with an SE-ResNet, A2N x2 super-resolution) with their final metrics.
# The super-resolution run is the `superres` config cut to a demo budget (A2N with 6 instead of 16
# attention blocks, 24-pixel crops, 200 steps: +1.0 dB over bicubic in about 2 minutes on two
# shared CPU cores, against about 11 minutes for the full config); the full recipe stays
# `python -m train --config superres`. Runs resume from $(WORKDIR); delete it to train from scratch.
WORKDIR ?= workdir
DEMO_SUPERRES ?= --override model.kwargs.nb=6 --override data.patch_size=24 --override steps=200 --override eval_every=100
demo: $(VENV)/.installed
	$(PY) -m flax_attn demo
	$(PY) -m train --config classify --workdir $(WORKDIR)/classify
	$(PY) -m train --config superres --workdir $(WORKDIR)/superres $(DEMO_SUPERRES)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) test-isa

# The catalogue parity again on other CPU code paths than this machine's native ones: torch's
# unvectorised ATen kernels, oneDNN limited to SSE4.1 and XLA's CPU backend to SSE4.2. A float32
# tolerance that holds only for one ISA's rounding fails here instead of on a user's machine.
NON_NATIVE_CPU ?= ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 XLA_FLAGS=--xla_cpu_max_isa=SSE4_2
test-isa: $(VENV)/.installed
	$(NON_NATIVE_CPU) $(PY) -m pytest $(PYTEST_ARGS) -m "not slow" tests/test_catalogue_parity.py

# Build the wheel, install it into a fresh venv without torch (only the wheel's own dependencies),
# then, outside the source tree, check LICENSE and py.typed are in it, import every module and run one block.
WHEEL_VENV ?= build/wheel-venv
wheel-check: $(VENV)/.installed
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q dist/flax_attn-*.whl
	cd $(WHEEL_VENV) && bin/python $(CURDIR)/.ci/check_wheel.py $(CURDIR)/dist/flax_attn-*.whl

# The API reference (mkdocs + mkdocstrings, from the docstrings) into build/site; any warning fails.
docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict

# Every `>>>` example in the package's docstrings, run as a doctest.
doctest: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider --doctest-modules flax_attn

# ruff is pinned in the dev extra: the formatter's output may change between releases.
LINT_PATHS ?= flax_attn train tests benchmarks notebooks .ci docs
lint: $(VENV)/.installed
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

# Deviceless compilation for GPU and TPU. The CUDA plugin (several GB, with ptxas) and libtpu go into
# a venv of their own, at the jax version of the core install; no GPU or TPU is needed.
JAX_VERSION ?= $(shell $(PY) -c "import jax; print(jax.__version__)")
COMPILE_VENV ?= .venv-compile
COMPILE_PY := $(COMPILE_VENV)/bin/python
COMPILE_OUT ?= benchmarks/results

$(COMPILE_VENV)/.installed: $(VENV)/.installed pyproject.toml Makefile
	$(PYTHON) -m venv $(COMPILE_VENV)
	$(COMPILE_PY) -m pip install -q --upgrade pip
	$(COMPILE_PY) -m pip install -q "jax[tpu]==$(JAX_VERSION)" "jax[cuda12]==$(JAX_VERSION)" -e .
	touch $@

compile-check: $(COMPILE_VENV)/.installed
	JAX_PLATFORMS=cpu $(COMPILE_PY) benchmarks/compile_check.py --targets h100,v5e,v6e --out $(COMPILE_OUT)

# The one-shot hardware check in its CPU form: tiny shapes, kernels in interpret mode.
device-smoke: $(VENV)/.installed
	$(PY) benchmarks/device_check.py --smoke --out $(or $(SMOKE_OUT),/tmp/flax-attn-device-smoke)

clean:
	rm -rf $(VENV) $(COMPILE_VENV) .pytest_cache
