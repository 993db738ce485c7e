# embtier: `make test` builds everything into .venv and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.embtier-installed
NATIVE := $(wildcard native/include/*.h native/src/*.c native/src/*.h) native/build_ffi.py

.PHONY: build test demo bench stateful clean

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "embtier needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Installs the package (editable) with its test extra; cffi compiles the kernels into embtierd/_native.
$(STAMP): $(PY) pyproject.toml setup.py $(NATIVE) $(wildcard proto/embtier/v1/*.proto)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

build: $(STAMP)

# pytest exits 5 when it collects no test: report it instead of failing the build.
test: build
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The main job: the daemon on its embedded default configuration serving a demo workload (about a minute).
demo: build
	$(PY) -m embtier_tools.demo --state-dir $(CURDIR)/.state/demo

# The durability property test of `make test`, with many more examples (EXAMPLES=n; about 5 s each).
EXAMPLES ?= 300
stateful: build
	EMBTIER_STATEFUL_EXAMPLES=$(EXAMPLES) $(PY) -m pytest -q tests/e2e/test_durability_model.py

# Benchmarks are not part of the tests; torch is only needed here (the CPU build on this disk).
bench: build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) tests/bench/bench_kernels.py
	$(PY) -m tests.bench.bench_service
	$(PY) -m tests.bench.bench_tiering

clean:
	rm -rf build *.egg-info daemon/embtierd/_native.* $(VENV)
