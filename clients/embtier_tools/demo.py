"""The demo behind `make demo`: a real embtierd on its embedded default
configuration (with small DRAM and CXL tiers, so that the demo tables do not
fit in memory), demo tables, and a Zipf workload through the client with a
live display; then a summary and a clean stop.

    python -m embtier_tools.demo [--state-dir DIR] [--duration SECONDS] [--dram-bytes SIZE] [--metrics-listen HOST:PORT]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
from embtier.client import Client
from embtier.wire import MEMORY_TIERS, TIERS
from prometheus_client.parser import text_string_to_metric_families

from .daemon import Daemon, free_port, start
from .loadgen import LoadGenerator, Stats, Workload

TABLES = {"user_ids": 1_000_000, "item_ids": 1_000_000, "context": 500_000}
DIM = 64
ROW_BYTES = DIM * 4
DRAM_BYTES = "160M"
OTHER_TIER_FLAGS = ["--cxl-bytes", "160M", "--scm-bytes", "2G"]
# Each table's own share of DRAM and CXL (SetPolicy limits): without them the first table created takes it all.
SHARES = {"user_ids": 0.4, "item_ids": 0.4, "context": 0.2}
ALPHA = 1.05


def start_daemon(state_dir: Path, metrics: str, tier_flags: list[str], cxl_latency_ns: int = 0) -> Daemon:
    """embtierd on its embedded default configuration (plus, when cxl_latency_ns > 0, a file that
    injects that latency per row served from the emulated CXL tier)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    for kept in ("wal", "checkpoints"):  # each demo starts from no tables, not from the last run's
        shutil.rmtree(state_dir / kept, ignore_errors=True)
    extra = []
    if cxl_latency_ns:
        (state_dir / "demo.toml").write_text(f"[tiers.cxl]\nemulated_latency_ns = {cxl_latency_ns}\n")
        extra = ["--config", str(state_dir / "demo.toml")]
    try:
        return start(state_dir, [f"unix://{state_dir / 'embtierd.sock'}"], metrics, *tier_flags, *extra)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def scrape(metrics: str) -> dict[str, float]:
    """Rows served per tier (keys dram, cxl, scm) and rows migrated (key moved) so far."""
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    out = {"dram": 0.0, "cxl": 0.0, "scm": 0.0, "moved": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "embtier_rows_served_total":
                out[s.labels["tier"]] += s.value
            elif s.name == "embtier_migrations_total":
                out["moved"] += s.value
    return out


def shares(now: dict, before: dict) -> list[float]:
    delta = [now[t] - before[t] for t in TIERS]
    total = sum(delta) or 1
    return [v / total for v in delta]


def ideal_dram_share(dram_rows: dict[str, int]) -> float:
    """The DRAM share of served rows if each table's DRAM held exactly its most popular rows (Zipf ALPHA)."""
    best = []
    for table, rows in TABLES.items():
        p = np.arange(1, rows + 1, dtype=np.float64) ** -ALPHA
        best.append(p[:dram_rows[table]].sum() / p.sum())
    return float(np.mean(best))  # every request looks up as many ids in each table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="embtier-demo", description=__doc__)
    p.add_argument("--state-dir", default=".state/demo")
    p.add_argument("--duration", type=float, default=40.0, help="seconds; the hot set moves half-way")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--cxl-latency-ns", type=int, default=0,
                   help="inject this latency per row served from the emulated CXL tier (e.g. 100; default 0)")
    p.add_argument("--dram-bytes", default=DRAM_BYTES, metavar="SIZE",
                   help=f"DRAM tier size (default {DRAM_BYTES}); each table's own limit is its share of it")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="the daemon's Prometheus endpoint, for a Prometheus to scrape (default: a free port)")
    args = p.parse_args(argv)
    state_dir = Path(args.state_dir).resolve()
    metrics = args.metrics_listen or f"127.0.0.1:{free_port()}"
    tier_flags = ["--dram-bytes", args.dram_bytes, *OTHER_TIER_FLAGS]
    injected = (f"; CXL latency injected: {args.cxl_latency_ns} ns per row served from the emulated CXL tier, "
                f"so every figure below includes it" if args.cxl_latency_ns else "")
    print(f"starting embtierd (embedded default configuration, {' '.join(tier_flags)}{injected}), "
          f"state in {state_dir}")
    daemon = start_daemon(state_dir, metrics, tier_flags, args.cxl_latency_ns)
    target = daemon.target
    code = 1
    try:
        with Client(target, timeout=120) as client:
            capacity = {}
            for t in client.tiers():
                kind = "emulated in DRAM" if t.emulated else (t.path or f"NUMA node {t.numa_node}")
                print(f"  tier {t.name:4}: {t.capacity_bytes / 2**20:8.0f} MiB  {kind}")
                capacity[t.name] = t.capacity_bytes
            dram_rows = {}
            for name, rows in TABLES.items():
                dram, cxl = (int(SHARES[name] * capacity[tier]) for tier in MEMORY_TIERS)
                info = client.create_table(name, rows, DIM, initializer="uniform", seed=len(name),
                                           dram_capacity_bytes=dram, cxl_capacity_bytes=cxl)
                dram_rows[name] = info.rows_by_tier["dram"]
                limits = (f"{dram / 2**20:.0f} MiB in DRAM and in CXL" if dram == cxl
                          else f"{dram / 2**20:.0f} MiB in DRAM and {cxl / 2**20:.0f} MiB in CXL")
                print(f"  table {name:9}: {rows:>9} x {DIM} float32 ({rows * ROW_BYTES / 2**20:.0f} MiB), own limit "
                      f"{limits}; rows per tier " + ", ".join(f"{t} {info.rows_by_tier[t]}" for t in TIERS))
            policy = client.policy("user_ids")
        ideal = ideal_dram_share(dram_rows)
        print(f"\nZipf({ALPHA}) LookupPooled: {len(TABLES)} tables x 256 bags x 32 ids per request, "
              f"{args.concurrency} clients, {args.duration:.0f} s. Rows were placed in id order and the popular ids "
              f"are scattered, so the hot rows start spread over all tiers. The tiering engine ({policy.policy}, "
              f"every {policy.interval_seconds:g} s, up to {policy.bandwidth_bytes_per_second >> 20} MiB/s of moves) "
              f"learns them; half-way the hot set moves to other ids.")
        print(f"Best possible DRAM share (each DRAM holding exactly its table's hottest rows): {100 * ideal:.1f}%\n")
        print("  time   req/s  rows/s     p50      p99    dram   cxl    scm   moves/s   DRAM share of rows served")
        last = [scrape(metrics)]
        first = last[0]

        def tick(elapsed: float, stats: Stats) -> None:
            now = scrape(metrics)
            dram, cxl, scm = shares(now, last[0])
            bar = "#" * round(40 * dram)
            print(f"{elapsed:5.0f}s {stats.requests:6.0f} {stats.rows / 1e6:5.2f} M {stats.percentile_ms(50):6.0f} ms "
                  f"{stats.percentile_ms(99):5.0f} ms  {100 * dram:4.0f}% {100 * cxl:4.0f}% {100 * scm:4.0f}%  "
                  f"{now['moved'] - last[0]['moved']:8.0f}   |{bar:<40}| {100 * ideal:.0f}% best", flush=True)
            last[0] = now

        half = args.duration / 2
        totals = []
        for phase, seed in enumerate((0, 100)):
            if phase:
                print(f"--- the hot set moves: other ids become popular (Zipf seed {seed}) ---", flush=True)
            workload = Workload(TABLES, bags=256, pooling_factor=32, alpha=ALPHA, batches=32, seed=seed)
            totals.append(LoadGenerator(target, workload, args.concurrency).run(
                half, lambda e, s, off=phase * half: tick(e + off, s)))
        requests = sum(t.requests for t in totals)
        errors = sum(t.errors for t in totals)
        rows = sum(t.rows for t in totals)
        served = shares(scrape(metrics), first)
        print(f"\nsummary: {requests} requests ({errors} errors), {rows / args.duration / 1e6:.2f} M rows/s pooled; "
              f"rows served: dram {100 * served[0]:.1f}%, cxl {100 * served[1]:.1f}%, scm {100 * served[2]:.1f}%; "
              f"best possible DRAM share {100 * ideal:.1f}%")
    finally:
        code = daemon.stop(timeout=60)
        print(f"embtierd stopped (exit {code}); its log: {daemon.log_path}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
