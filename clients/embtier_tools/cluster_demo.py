"""`make demo-cluster`: etcd and three embtierd hosts (each in its own network namespace when run
as root, else on loopback ports), four tables placed by the cost-model planner (the hot one
row-wise with two replicas of each shard), a Zipf load of pooled lookups and writes through
ClusterClient, and half-way one daemon killed: every second it prints throughput, latency and
errors, and the live daemons, so that the failover shows (requests keep succeeding; writes
wait for the dead daemon's lease to expire)."""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
from embtier.client import EmbtierClientError
from embtier.cluster.client import ClusterClient
from embtier.cluster.placement import apply_plan

from embtier_tools.cluster_bed import ClusterBed
from embtier_tools.loadgen import ZipfIds
from embtier_tools.planner import TableSpec, plan

LEASE_SECONDS = 2
TABLES = (  # name, rows, dim, pooling factor, requests/s, replicas
    ("ads", 400_000, 64, 32, 200.0, 2),
    ("users", 200_000, 32, 8, 200.0, 1),
    ("items", 100_000, 64, 4, 100.0, 1),
    ("geo", 1_000, 16, 1, 100.0, 1),
)


def start_daemons(bed: ClusterBed, cluster: str) -> None:
    config = bed.base_dir / "cluster.toml"
    config.write_text(f"[cluster]\nlease_seconds = {LEASE_SECONDS}\n[tiering]\ninterval_seconds = 1.0\n")
    for i in range(3):
        bed.start_daemon(i, extra_args=("--dram-bytes", "256M", "--cxl-bytes", "64M", "--scm-bytes", "1G",
                                        "--config", str(config), "--cluster", f"{cluster}@{bed.etcd_endpoint(i)}",
                                        "--node-id", f"n{i}", "--advertise", bed.target(i)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embtier_tools.cluster_demo", description=__doc__)
    p.add_argument("--state-dir", default=".state/demo-cluster")
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    base = Path(args.state_dir).resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    cluster = "demo"
    with ClusterBed(3, "emdemo", base) as bed:
        print(f"etcd at {bed.etcd.endpoint()}; three daemons ({bed.mode}: "
              f"{', '.join(bed.target(i) for i in range(3))}), lease {LEASE_SECONDS} s")
        start_daemons(bed, cluster)
        client = ClusterClient(f"{cluster}@{bed.etcd.endpoint()}")
        while len(client.nodes()) < 3:
            time.sleep(0.1)
            client.refresh()
        zipf = {name: ZipfIds(rows, 1.05, seed=len(name)) for name, rows, *_ in TABLES}
        trace_rng = np.random.default_rng(1)
        specs = [TableSpec(name, rows, dim, pooling_factor=pf, requests_per_second=rps, replicas=reps,
                           trace=zipf[name].draw(trace_rng, 200_000))
                 for name, rows, dim, pf, rps, reps in TABLES]
        target, report = plan(specs, client.nodes(), None, cluster)
        print(report.text())
        apply_plan(client, target)
        rng = np.random.default_rng(0)
        for name, rows, dim, *_ in TABLES:
            for lo in range(0, rows, 65536):
                n = min(65536, rows - lo)
                client.write_rows(name, np.arange(lo, lo + n), rng.standard_normal((n, dim)).astype(np.float32))
        print(f"tables written; load for {args.seconds:g} s, daemon n1 killed at {args.seconds / 2:g} s\n")
        return run_load(bed, client, zipf, args.seconds)


def run_load(bed: ClusterBed, client: ClusterClient, zipf: dict[str, ZipfIds], seconds: float) -> int:
    stop = threading.Event()
    lock = threading.Lock()
    stats = {"ok": 0, "failed": 0, "writes": 0, "latencies": []}

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            feats = {name: (zipf[name].draw(rng, 128 * pf), np.full(128, pf, np.int32))
                     for name, _, _, pf, _, _ in TABLES}
            start = time.monotonic()
            try:
                client.lookup_pooled(feats)
                ok = True
            except EmbtierClientError as e:
                ok = False
                print(f"  request failed: {e}")
            with lock:
                stats["ok" if ok else "failed"] += 1
                stats["latencies"].append(time.monotonic() - start)

    def writer() -> None:
        rng = np.random.default_rng(9)
        while not stop.is_set():
            ids = rng.integers(0, TABLES[0][1], 64)
            try:
                client.write_rows("ads", ids, rng.standard_normal((64, TABLES[0][2])).astype(np.float32))
                with lock:
                    stats["writes"] += 1
            except EmbtierClientError as e:
                print(f"  write failed: {e}")

    threads = [threading.Thread(target=reader, args=(s,)) for s in (1, 2)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    print(f"{'time':>6} {'req/s':>7} {'p50':>8} {'p99':>8} {'failed':>7} {'writes/s':>9}  live daemons")
    killed = False
    begin = time.monotonic()
    total_ok = total_failed = 0
    while time.monotonic() - begin < seconds:
        time.sleep(1.0)
        with lock:
            lat, ok, failed, writes = stats["latencies"], stats["ok"], stats["failed"], stats["writes"]
            stats.update(ok=0, failed=0, writes=0, latencies=[])
        total_ok += ok
        total_failed += failed
        p50, p99 = (np.percentile(lat, [50, 99]) * 1e3) if lat else (0.0, 0.0)
        print(f"{time.monotonic() - begin:5.0f}s {ok:7d} {p50:6.1f}ms {p99:6.1f}ms {failed:7d} {writes:9d}  "
              f"{', '.join(sorted(client.nodes()))}")
        if not killed and time.monotonic() - begin >= seconds / 2:
            bed.kill(1)
            killed = True
            print("--- daemon n1 killed (SIGKILL): its shards are served by their other replicas ---")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    print(f"\nsummary: {total_ok} pooled requests, {total_failed} failed; the daemons live at the end: "
          f"{', '.join(sorted(client.nodes()))}")
    client.close()
    return 0 if total_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
