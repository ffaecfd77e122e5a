# `make test` and `make bench` set themselves up on a fresh machine: they create .venv when it
# is missing and install the project with its test and plotting dependencies, then run.
# `make test PYTHON=python3` runs against an environment that already has torch and triton
# (GPU machines often have no package registry) and installs nothing.
VENV ?= .venv
# The CPU build of torch lies on the development machines' disk; a GPU machine brings its own.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton>=3.6
PYTEST_ARGS ?=
BENCH_ARGS ?= --quick

ifeq ($(origin PYTHON), command line)
PY := $(PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
endif

.PHONY: test bench kernel-report check-installed clean

$(VENV)/.installed: setup.py Makefile
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	# No build isolation: setup.py must see the torch installed above to decide on the CUDA
	# extension.
	$(VENV)/bin/python -m pip install -q --no-build-isolation -e '.[test,plot]'
	touch $@

# With PYTHON=..., the package must already be installed in that environment.
check-installed:
	@$(PY) -c "import adapterops.kernels" 2>/dev/null || { echo "adapterops is not installed for $(PY): run '$(PY) -m pip install --no-deps --no-build-isolation -e .' once" >&2; exit 1; }

test: $(SETUP) check-installed
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: $(SETUP) check-installed
	$(PY) -m benchmarks $(BENCH_ARGS)

kernel-report: $(SETUP) check-installed
	$(PY) -m benchmarks.kernel_report --arch sm_90

clean:
	rm -rf $(VENV) build *.egg-info
