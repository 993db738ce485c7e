"""embtier: the command line of the embtier daemon.

    embtier [--target ADDR] tables | describe T | create T --rows N --dim D | drop T
            | import T FILE.npy | lookup T ID... | tiers | bench --table T ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .client import Client, EmbtierClientError, TableInfo, TlsOptions
from .loadgen import LoadGenerator, Workload


def default_target() -> str:
    """The daemon's default Unix socket if one exists, else its default TCP port."""
    candidates = [Path("/run/embtier/embtierd.sock")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "embtier" / "embtierd.sock")
    for path in candidates:
        if path.exists():
            return f"unix://{path}"
    return "127.0.0.1:50051"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(info: TableInfo) -> str:
    tiers = ", ".join(f"{t} {info.rows_by_tier.get(t, 0)}" for t in ("dram", "cxl", "scm"))
    return f"{info.name:24} {info.num_rows:>12} x {info.dim:<5} {info.dtype:8} v{info.version:<6} rows: {tiers}"


def cmd_tables(c: Client, args) -> None:
    for info in c.tables():
        print(format_table(info))


def cmd_describe(c: Client, args) -> None:
    info = c.describe(args.name)
    print(format_table(info))
    for tier in ("dram", "cxl", "scm"):
        emulated = " (emulated)" if info.emulated_by_tier.get(tier) else ""
        print(f"  {tier:5} {info.rows_by_tier.get(tier, 0):>12} rows  "
              f"{human_bytes(info.bytes_by_tier.get(tier, 0)):>12}{emulated}")
    print(f"  metadata {human_bytes(info.metadata_bytes)} ({info.metadata_bytes / info.num_rows:.2f} bytes/row)")


def cmd_create(c: Client, args) -> None:
    print(format_table(c.create_table(args.name, args.rows, args.dim, args.dtype, args.init, args.seed,
                                      args.scale)))


def cmd_drop(c: Client, args) -> None:
    c.drop_table(args.name)


def cmd_tiers(c: Client, args) -> None:
    for t in c.tiers():
        where = t.path or (f"NUMA node {t.numa_node}" if t.numa_node >= 0 else "")
        print(f"{t.name:5} {human_bytes(t.used_bytes):>12} used of {human_bytes(t.capacity_bytes):>12}  "
              f"{'emulated ' if t.emulated else ''}{where}")


def cmd_heat(c: Client, args) -> None:
    bins, tiers = c.heat(args.name)
    width = 40
    most = max((n for counts in tiers.values() for n in counts), default=1) or 1
    print(f"heat of {args.name} (sampled access counts, halved every tiering interval), rows per bin:")
    for tier, counts in tiers.items():
        print(f"  {tier} ({sum(counts)} rows)")
        for label, n in zip(bins, counts):
            bar = "#" * max(1 if n else 0, round(width * n / most))
            print(f"    {label:>8} {n:>12}  {bar}")


def cmd_lookup(c: Client, args) -> None:
    ids = np.array(args.ids, dtype=np.int64)
    if args.pooled:
        rows = c.lookup_pooled({args.name: (ids, np.array([ids.size], np.int32))}, mode=args.mode)[args.name]
    else:
        rows = c.lookup(args.name, ids)
    np.set_printoptions(precision=5, suppress=True, linewidth=120)
    print(rows)


def progress(done: int, total: int, start: float) -> None:
    width = 40
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - start, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows  {rate:,.0f} rows/s")
    sys.stderr.flush()


def cmd_import(c: Client, args) -> None:
    values = np.load(args.file, mmap_mode="r")
    if values.ndim != 2:
        raise SystemExit(f"{args.file}: expected a 2-D array [rows, dim], got shape {values.shape}")
    rows, dim = values.shape
    if args.create:
        c.create_table(args.name, rows, dim, args.dtype)
    start = time.monotonic()
    for first in range(0, rows, args.chunk_rows):
        chunk = np.ascontiguousarray(values[first:first + args.chunk_rows], dtype=np.float32)
        c.write_rows(args.name, np.arange(first, first + chunk.shape[0]), chunk)
        progress(first + chunk.shape[0], rows, start)
    sys.stderr.write("\n")


def print_tick(elapsed: float, tick) -> None:
    secs = 1.0
    print(f"{elapsed:6.1f}s  {tick.requests / secs:8.0f} req/s  {tick.rows / secs / 1e6:7.2f} M rows/s  "
          f"p50 {tick.percentile_ms(50):7.2f} ms  p99 {tick.percentile_ms(99):7.2f} ms", flush=True)


def cmd_bench(c: Client, args) -> None:
    tables = {name: c.describe(name).num_rows for name in args.table}
    workload = Workload(tables, args.bags, args.pooling_factor, args.alpha, not args.raw)
    gen = LoadGenerator(args.target, workload, args.concurrency)
    stats = gen.run(args.duration, print_tick)
    print(f"total: {stats.requests} requests, {stats.errors} errors, {stats.rows / args.duration / 1e6:.2f} M rows/s, "
          f"p50 {stats.percentile_ms(50):.2f} ms, p99 {stats.percentile_ms(99):.2f} ms "
          f"({'pooled' if workload.pooled else 'raw'}, {args.concurrency} clients)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="embtier", description="Command line of the embtier daemon.")
    p.add_argument("--target", default=os.environ.get("EMBTIER_TARGET") or default_target(),
                   help="daemon address: unix:///path or host:port (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.add_argument("--ca", help="PEM CA that signed the daemon's certificate (TLS over TCP)")
    p.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", help="PEM key of --cert")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("tables", help="list tables")
    sub.add_parser("tiers", help="tiers, capacity and use")
    s = sub.add_parser("describe", help="one table, per tier")
    s.add_argument("name")
    s = sub.add_parser("create", help="create a table")
    s.add_argument("name")
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--dim", type=int, required=True)
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8"])
    s.add_argument("--init", default="zeros", choices=["zeros", "uniform"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=0.0, help="uniform range; 0 = 1/sqrt(rows)")
    s = sub.add_parser("drop", help="drop a table")
    s.add_argument("name")
    s = sub.add_parser("import", help="write a .npy file [rows, dim] into a table, in chunks")
    s.add_argument("name")
    s.add_argument("file")
    s.add_argument("--create", action="store_true", help="create the table first, shaped like the file")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8"])
    s.add_argument("--chunk-rows", type=int, default=65536)
    s = sub.add_parser("heat", help="heat histogram of a table, per tier")
    s.add_argument("name")
    s = sub.add_parser("lookup", help="print rows, or their pooled sum")
    s.add_argument("name")
    s.add_argument("ids", type=int, nargs="+")
    s.add_argument("--pooled", action="store_true")
    s.add_argument("--mode", default="sum", choices=["sum", "mean", "max"])
    s = sub.add_parser("bench", help="load generator: Zipf ids, pooled or raw lookups")
    s.add_argument("--table", action="append", required=True, help="table to read (repeatable)")
    s.add_argument("--duration", type=float, default=10.0)
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--bags", type=int, default=512)
    s.add_argument("--pooling-factor", type=int, default=32)
    s.add_argument("--alpha", type=float, default=1.05)
    s.add_argument("--raw", action="store_true", help="Lookup the raw rows instead of LookupPooled")
    return p.parse_args(argv)


COMMANDS = {"tables": cmd_tables, "describe": cmd_describe, "create": cmd_create, "drop": cmd_drop,
            "tiers": cmd_tiers, "heat": cmd_heat, "lookup": cmd_lookup, "import": cmd_import, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tls = TlsOptions(args.ca, args.cert, args.key) if args.ca else None
        with Client(args.target, timeout=args.timeout, tls=tls) as client:
            COMMANDS[args.command](client, args)
    except EmbtierClientError as e:
        print(f"embtier: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
