"""Benchmark: the daemon's throughput-latency curve under concurrent pooled requests, against what its
kernels alone pool in the same run.

The request shape of `embtier bench`'s default load at PF 32: LookupPooled of 128 bags x 32 ids,
Zipf(1.05), one 2M x 64 float32 table in DRAM, over the Unix socket.  Concurrency 1, 2, 4, 8 and 16
(client threads of one load generator process on this host: it shares the cores with the daemon,
as an inference server on the same host would).  Printed per concurrency as soon as measured:
requests/s, rows/s, p50 and p99 latency, and rows/s as a share of the in-process kernels' rate
(the store's own lookup_pooled on the same table, 2 kernel threads, one request at a time: what
the daemon could reach with no per-request cost).

Run from the repository root:  .venv/bin/python tests/bench/bench_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from embtier import Client
from embtier_tools.loadgen import LoadGenerator, Workload, ZipfIds
from embtierd import config
from embtierd.store.catalog import Store

from tests.support import start_daemon

ROWS, DIM, BAGS, PF = 2_000_000, 64, 128, 32
CONCURRENCY = (1, 2, 4, 8, 16)


def kernel_rate(store: Store, seconds: float) -> float:
    """Rows/s of the in-process store's lookup_pooled, one request of the same shape at a time."""
    zipf = ZipfIds(ROWS, 1.05, 0)
    rng = np.random.default_rng(1)
    batches = [zipf.draw(rng, BAGS * PF) for _ in range(16)]
    lengths = np.full(BAGS, PF, np.int32)
    rows, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        store.lookup_pooled("t", batches[i % len(batches)], lengths)
        rows += BAGS * PF
        i += 1
    return rows / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    seconds = 2.0 if args.quick else 6.0
    state = Path(tempfile.mkdtemp(prefix="embtier-bench-tput-", dir=args.dir))
    overrides = {"state_dir": str(state / "inproc"), "kernels": {"kernel_threads": 2},
                 "tiers": {"dram": {"capacity": "1G"}, "cxl": {"capacity": "0"}, "scm": {"capacity": "64M"}}}
    store = Store(config.load(overrides=overrides))
    daemon = start_daemon(state / "daemon", "--dram-bytes", "1G", "--cxl-bytes", "0", "--scm-bytes", "64M")
    try:
        store.create_table("t", ROWS, DIM, initializer="uniform", seed=1)
        with Client(daemon.target, timeout=300) as client:
            client.create_table("t", ROWS, DIM, initializer="uniform", seed=1)
        print(f"embtier throughput benchmark{' (quick)' if args.quick else ''}: LookupPooled of {BAGS} bags x {PF} "
              f"ids, Zipf(1.05), {ROWS} x {DIM} float32 in DRAM, Unix socket; {seconds:g} s per concurrency; the "
              f"load generator's threads share the host's cores with the daemon", flush=True)
        baseline = kernel_rate(store, seconds)
        print(f"   in-process kernels (2 threads, one request at a time): {baseline / 1e6:.1f} M rows/s "
              f"= {baseline / (BAGS * PF):.0f} requests/s of this shape", flush=True)
        print(f"   {'clients':>7} {'req/s':>8} {'M rows/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'of kernels':>10} {'errors':>6}",
              flush=True)
        for c in CONCURRENCY:
            load = LoadGenerator(daemon.target, Workload({"t": ROWS}, bags=BAGS, pooling_factor=PF), concurrency=c)
            load.run(min(1.0, seconds / 2))  # warm: connections, first batches
            stats = load.run(seconds)
            print(f"   {c:>7} {stats.requests / seconds:8.0f} {stats.rows / seconds / 1e6:9.2f} "
                  f"{stats.percentile_ms(50):8.2f} {stats.percentile_ms(99):8.2f} "
                  f"{stats.rows / seconds / baseline:10.2f} {stats.errors:>6}", flush=True)
        print("   target: saturated requests/s >= 3x the ~1,400 req/s measured before (the per-request Python cost is "
              "the ceiling)", flush=True)
    finally:
        assert daemon.stop() == 0, daemon.log()
        store.close()
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
