# `make test` and `make bench` set themselves up on a fresh machine: they create .venv when it
# is missing and install the project with its test and plotting dependencies, then run.
# `make test PYTHON=python3` runs against an environment that already has torch and triton
# (GPU machines often have no package registry) and installs nothing. `make help` lists the
# targets (the `## ` comment on each target's line).
VENV ?= .venv
# The CPU build of torch lies on the development machines' disk; a GPU machine brings its own.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton>=3.6
# csrc/ is compiled and linked (not run) in CI against the CUDA build of torch, which also lies
# on the development machines' disk, in its own environment (about 5.5 GB).
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
# The slowest tests, so that the suite's time budget (20 minutes on the 2-core CI machine) is watched.
PYTEST_ARGS ?= --durations=30
BENCH_ARGS ?= --quick

ifeq ($(origin PYTHON), command line)
PY := $(PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
# A GPU machine (PYTHON=...) builds the real extension at install or first use instead.
CSRC_CHECK := csrc-check
# ...and may lack ruff (no package registry); lint is about the source, not the machine.
LINT_CHECK := lint
endif

.DEFAULT_GOAL := help
.PHONY: help test quick lint bench kernel-report check-installed csrc-check clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-15s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.py Makefile
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	# No build isolation: setup.py must see the torch installed above to decide on the CUDA
	# extension.
	$(VENV)/bin/python -m pip install -q --no-build-isolation -e '.[test,plot]'
	touch $@

$(CUDA_VENV)/.installed: Makefile
	test -x $(CUDA_VENV)/bin/python || python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)" ninja numpy
	touch $@

# Compiles and links adapterops._C for sm_80 and sm_90, checks its cubins and op schemas.
csrc-check: $(CUDA_VENV)/.installed ## compile and link csrc/ for sm_80 and sm_90 against CUDA torch
	$(CUDA_VENV)/bin/python tests/csrc_build_check.py

# With PYTHON=..., the package must already be installed in that environment.
check-installed:
	@$(PY) -c "import adapterops.kernels" 2>/dev/null || { echo "adapterops is not installed for $(PY): run '$(PY) -m pip install --no-deps --no-build-isolation -e .' once" >&2; exit 1; }

test: $(SETUP) check-installed $(LINT_CHECK) $(CSRC_CHECK) ## what CI runs: lint, the csrc compile check, every test
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Leaves out the tests marked `slow` (pyproject.toml): the multi-process ones, the kernel
# report, the dry GPU run and the wheel build.
quick: $(SETUP) check-installed ## the inner loop: the tests not marked slow, no csrc check, no lint
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

lint: $(SETUP) ## ruff check . (configured in pyproject.toml)
	$(PY) -m ruff check .

bench: $(SETUP) check-installed ## the microbenchmarks (BENCH_ARGS= for the full sweep)
	$(PY) -m benchmarks $(BENCH_ARGS)

kernel-report: $(SETUP) check-installed ## compile every Triton configuration for sm_90, check the SASS
	$(PY) -m benchmarks.kernel_report --arch sm_90

clean: ## remove the virtual environments and build outputs
	rm -rf $(VENV) $(CUDA_VENV) build *.egg-info
