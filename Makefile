# embtier: `make test` builds everything into .venv and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.embtier-installed
NATIVE := $(wildcard native/include/*.h native/src/*.c native/src/*.h) native/build_ffi.py

.PHONY: build test demo demo-cluster bench stateful soak fuzz clean

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "embtier needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Installs the package (editable) with its test extra; cffi compiles the kernels into embtierd/_native.
$(STAMP): $(PY) pyproject.toml setup.py $(NATIVE) $(wildcard proto/embtier/v1/*.proto)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

build: $(STAMP)

# pytest exits 5 when it collects no test: report it instead of failing the build.  TEST_WORKERS pytest-xdist
# workers share the run, each test file whole on one (tests/conftest.py); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: build
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# The main job: the daemon on its embedded default configuration serving a demo workload (about a minute).
demo: build
	$(PY) -m embtier_tools.demo --state-dir $(CURDIR)/.state/demo

# Several hosts as one store: etcd and three daemons (network namespaces as root, else loopback ports), tables
# placed by the cost model, a Zipf load, one daemon killed half-way (about a minute; needs etcd: apt-get install
# etcd-server).
demo-cluster: build
	@command -v etcd >/dev/null || { echo "make demo-cluster needs etcd (apt-get install etcd-server)"; exit 1; }
	$(PY) -m embtier_tools.cluster_demo --state-dir $(CURDIR)/.state/demo-cluster

# The durability property test of `make test`, with many more examples (EXAMPLES=n; about 5 s each).
EXAMPLES ?= 300
stateful: build
	EMBTIER_STATEFUL_EXAMPLES=$(EXAMPLES) $(PY) -m pytest -q tests/e2e/test_durability_model.py

# The soak run of tests/soak/soak.py for SOAK_SECONDS (an hour by default; `make test` runs 3 minutes of it):
# its samples in .state/soak/samples.csv and their plot in .state/soak/samples.png, drawn even when a bound
# fails; matplotlib is only needed here.
SOAK_SECONDS ?= 3600
soak: build
	$(PY) -m pip install -q matplotlib
	@mkdir -p $(CURDIR)/.state/soak
	rc=0; \
	$(PY) -m tests.soak.soak --duration $(SOAK_SECONDS) --samples $(CURDIR)/.state/soak/samples.csv || rc=1; \
	$(PY) -m tests.soak.plot $(CURDIR)/.state/soak/samples.csv $(CURDIR)/.state/soak/samples.png || rc=1; \
	exit $$rc

# The atheris harnesses of tests/fuzz/ (every RPC in process; the C kernels through native.py), FUZZ_SECONDS each
# (`make test` runs them briefly); corpus and any crash input in a temporary directory that the run names.
FUZZ_SECONDS ?= 600
fuzz: build
	@work=$$(mktemp -d -t embtier-fuzz.XXXXXX); rc=0; \
	for harness in rpc_harness native_harness; do \
		mkdir -p $$work/$$harness/corpus; \
		echo "make fuzz: $$harness for $(FUZZ_SECONDS) s in $$work/$$harness"; \
		$(PY) -m tests.fuzz.$$harness -max_total_time=$(FUZZ_SECONDS) -timeout=60 -rss_limit_mb=4096 \
			-artifact_prefix=$$work/$$harness/ $$work/$$harness/corpus || rc=1; \
	done; \
	if [ $$rc -ne 0 ]; then echo "make fuzz: a harness found something: its input is in $$work"; fi; exit $$rc

# Benchmarks are not part of the tests; torch, fio, etcd and Redis are only needed here (torch: the CPU build on
# this disk; fio: the kernel benchmark's SCM comparison; etcd: the cluster benchmark; redis-server with the
# redis and hiredis packages: the Redis comparison). The system packages are installed with apt-get as .ci/run
# installs packages; as non-root, or if apt-get fails, the benchmark that needs one says so. Every benchmark
# runs, even after one fails; the target fails at the end if any did.
bench: build
	$(PY) -m pip install -q torch==2.13.0 redis hiredis
	@if ! command -v fio >/dev/null; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "make bench: fio is not installed and installing it needs root: the kernel benchmark skips its fio comparison"; \
		elif ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; }; then \
			echo "make bench: apt-get could not install fio: the kernel benchmark skips its fio comparison"; \
		fi; \
	fi
	@if ! command -v redis-server >/dev/null; then \
		if [ "$$(id -u)" -ne 0 ] || ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }; then \
			echo "make bench: redis-server is not installed (apt-get install redis-server, as root): the Redis comparison is skipped"; \
		fi; \
	fi
	@if ! command -v etcd >/dev/null; then \
		if [ "$$(id -u)" -ne 0 ] || ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server; }; then \
			echo "make bench: etcd is not installed (apt-get install etcd-server, as root): the cluster benchmark will fail"; \
		fi; \
	fi
	rc=0; \
	$(PY) tests/bench/bench_kernels.py || rc=1; \
	$(PY) tests/bench/bench_keyed.py || rc=1; \
	$(PY) tests/bench/bench_mapping_build.py || rc=1; \
	$(PY) tests/bench/bench_mapping.py || rc=1; \
	$(PY) -m tests.bench.bench_service || rc=1; \
	$(PY) -m tests.bench.bench_checkpoint --only wal || rc=1; \
	$(PY) tests/bench/bench_throughput.py || rc=1; \
	$(PY) tests/bench/bench_redis.py || rc=1; \
	$(PY) -m tests.bench.bench_tiering || rc=1; \
	$(PY) tests/bench/bench_realtime.py || rc=1; \
	$(PY) tests/bench/bench_torch.py || rc=1; \
	$(PY) tests/bench/bench_cluster.py || rc=1; \
	exit $$rc

clean:
	rm -rf build *.egg-info daemon/embtierd/_native.* $(VENV)
