"""Benchmark of the daemon's service path, in one run on the same data.

1. Service overhead: LookupPooled through gRPC (a real embtierd process, Unix
   socket, the embtier client) against the same pooling done by the
   in-process store (the native kernel plus its Python wrapper), 8 tables x
   512 bags x pooling factor 32, dim 64 float32: with ids and pooled values
   on the wire, and through same-host shared memory (the daemon runs with
   --shared-memory; the wire client is told not to use it).
2. PIFS vs Pond: LookupPooled (the daemon gathers and pools next to the data,
   only pooled vectors travel) against Lookup of the raw rows pooled in the
   client, for pooling factors 1, 8, 32, 128, with 512 bags x 8 tables x dim
   64: latency p50 / p99 and bytes on the wire.  The raw baseline three ways:
   pooled with np.add.reduceat (how this benchmark pooled before: ~13x
   slower than a reshape-and-sum, so it flattered the pooled path), pooled
   with the fastest thing the host has (torch's embedding_bag, FBGEMM's
   kernel, when torch is installed, as `make bench` does; else a
   reshape-and-sum of the equal-length bags), and with distinct rows
   (Lookup.distinct: each distinct id's row travels once with an index, and
   embedding_bag pools by the index).

The host is shared and noisy, so the compared calls are interleaved
repetition by repetition and ratios are medians of per-repetition ratios.
Each section (and each pooling factor of 2) prints its figures as soon as
it has measured them; one that fails is reported and the next one runs.

Run from the repository root:  .venv/bin/python -m tests.bench.bench_service [--quick]
"""

from __future__ import annotations

import argparse
import shutil
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
    """The Pond baseline as this benchmark first measured it: every row to the host, np.add.reduceat there."""
    out = {}
    for table, (ids, lengths) in features.items():
        rows = client.lookup(table, ids)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out[table] = np.add.reduceat(rows, starts, axis=0)
    return out


try:
    import warnings

    import torch
    import torch.nn.functional as torch_f
    # the received rows are read-only numpy views of the reply; embedding_bag only reads them
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
except ImportError:  # (make bench installs it)
    torch = None


def host_pool(rows: np.ndarray, index: np.ndarray | None, lengths: np.ndarray) -> np.ndarray:
    """The fastest pooling the host has: torch's embedding_bag (sum) of rows by index (None: in order),
    or without torch a reshape-and-sum (every bag here has the same length)."""
    if torch is None:
        picked = rows if index is None else rows[index]
        return picked.reshape(lengths.size, -1, rows.shape[1]).sum(axis=1)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
    idx = torch.arange(rows.shape[0]) if index is None else torch.from_numpy(index.astype(np.int64))
    return torch_f.embedding_bag(idx, torch.from_numpy(rows), offsets, mode="sum").numpy()


def raw_fast(client: Client, features: dict) -> dict[str, np.ndarray]:
    """The Pond baseline at its best without deduplication: every row to the host, the fastest pooling there."""
    return {table: host_pool(client.lookup(table, ids), None, lengths) for table, (ids, lengths) in features.items()}


def raw_distinct(client: Client, features: dict) -> dict[str, np.ndarray]:
    """The Pond baseline deduplicated, as the pooled path is: each distinct row travels once."""
    out = {}
    for table, (ids, lengths) in features.items():
        rows, index = client.lookup_distinct(table, ids)
        out[table] = host_pool(rows, index, lengths)
    return out


def wire_bytes(features: dict, pooled: bool, distinct: bool = False) -> tuple[int, int]:
    """(request, response) bytes of array payload for one request (the client sends ids as int32 when they fit)."""
    id_bytes = sum(f[0].size * (4 if f[0].max() < 2**31 else 8) for f in features.values())
    ids = sum(f[0].size for f in features.values())
    bags = sum(f[1].size for f in features.values())
    if pooled:
        return id_bytes + bags * 4, bags * DIM * 4
    if distinct:
        return id_bytes, sum(np.unique(f[0]).size for f in features.values()) * DIM * 4 + ids * 4
    return id_bytes, ids * DIM * 4


def pct(values, q):
    return float(np.percentile(values, q) * 1e3)


def service_overhead(client: Client, shared: Client, store: Store, tables: dict[str, int], reps: int) -> None:
    """Section 1: LookupPooled through gRPC (on the wire, and through shared memory) against the in-process
    store, at pooling factor 32, the three interleaved in an order rotated each repetition."""
    if shared.shared_memory is None:
        raise RuntimeError("the shared-memory client found no side socket: is the daemon's shared memory on?")
    reqs = requests_for(tables, 32, reps, seed=1)
    for f in reqs[:2]:
        client.lookup_pooled(f)
        shared.lookup_pooled(f)
    paths = [("wire", client.lookup_pooled), ("shm", shared.lookup_pooled),
             ("local", lambda f: [store.lookup_pooled(t, ids, lengths) for t, (ids, lengths) in f.items()])]
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    for i, f in enumerate(reqs):
        for k in range(len(paths)):
            name, fn = paths[(i + k) % len(paths)]
            times[name].append(timed(lambda fn=fn, f=f: fn(f)))
    want = {t: store.lookup_pooled(t, ids, lengths) for t, (ids, lengths) in reqs[0].items()}
    for got in (client.lookup_pooled(reqs[0]), shared.lookup_pooled(reqs[0])):
        assert all(np.allclose(got[t], want[t], rtol=1e-5, atol=1e-6) for t in tables), "results differ"
    local = np.array(times["local"])
    print("\n1. service overhead, pooling factor 32 (131072 ids, 8 tables per request)")
    print(f"   in-process store.lookup_pooled x 8     : p50 {pct(local, 50):8.2f} ms")
    for name, label, target in (("wire", "LookupPooled through gRPC, on the wire", "3"),
                                ("shm", "LookupPooled, shared memory", "1.2")):
        ratios = np.array(times[name]) / local
        print(f"   {label:<39}: p50 {pct(times[name], 50):8.2f} ms   / in-process {np.median(ratios):.2f} "
              f"(q25 {np.quantile(ratios, .25):.2f}, q75 {np.quantile(ratios, .75):.2f}); target <= {target}",
              flush=True)


RAW_WAYS = (("reduceat", raw_then_pool), ("fast", raw_fast), ("distinct", raw_distinct))


def pooled_vs_raw(client: Client, tables: dict[str, int], reps: int, pf: int) -> None:
    """One line of section 2: pooled (PIFS-style) vs raw rows + host pooling (Pond-style) three ways, at
    pooling factor pf, the four interleaved in an order rotated each repetition."""
    reqs = requests_for(tables, pf, reps, seed=pf)
    pooled0 = client.lookup_pooled(reqs[0])
    for name, way in RAW_WAYS:
        check = way(client, reqs[0])
        assert all(np.allclose(check[t], pooled0[t], rtol=1e-4, atol=1e-4) for t in tables), f"{name} differs"
    paths = [("pooled", client.lookup_pooled), *((name, lambda f, w=way: w(client, f)) for name, way in RAW_WAYS)]
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    for i, f in enumerate(reqs):
        for k in range(len(paths)):
            name, fn = paths[(i + k) % len(paths)]
            times[name].append(timed(lambda fn=fn, f=f: fn(f)))
    pooled = np.array(times["pooled"])
    gain = {name: float(np.median(np.array(times[name]) / pooled)) for name, _ in RAW_WAYS}
    pq, pr = wire_bytes(reqs[0], True)
    rq, rr = wire_bytes(reqs[0], False)
    dq, dr = wire_bytes(reqs[0], False, distinct=True)
    print(f"   {pf:>4} {pct(pooled, 50):8.2f} ms {pct(times['reduceat'], 50):9.2f} ms {pct(times['fast'], 50):8.2f} ms "
          f"{pct(times['distinct'], 50):9.2f} ms {gain['reduceat']:9.2f}x {gain['fast']:7.2f}x {gain['distinct']:9.2f}x "
          f"{(pq + pr) / 2**20:9.2f} {(rq + rr) / 2**20:9.2f} {(dq + dr) / 2**20:9.2f} MiB", flush=True)


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
    daemon = start_daemon(state / "daemon", "--dram-bytes", "3G", "--cxl-bytes", "0", "--scm-bytes", "64M",
                          "--shared-memory")
    store = Store(config.load(overrides={"state_dir": str(state / "inproc"), "tiers": {
        "dram": {"capacity": "3G"}, "cxl": {"capacity": "0"}, "scm": {"capacity": "64M"}}}))
    try:
        with Client(daemon.target, timeout=300, shared_memory=False) as client, \
                Client(daemon.target, timeout=300, shared_memory=True) as shared:
            for i, t in enumerate(tables):
                client.create_table(t, rows, DIM, initializer="uniform", seed=i)
                store.create_table(t, rows, DIM, initializer="uniform", seed=i)
            print(f"embtier service benchmark{' (quick)' if args.quick else ''}: {TABLES} tables x {rows} rows x "
                  f"dim {DIM} float32 in DRAM, {BAGS} bags per table, Zipf(1.05) ids, {reps} interleaved reps, "
                  f"daemon on a Unix socket, one client", flush=True)
            sections.run("1. service overhead", service_overhead, client, shared, store, tables, reps)
            print("\n2. LookupPooled vs Lookup + pooling in the client")
            print(f"   raw pooled by: reduceat (the old baseline), fast ({'torch embedding_bag' if torch else 'reshape-and-sum'}"
                  f"), distinct (Lookup.distinct + the same); gain = raw / pooled latency, median of interleaved reps",
                  flush=True)
            print(f"   {'PF':>4} {'pooled p50':>11} {'reduceat':>12} {'fast':>11} {'distinct':>12} {'gain old':>10} "
                  f"{'fast':>8} {'distinct':>10} {'bytes: pooled':>13} {'raw':>9} {'distinct':>9}", flush=True)
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
