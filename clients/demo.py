"""The demo behind `make demo`: a real embtierd on its embedded default
configuration (with small DRAM and CXL tiers, so that the demo tables do not
fit in memory), demo tables, and a Zipf workload through the client with a
live display; then a summary and a clean stop.

    python -m embtier.demo [--state-dir DIR] [--duration SECONDS]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .client import Client, wait_serving
from .loadgen import LoadGenerator, Stats, Workload

TABLES = {"user_ids": 1_000_000, "item_ids": 1_000_000, "context": 500_000}
DIM = 64
TIER_FLAGS = ["--dram-bytes", "160M", "--cxl-bytes", "160M", "--scm-bytes", "2G"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(state_dir: Path, metrics: str) -> tuple[subprocess.Popen, str]:
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = state_dir / "embtierd.sock"
    target = f"unix://{sock}"
    with open(state_dir / "embtierd.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "embtierd", "--state-dir", str(state_dir), "--listen",
                                 target, "--metrics-listen", metrics, *TIER_FLAGS],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(target, proc)
    except (RuntimeError, TimeoutError) as e:
        proc.kill()
        raise SystemExit(f"{e}; its log, {state_dir / 'embtierd.log'}:\n"
                         + (state_dir / "embtierd.log").read_text()) from None
    return proc, target


def rows_by_tier(metrics: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    out = {"dram": 0.0, "cxl": 0.0, "scm": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "embtier_rows_served_total":
                out[s.labels["tier"]] += s.value
    return out


def share(now: dict, before: dict) -> str:
    delta = {t: now[t] - before[t] for t in now}
    total = sum(delta.values()) or 1
    return "  ".join(f"{t} {100 * v / total:5.1f}%" for t, v in delta.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="embtier-demo", description=__doc__)
    p.add_argument("--state-dir", default=".state/demo")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)
    state_dir = Path(args.state_dir).resolve()
    metrics = f"127.0.0.1:{free_port()}"
    print(f"starting embtierd (embedded default configuration, {' '.join(TIER_FLAGS)}), state in {state_dir}")
    proc, target = start_daemon(state_dir, metrics)
    try:
        with Client(target, timeout=120) as client:
            for t in client.tiers():
                kind = "emulated in DRAM" if t.emulated else (t.path or f"NUMA node {t.numa_node}")
                print(f"  tier {t.name:4}: {t.capacity_bytes / 2**20:8.0f} MiB  {kind}")
            for name, rows in TABLES.items():
                info = client.create_table(name, rows, DIM, initializer="uniform", seed=len(name))
                print(f"  table {name:9}: {rows:>9} x {DIM} float32 ({rows * DIM * 4 / 2**20:.0f} MiB)  rows per tier "
                      + ", ".join(f"{t} {info.rows_by_tier[t]}" for t in ("dram", "cxl", "scm")))
        workload = Workload(TABLES, bags=256, pooling_factor=32, alpha=1.05)
        print(f"\nZipf({workload.alpha}) LookupPooled: {len(TABLES)} tables x {workload.bags} bags x "
              f"{workload.pooling_factor} ids per request, {args.concurrency} clients, {args.duration:.0f} s\n")
        print("  time     req/s    rows/s      p50        p99     rows served by tier")
        last = [rows_by_tier(metrics)]

        def tick(elapsed: float, stats: Stats) -> None:
            now = rows_by_tier(metrics)
            print(f"{elapsed:6.1f}s {stats.requests:8.0f} {stats.rows / 1e6:7.2f} M  {stats.percentile_ms(50):7.2f} ms "
                  f"{stats.percentile_ms(99):7.2f} ms   {share(now, last[0])}", flush=True)
            last[0] = now

        first = rows_by_tier(metrics)
        total = LoadGenerator(target, workload, args.concurrency).run(args.duration, tick)
        print(f"\nsummary: {total.requests} requests ({total.errors} errors), "
              f"{total.rows / args.duration / 1e6:.2f} M rows/s pooled, p50 {total.percentile_ms(50):.2f} ms, "
              f"p99 {total.percentile_ms(99):.2f} ms; rows served: {share(rows_by_tier(metrics), first)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        print(f"embtierd stopped (exit {code}); its log: {state_dir / 'embtierd.log'}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
