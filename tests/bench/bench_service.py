"""Benchmark of the daemon's service path, in one run on the same data.

1. Service overhead: LookupPooled through gRPC (a real embtierd process, Unix
   socket, the embtier client) against the same pooling done by the
   in-process store (the native kernel plus its Python wrapper), 8 tables x
   512 bags x pooling factor 32, dim 64 float32.
2. PIFS vs Pond: LookupPooled (the daemon gathers and pools next to the data,
   only pooled vectors travel) against Lookup of the raw rows with pooling
   in the client (np.add.reduceat), for pooling factors 1, 8, 32, 128, with
   512 bags x 8 tables x dim 64: latency p50 / p99 and bytes on the wire.

The host is shared and noisy, so the compared calls are interleaved
repetition by repetition and ratios are medians of per-repetition ratios.
Each section (and each pooling factor of 2) prints its figures as soon as
it has measured them; one that fails is reported and the next one runs.

Run from the repository root:  .venv/bin/python -m tests.bench.bench_service [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from embtier import Client
from embtier_tools.loadgen import ZipfIds
from embtierd import config
from embtierd.store.catalog import Store

from tests.bench.bench_kernels import Sections
from tests.support import start_daemon

TABLES = 8
BAGS = 512
DIM = 64
POOLING_FACTORS = (1, 8, 32, 128)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def requests_for(tables: dict[str, int], pooling_factor: int, count: int, seed: int) -> list[dict]:
    gens = {t: ZipfIds(n, 1.05, i) for i, (t, n) in enumerate(tables.items())}
    rng = np.random.default_rng(seed)
    lengths = np.full(BAGS, pooling_factor, dtype=np.int32)
    return [{t: (g.draw(rng, BAGS * pooling_factor), lengths) for t, g in gens.items()} for _ in range(count)]


def raw_then_pool(client: Client, features: dict) -> dict[str, np.ndarray]:
    """The Pond baseline: pull every row to the host, pool there."""
    out = {}
    for table, (ids, lengths) in features.items():
        rows = client.lookup(table, ids)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out[table] = np.add.reduceat(rows, starts, axis=0)
    return out


def wire_bytes(features: dict, pooled: bool) -> tuple[int, int]:
    """(request, response) bytes of array payload for one request (the client sends ids as int32 when they fit)."""
    id_bytes = sum(f[0].size * (4 if f[0].max() < 2**31 else 8) for f in features.values())
    ids = sum(f[0].size for f in features.values())
    bags = sum(f[1].size for f in features.values())
    if pooled:
        return id_bytes + bags * 4, bags * DIM * 4
    return id_bytes, ids * DIM * 4


def pct(values, q):
    return float(np.percentile(values, q) * 1e3)


def service_overhead(client: Client, store: Store, tables: dict[str, int], reps: int) -> None:
    """Section 1: LookupPooled through gRPC against the in-process store, at pooling factor 32."""
    reqs = requests_for(tables, 32, reps, seed=1)
    for f in reqs[:2]:
        client.lookup_pooled(f)
    grpc_t, local_t, ratios = [], [], []
    for f in reqs:
        a = timed(lambda f=f: client.lookup_pooled(f))
        b = timed(lambda f=f: [store.lookup_pooled(t, ids, lengths) for t, (ids, lengths) in f.items()])
        grpc_t.append(a)
        local_t.append(b)
        ratios.append(a / b)
    got = client.lookup_pooled(reqs[0])
    want = {t: store.lookup_pooled(t, ids, lengths) for t, (ids, lengths) in reqs[0].items()}
    assert all(np.allclose(got[t], want[t], rtol=1e-5, atol=1e-6) for t in tables), "results differ"
    print("\n1. service overhead, pooling factor 32 (131072 ids, 8 tables per request)")
    print(f"   in-process store.lookup_pooled x 8 : p50 {pct(local_t, 50):8.2f} ms")
    print(f"   LookupPooled through gRPC          : p50 {pct(grpc_t, 50):8.2f} ms")
    print(f"   overhead ratio gRPC / in-process   : {statistics.median(ratios):.2f} "
          f"(q25 {np.quantile(ratios, .25):.2f}, q75 {np.quantile(ratios, .75):.2f}); target <= 3", flush=True)


def pooled_vs_raw(client: Client, tables: dict[str, int], reps: int, pf: int) -> None:
    """One line of section 2: pooled (PIFS-style) vs raw rows + host pooling (Pond-style) at pooling factor pf."""
    reqs = requests_for(tables, pf, reps, seed=pf)
    check = raw_then_pool(client, reqs[0])
    pooled0 = client.lookup_pooled(reqs[0])
    assert all(np.allclose(check[t], pooled0[t], rtol=1e-4, atol=1e-5) for t in tables), "modes differ"
    pooled_t, raw_t, speedups = [], [], []
    for i, f in enumerate(reqs):
        order = (lambda f=f: client.lookup_pooled(f), lambda f=f: raw_then_pool(client, f))
        if i % 2:
            order = order[::-1]
        first, second = timed(order[0]), timed(order[1])
        a, b = (first, second) if i % 2 == 0 else (second, first)
        pooled_t.append(a)
        raw_t.append(b)
        speedups.append(b / a)
    pq, pr = wire_bytes(reqs[0], True)
    rq, rr = wire_bytes(reqs[0], False)
    print(f"   {pf:>4} {pct(pooled_t, 50):8.2f} ms {pct(pooled_t, 99):6.2f} ms {pct(raw_t, 50):7.2f} ms "
          f"{pct(raw_t, 99):6.2f} ms {statistics.median(speedups):12.2f}x "
          f"{(pq + pr) / 2**20:11.2f} MiB {(rq + rr) / 2**20:9.2f} MiB {(rq + rr) / (pq + pr):10.1f}x", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    rows = 100_000 if args.quick else 500_000
    reps = 8 if args.quick else 30
    tables = {f"t{i}": rows for i in range(TABLES)}
    sections = Sections()
    state = Path(tempfile.mkdtemp(prefix="embtier-bench-svc-", dir=args.dir))
    daemon = start_daemon(state / "daemon", "--dram-bytes", "3G", "--cxl-bytes", "0", "--scm-bytes", "64M")
    store = Store(config.load(overrides={"state_dir": str(state / "inproc"), "tiers": {
        "dram": {"capacity": "3G"}, "cxl": {"capacity": "0"}, "scm": {"capacity": "64M"}}}))
    try:
        with Client(daemon.target, timeout=300) as client:
            for i, t in enumerate(tables):
                client.create_table(t, rows, DIM, initializer="uniform", seed=i)
                store.create_table(t, rows, DIM, initializer="uniform", seed=i)
            print(f"embtier service benchmark{' (quick)' if args.quick else ''}: {TABLES} tables x {rows} rows x "
                  f"dim {DIM} float32 in DRAM, {BAGS} bags per table, Zipf(1.05) ids, {reps} interleaved reps, "
                  f"daemon on a Unix socket, one client", flush=True)
            sections.run("1. service overhead", service_overhead, client, store, tables, reps)
            print("\n2. LookupPooled vs Lookup + pooling in the client")
            print(f"   {'PF':>4} {'pooled p50':>11} {'p99':>9} {'raw p50':>10} {'p99':>9} {'speed-up p50':>13} "
                  f"{'pooled bytes':>14} {'raw bytes':>12} {'bytes ratio':>11}", flush=True)
            for pf in POOLING_FACTORS:
                sections.run(f"2. pooling factor {pf}", pooled_vs_raw, client, tables, reps, pf)
            print("   target at PF 32: pooled >= 3.89x lower latency than raw (PIFS-Rec's gain over Pond)", flush=True)
    finally:
        store.close()
        daemon.stop()
        shutil.rmtree(state, ignore_errors=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
