"""Benchmark of a cluster of embtierd daemons (embtier.cluster), in one run on one machine: three
daemons and a real etcd in a ClusterBed (a network namespace per daemon when run as root, loopback
ports otherwise), driven through ClusterClient.

1. Planner against the baseline, predicted and measured.  A skewed mix of 20 tables -- four large
   ones read with Zipf(1.05) ids at pooling factors 16 to 64, sixteen small ones read with uniform
   ids at 1 to 4; one request is a LookupPooled of 64 bags of every table -- is placed by the
   cost-model planner (embtier_tools.planner.plan, given traces of the large tables' ids) and by
   greedy_table_wise (each table whole on the daemon with the least memory used so far).  Printed:
   per daemon, its share of the predicted work under each plan, and the predicted load of the
   slowest daemon, greedy / planner (> 1: the planner's plan is better).  Both plans are then put
   into effect side by side (tables p_* and g_*, created by embtier.cluster.placement.apply_plan on
   the daemons their plan names, every row in DRAM), and the mix is driven through one
   ClusterClient by 4 threads, in windows that alternate between the two plans' tables; each window
   measures each daemon's CPU seconds (psutil, user + system).  Printed: per daemon its share of the
   daemons' CPU seconds, the slowest daemon's CPU seconds per request, and greedy / planner of
   that (the median over pairs of windows).
2. Fan-out overhead.  LookupPooled of one 200k x 64 float32 table (128 bags, Zipf(1.05) ids,
   pooling factors 8, 32 and 128) three ways: row-wise over the three daemons through
   ClusterClient; the same rows table-wise on one daemon through ClusterClient; and that table's
   shard through a plain Client at its daemon's address (direct: no plan, no split, no merge).  At
   concurrency 1 the three are interleaved call by call (the order rotated each repetition), ratio
   = the median over repetitions of path time / direct time.  At concurrency 4 (4 threads sharing
   one client) each path runs in windows alternating with the others; ratio = p50 / direct's p50,
   and CPU = the CPU seconds of this process and the daemons per request.  Results are checked
   against numpy once per pooling factor.
3. Fail-over.  A table row-wise over the three daemons, 2 replicas a shard, under a reader (pooled
   lookups in a loop) and a writer (write_rows of 32 rows in a loop), each with its own
   ClusterClient; one daemon is SIGKILLed.  Printed per trial: the longest read in flight within two
   lease periods of the kill, the time from the kill until the first read started after it
   succeeded, failed reads and writes (target 0), when the dead daemon left the live set (its lease
   expired), and the time from the kill until the first write started after it was acknowledged
   (writes wait for the dead replica to leave the live set).  The daemons run with [cluster]
   lease_seconds = 2.  A killed daemon is started again (a new incarnation) before the next trial.

The cluster starts with an empty plan (version 1: ClusterClient.refresh waits out its whole timeout
while a cluster has no plan).  Every daemon runs with the tests' tier flags (tests/support.py
TIER_FLAGS) and --dram-bytes 1G, tiering disabled, so that rows stay in DRAM where they were made.
The three daemons, etcd and this
process (the clients) share the machine's cores: 2 on the reference machine, so the figures of
section 1 are CPU seconds, not the load of dedicated hosts, and in section 2 the fan-out's three
daemons compete with the client for the same cores.  Each section prints its lines as soon as it
has measured them; one that fails is reported (its traceback on stderr), the next one runs, and
the exit status is 1.  The bed is always taken down.

Run as root (namespace mode) or not (loopback mode):
  .venv/bin/python tests/bench/bench_cluster.py [--quick]
The full run takes about 2 minutes; --quick (smaller large tables, fewer repetitions) about 30 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.support

from embtier.client import Client
from embtier.cluster.client import ClusterClient
from embtier.cluster.coord import Coordination
from embtier.cluster.placement import apply_plan
from embtier.cluster.plan import Plan
from embtier_tools.cluster_bed import ClusterBed
from embtier_tools.loadgen import ZipfIds
from embtier_tools.planner import Report, TableSpec, greedy_table_wise, plan

from tests.bench.bench_kernels import ZIPF_S, Sections, interleave, log
from tests.support import TIER_FLAGS

CLUSTER = "bench"
HOSTS = 3
LEASE_SECONDS = 2
DAEMON_FLAGS = (*TIER_FLAGS, "--dram-bytes", "1G")
DAEMON_CONFIG = f"[cluster]\nlease_seconds = {LEASE_SECONDS}\n\n[tiering]\nenabled = false\n"
DIM = 64
THREADS = 4                  # concurrent requests of section 1's load and section 2's concurrency 4


@dataclass(frozen=True)
class Scale:
    """Sizes and repetitions of one run."""

    large_rows_divisor: int      # the mix's large tables have their listed rows / this
    mix_pairs: int               # pairs of windows (planner's tables, greedy's) of section 1
    mix_window_seconds: float
    fan_rows: int
    fan_warmup: int
    fan_reps: int                # calls per path and pooling factor at concurrency 1
    fan_rounds: int              # windows per path and pooling factor at concurrency 4
    fan_window_seconds: float
    failover_trials: int


FULL = Scale(large_rows_divisor=1, mix_pairs=4, mix_window_seconds=4.0, fan_rows=200_000, fan_warmup=3,
             fan_reps=60, fan_rounds=3, fan_window_seconds=1.5, failover_trials=3)
QUICK = Scale(large_rows_divisor=5, mix_pairs=2, mix_window_seconds=1.5, fan_rows=200_000, fan_warmup=2,
              fan_reps=15, fan_rounds=1, fan_window_seconds=0.75, failover_trials=1)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def cluster_spec(bed: ClusterBed) -> str:
    return f"{CLUSTER}@{bed.etcd.endpoint()}"


# ---- the bed ----------------------------------------------------------------------------------------

def start_host(bed: ClusterBed, i: int, state_dir: Path | None = None) -> None:
    """embtierd on host i as node n<i> of the cluster (state_dir: a fresh one for a restart)."""
    config = bed.base_dir / "embtierd.toml"
    config.write_text(DAEMON_CONFIG)
    bed.start_daemon(i, state_dir, extra_args=(
        *DAEMON_FLAGS, "--config", str(config), "--cluster", f"{CLUSTER}@{bed.etcd_endpoint(i)}",
        "--node-id", f"n{i}", "--advertise", bed.target(i)))


def publish_empty_plan(bed: ClusterBed) -> None:
    """Plan version 1 with no table: ClusterClient.refresh() waits out its whole timeout (30 s) while a
    cluster has no plan at all, which would stall every new client and apply_plan."""
    if not Coordination(CLUSTER, [bed.etcd.endpoint()]).publish(Plan(CLUSTER, 1, 0, time.time())):
        raise RuntimeError(f"cluster {CLUSTER!r} has a plan already")


def wait_registered(client: ClusterClient, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        client.refresh()
        if len(client.nodes()) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} daemons did not register within {timeout:g} s: "
                               f"{sorted(client.nodes())}")
        time.sleep(0.1)


def connect(bed: ClusterBed) -> ClusterClient:
    """A ClusterClient once every running daemon of the bed is registered."""
    client = ClusterClient(cluster_spec(bed))
    wait_registered(client, sum(1 for d in bed.daemons.values() if d.proc.poll() is None))
    return client


def daemon_processes(bed: ClusterBed) -> dict[str, psutil.Process]:
    """Node id -> its embtierd process (nsenter execs the daemon: the bed's pid is the daemon's)."""
    out = {}
    for i, d in bed.daemons.items():
        proc = psutil.Process(d.proc.pid)
        if "embtierd" not in proc.cmdline():
            raise RuntimeError(f"pid {proc.pid} of host {i} is not embtierd: {' '.join(proc.cmdline())}")
        out[f"n{i}"] = proc
    return out


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


# ---- 1. planner against greedy table-wise ---------------------------------------------------------------

@dataclass(frozen=True)
class MixTable:
    name: str
    rows: int
    dim: int
    pooling_factor: int
    large: bool              # large and hot: Zipf ids, rows scaled by Scale.large_rows_divisor


# four large tables among sixteen small ones, in a fixed order (the order greedy_table_wise takes them in)
MIX = (
    MixTable("t00", 500_000, 64, 48, True), MixTable("t01", 20_000, 32, 2, False),
    MixTable("t02", 8_000, 16, 1, False), MixTable("t03", 400_000, 64, 32, True),
    MixTable("t04", 50_000, 32, 4, False), MixTable("t05", 2_000, 16, 1, False),
    MixTable("t06", 30_000, 32, 2, False), MixTable("t07", 300_000, 64, 64, True),
    MixTable("t08", 10_000, 16, 1, False), MixTable("t09", 40_000, 32, 4, False),
    MixTable("t10", 5_000, 16, 1, False), MixTable("t11", 60_000, 32, 2, False),
    MixTable("t12", 200_000, 64, 16, True), MixTable("t13", 15_000, 16, 1, False),
    MixTable("t14", 25_000, 32, 2, False), MixTable("t15", 3_000, 16, 1, False),
    MixTable("t16", 35_000, 32, 4, False), MixTable("t17", 12_000, 16, 1, False),
    MixTable("t18", 45_000, 32, 2, False), MixTable("t19", 7_000, 16, 1, False),
)
MIX_BAGS = 64
MIX_REQUESTS = 8             # id batches drawn in advance (the same for both plans' tables)
TRACE_REQUESTS = 16          # requests' worth of ids in a large table's trace for the planner
NOMINAL_REQUESTS_PER_SECOND = 100.0  # the planner's traffic (its loads are linear in it)
PLANNER, GREEDY = "planner", "greedy"
PREFIX = {PLANNER: "p_", GREEDY: "g_"}


class Mix:
    """The mix at one scale: its tables' rows, id generators, requests and the planner's specs."""

    def __init__(self, scale: Scale):
        rng = np.random.default_rng(7)
        self.rows = {t.name: t.rows // scale.large_rows_divisor if t.large else t.rows for t in MIX}
        gens = {t.name: ZipfIds(self.rows[t.name], ZIPF_S, k) for k, t in enumerate(MIX) if t.large}

        def draw(t: MixTable, requests: int) -> np.ndarray:
            size = MIX_BAGS * t.pooling_factor * requests
            return gens[t.name].draw(rng, size) if t.large else rng.integers(0, self.rows[t.name], size)

        self.traces = {t.name: draw(t, TRACE_REQUESTS) for t in MIX if t.large}
        self.requests = [{t.name: (draw(t, 1), np.full(MIX_BAGS, t.pooling_factor, np.int32)) for t in MIX}
                         for _ in range(MIX_REQUESTS)]

    def bytes(self) -> int:
        return sum(self.rows[t.name] * t.dim * 4 for t in MIX)

    def specs(self, prefix: str) -> list[TableSpec]:
        return [TableSpec(prefix + t.name, self.rows[t.name], t.dim, pooling_factor=float(t.pooling_factor),
                          requests_per_second=NOMINAL_REQUESTS_PER_SECOND, bags_per_request=MIX_BAGS,
                          trace=self.traces.get(t.name)) for t in MIX]

    def requests_of(self, prefix: str) -> list[dict]:
        return [{prefix + name: f for name, f in r.items()} for r in self.requests]


def drive(client: ClusterClient, requests: list[dict], threads: int, seconds: float) -> int:
    """Requests completed by threads looping over requests for seconds; the first error is raised."""
    return len(latency_window(lambda b: client.lookup_pooled(requests[b]), len(requests), threads, seconds))


@dataclass
class Window:
    requests: int
    cpu: dict[str, float]    # node -> CPU seconds

    @property
    def slowest(self) -> str:
        return max(sorted(self.cpu), key=self.cpu.get)

    def share(self, node: str) -> float:
        return self.cpu[node] / sum(self.cpu.values())

    @property
    def slowest_per_request(self) -> float:
        return self.cpu[self.slowest] / self.requests


def measured_window(client: ClusterClient, procs: dict[str, psutil.Process], requests: list[dict],
                    seconds: float) -> Window:
    before = {n: cpu_seconds(p) for n, p in procs.items()}
    count = drive(client, requests, THREADS, seconds)
    return Window(count, {n: cpu_seconds(p) - before[n] for n, p in procs.items()})


def layout_summary(tables: dict, mix: list[MixTable], prefix: str) -> str:
    parts = []
    for t in mix:
        lay = tables[prefix + t.name].layout
        where = ",".join(sorted(lay.nodes()))
        parts.append(f"{t.name} {lay.sharding}-wise{f' ({lay.split})' if lay.split else ''} on {where}")
    return "; ".join(parts)


def predicted_share(report: Report, node: str) -> float:
    return report.nodes[node].load / sum(x.load for x in report.nodes.values())


def planner_vs_greedy(bed: ClusterBed, client: ClusterClient, scale: Scale) -> None:
    """Section 1."""
    mix = Mix(scale)
    nodes = client.nodes()
    current = client.refresh()
    log("section 1: planning")
    planned, planned_report = plan(mix.specs(PREFIX[PLANNER]), nodes, current, CLUSTER)
    greedy, greedy_report = greedy_table_wise(mix.specs(PREFIX[GREEDY]), nodes, CLUSTER)
    reports = {PLANNER: planned_report, GREEDY: greedy_report}
    large = [t for t in MIX if t.large]
    per_request = {k: r.slowest_load / NOMINAL_REQUESTS_PER_SECOND for k, r in reports.items()}
    lines = [
        "",
        (f"1. planner vs greedy_table_wise: {len(MIX)} tables ({sum(t.large for t in MIX)} large: "
         f"{', '.join(f'{t.name} {mix.rows[t.name]} x {t.dim} PF {t.pooling_factor} Zipf' for t in large)}; "
         f"{sum(not t.large for t in MIX)} small: 2k-60k rows x 16-32, PF 1-4, uniform ids), "
         f"{mix.bytes() / 2**20:.0f} MiB of float32 a plan, {MIX_BAGS} bags a table per request"),
        f"   planner's layouts of the large tables: {layout_summary(planned.tables, large, PREFIX[PLANNER])}",
        f"   greedy's layouts of the large tables:  {layout_summary(greedy.tables, large, PREFIX[GREEDY])}",
        "   predicted (cost model): share of the work per daemon, and the slowest daemon's load",
        "   " + "  ".join(f"{n}: planner {predicted_share(planned_report, n):4.0%} greedy "
                          f"{predicted_share(greedy_report, n):4.0%}" for n in sorted(nodes)),
        (f"   slowest daemon: planner {planned_report.slowest_node} {per_request[PLANNER] * 1e6:.0f} us of work "
         f"a request, greedy {greedy_report.slowest_node} {per_request[GREEDY] * 1e6:.0f} us; greedy / planner "
         f"{per_request[GREEDY] / per_request[PLANNER]:.2f} (> 1: the planner's plan is better)")]
    print("\n".join(lines), flush=True)

    log("section 1: creating both plans' tables (apply_plan)")
    started = time.perf_counter()
    apply_plan(client, current.successor({**planned.tables, **greedy.tables}))
    for t in client.plan.tables.values():
        placed = client.describe(t.name).rows_by_tier
        if placed.get("dram", 0) != t.num_rows:
            raise RuntimeError(f"table {t.name}: expected every row in DRAM, placement is {placed}")
    log(f"section 1: {len(client.plan.tables)} tables made in {time.perf_counter() - started:.1f} s")
    procs = daemon_processes(bed)
    requests = {k: mix.requests_of(p) for k, p in PREFIX.items()}
    for k in PREFIX:  # warm-up
        drive(client, requests[k], THREADS, 0.3)
    windows: dict[str, list[Window]] = {PLANNER: [], GREEDY: []}
    for i in range(scale.mix_pairs):
        for k in (PLANNER, GREEDY) if i % 2 == 0 else (GREEDY, PLANNER):
            windows[k].append(measured_window(client, procs, requests[k], scale.mix_window_seconds))
    ratios = [g.slowest_per_request / p.slowest_per_request for p, g in zip(windows[PLANNER], windows[GREEDY])]

    def share(k: str, n: str) -> float:
        return statistics.median(w.share(n) for w in windows[k])

    def slowest(k: str) -> str:
        names = [w.slowest for w in windows[k]]
        return max(sorted(set(names)), key=names.count)

    def slowest_us(k: str) -> float:
        return statistics.median(w.slowest_per_request for w in windows[k]) * 1e6

    def rate(k: str) -> float:
        return sum(w.requests for w in windows[k]) / (scale.mix_pairs * scale.mix_window_seconds)

    def busy(k: str) -> float:
        return statistics.median(sum(w.cpu.values()) for w in windows[k]) / scale.mix_window_seconds

    lines = [
        (f"   measured: {THREADS} threads through one ClusterClient, {scale.mix_pairs} pairs of "
         f"{scale.mix_window_seconds:g} s windows alternating planner / greedy tables; share of the daemons' "
         "CPU seconds per daemon (median)"),
        "   " + "  ".join(f"{n}: planner {share(PLANNER, n):4.0%} greedy {share(GREEDY, n):4.0%}"
                          for n in sorted(procs)),
        (f"   slowest daemon: planner {slowest(PLANNER)} {slowest_us(PLANNER):.0f} us CPU a request, greedy "
         f"{slowest(GREEDY)} {slowest_us(GREEDY):.0f} us; greedy / planner {statistics.median(ratios):.2f} "
         f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})"),
        (f"   requests/s: planner {rate(PLANNER):.0f}, greedy {rate(GREEDY):.0f}; daemons' CPU seconds a second "
         f"(of {os.cpu_count()} cores, shared with this client and etcd): planner {busy(PLANNER):.2f}, greedy "
         f"{busy(GREEDY):.2f}")]
    print("\n".join(lines), flush=True)
    log("section 1: dropping the tables")
    apply_plan(client, client.refresh().successor({}))


# ---- 2. fan-out overhead -----------------------------------------------------------------------------

FAN_BAGS = 128
FAN_POOLING_FACTORS = (8, 32, 128)
FAN_TARGET = 1.3             # row-wise over 3 / direct at pooling factor 32
WRITE_ROWS = 25_000          # rows per write_rows call when loading the tables
ROW_WISE, TABLE_WISE, DIRECT = "row-wise x3, ClusterClient", "table-wise, ClusterClient", "table-wise, direct Client"
PATHS = (ROW_WISE, TABLE_WISE, DIRECT)


def latency_window(call: Callable[[int], object], batches: int, threads: int, seconds: float) -> list[float]:
    """Latencies of threads calling call(batch index) in a loop for seconds."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop(k: int) -> None:
        i = k
        try:
            while not stop.is_set():
                start = time.perf_counter()
                call(i % batches)
                latencies[k].append(time.perf_counter() - start)
                i += 1
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)
            stop.set()

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    stop.wait(seconds)
    stop.set()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return [x for part in latencies for x in part]


def fan_out_tables(client: ClusterClient, rows: int) -> tuple[np.ndarray, Client, str]:
    """The row-wise and table-wise tables with the same random rows; (the rows, a Client of the
    table-wise table's daemon, its shard's name there)."""
    values = np.random.default_rng(3).random((rows, DIM), dtype=np.float32) - np.float32(0.5)
    client.create_table("fan_row", rows, DIM, sharding="row", shards=HOSTS)
    client.create_table("fan_table", rows, DIM, sharding="table")
    for lo in range(0, rows, WRITE_ROWS):
        ids = np.arange(lo, min(lo + WRITE_ROWS, rows))
        for name in ("fan_row", "fan_table"):
            client.write_rows(name, ids, values[ids])
    shard = client.plan.tables["fan_table"].layout.shards[0]
    return values, Client(client.nodes()[shard.replicas[0].node].address, retries=0), shard.name


def fan_out_pf(client: ClusterClient, direct: Client, shard: str, values: np.ndarray, procs: list[psutil.Process],
               scale: Scale, pooling_factor: int) -> None:
    """The lines of one pooling factor: each path at concurrency 1 and 4."""
    ids = ZipfIds(values.shape[0], ZIPF_S, pooling_factor)
    rng = np.random.default_rng(pooling_factor)
    lengths = np.full(FAN_BAGS, pooling_factor, np.int32)
    batches = [ids.draw(rng, FAN_BAGS * pooling_factor) for _ in range(scale.fan_warmup + scale.fan_reps)]
    calls = {ROW_WISE: lambda b: client.lookup_pooled({"fan_row": (batches[b], lengths)})["fan_row"],
             TABLE_WISE: lambda b: client.lookup_pooled({"fan_table": (batches[b], lengths)})["fan_table"],
             DIRECT: lambda b: direct.lookup_pooled({shard: (batches[b], lengths)})[shard]}
    want = np.add.reduceat(values[batches[0]], np.arange(0, batches[0].size, pooling_factor), axis=0)
    for path, call in calls.items():
        if not np.allclose(call(0), want, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"PF {pooling_factor}, {path}: the pooled rows differ from numpy's")

    def timed(call: Callable[[int], object]) -> Callable[[int], float]:
        def run(b: int) -> float:
            start = time.perf_counter()
            call(b)
            return time.perf_counter() - start
        return run

    one = interleave({p: timed(c) for p, c in calls.items()}, scale.fan_warmup, scale.fan_reps)
    four: dict[str, list[float]] = {p: [] for p in PATHS}
    cpu = dict.fromkeys(PATHS, 0.0)
    for r in range(scale.fan_rounds):
        for p in PATHS[r % 3:] + PATHS[:r % 3]:
            before = sum(cpu_seconds(x) for x in procs)
            four[p] += latency_window(calls[p], len(batches), THREADS, scale.fan_window_seconds)
            cpu[p] += sum(cpu_seconds(x) for x in procs) - before
    four_seconds = scale.fan_rounds * scale.fan_window_seconds
    lines = []
    for conc, lat in ((1, one), (THREADS, four)):
        for p in PATHS:
            if conc == 1:
                ratio = statistics.median(np.asarray(lat[p]) / np.asarray(lat[DIRECT]))
                rate, cpu_ms = len(lat[p]) / sum(lat[p]), ""
            else:
                ratio = np.percentile(lat[p], 50) / np.percentile(lat[DIRECT], 50)
                rate, cpu_ms = len(lat[p]) / four_seconds, ms(cpu[p] / len(lat[p]))
            lines.append(f"   {pooling_factor:>4} {conc:>4}  {p:<27} {ms(np.percentile(lat[p], 50)):>7} "
                         f"{ms(np.percentile(lat[p], 99)):>7} {rate:>8.0f} {ratio:>9.2f} {cpu_ms:>11}")
    print("\n".join(lines), flush=True)


def fan_out(bed: ClusterBed, client: ClusterClient, scale: Scale, sections: Sections) -> None:
    """Section 2."""
    log("section 2: loading the tables")
    values, direct, shard = fan_out_tables(client, scale.fan_rows)
    procs = [psutil.Process(), *daemon_processes(bed).values()]
    try:
        print("\n".join([
            "",
            (f"2. fan-out overhead: LookupPooled (sum) of one {scale.fan_rows} x {DIM} float32 table, {FAN_BAGS} bags, "
             f"Zipf({ZIPF_S}) ids; concurrency 1: {scale.fan_reps} interleaved calls a path (ratio: median of "
             f"per-call path / direct); concurrency {THREADS}: {scale.fan_rounds} x {scale.fan_window_seconds:g} s "
             "windows a path (ratio: p50 / direct p50; CPU: this process's and the daemons' CPU seconds a request)"),
            (f"   {'PF':>4} {'conc':>4}  {'path':<27} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>8} {'/ direct':>9} "
             f"{'CPU ms/req':>11}")]),
            flush=True)
        for pf in FAN_POOLING_FACTORS:
            sections.run(f"2. fan-out, PF {pf}", fan_out_pf, client, direct, shard, values, procs, scale, pf)
        print(f"   target: row-wise x3 / direct <= {FAN_TARGET} at PF 32, concurrency 1", flush=True)
    finally:
        direct.close()


# ---- 3. fail-over ------------------------------------------------------------------------------------

FAILOVER_ROWS = 60_000
FAILOVER_DIM = 32
FAILOVER_BAGS = 64
FAILOVER_PF = 16
WRITE_IDS = 32
STEADY_SECONDS = 1.0         # of load before the kill
AFTER_KILL_SECONDS = 2 * LEASE_SECONDS + 2.0


@dataclass
class Call:
    start: float
    end: float
    ok: bool


@dataclass
class Traffic:
    """A reader and a writer of one table, each through a ClusterClient of its own, recording every call."""

    bed: ClusterBed
    table: str
    reads: list[Call] = field(default_factory=list)
    writes: list[Call] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        rng = np.random.default_rng(5)
        gen = ZipfIds(FAILOVER_ROWS, ZIPF_S, 5)
        lengths = np.full(FAILOVER_BAGS, FAILOVER_PF, np.int32)
        reads = [{self.table: (gen.draw(rng, FAILOVER_BAGS * FAILOVER_PF), lengths)} for _ in range(16)]
        writes = [np.unique(rng.integers(0, FAILOVER_ROWS, WRITE_IDS)) for _ in range(16)]
        self.threads = [
            threading.Thread(target=self._loop, args=(self.reads, lambda c, i: c.lookup_pooled(reads[i % 16])), daemon=True),
            threading.Thread(target=self._loop, args=(self.writes, lambda c, i: c.write_rows(
                self.table, writes[i % 16], np.full((writes[i % 16].size, FAILOVER_DIM), i, np.float32))), daemon=True)]
        for t in self.threads:
            t.start()
        return self

    def _loop(self, calls: list[Call], fn: Callable[[ClusterClient, int], object]) -> None:
        with connect(self.bed) as client:
            i = 0
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    fn(client, i)
                    ok = True
                except Exception as e:  # noqa: BLE001 - counted and reported
                    self.errors.append(f"{type(e).__name__}: {e}")
                    ok = False
                calls.append(Call(start, time.monotonic(), ok))
                i += 1

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


FAILOVER_COLUMNS = (("trial", 5), ("killed", 6), ("reads", 5), ("failed", 6), ("read p50", 8), ("longest", 8),
                    ("first ok", 8), ("left live", 9), ("writes", 6), ("failed", 6), ("longest", 8),
                    ("acked again", 11))


def failover_row(cells: list[str]) -> str:
    return "   " + " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, FAILOVER_COLUMNS))


def failover_trial(bed: ClusterBed, client: ClusterClient, trial: int, victim: int) -> None:
    table = f"failover{trial}"
    client.create_table(table, FAILOVER_ROWS, FAILOVER_DIM, sharding="row", shards=HOSTS, replicas=2)
    client.write_rows(table, np.arange(FAILOVER_ROWS), np.zeros((FAILOVER_ROWS, FAILOVER_DIM), np.float32))
    node = f"n{victim}"
    with Traffic(bed, table) as traffic:
        time.sleep(STEADY_SECONDS)
        killed = time.monotonic()
        bed.kill(victim)
        left = None
        while time.monotonic() < killed + AFTER_KILL_SECONDS:
            if left is None and node not in client.coord.nodes():
                left = time.monotonic() - killed
            time.sleep(0.02)
    reads, writes = traffic.reads, traffic.writes

    def around(calls: list[Call]) -> float:
        return max((c.end - c.start for c in calls if c.end >= killed and c.start <= killed + 2 * LEASE_SECONDS),
                   default=float("nan"))

    def first_ok_after(calls: list[Call]) -> float:
        return min((c.end - killed for c in calls if c.start >= killed and c.ok), default=float("nan"))

    before = [c.end - c.start for c in reads if c.end < killed]
    print(failover_row([
        str(trial), node, str(len(reads)), str(sum(not c.ok for c in reads)),
        ms(statistics.median(before)) if before else "-", ms(around(reads)), ms(first_ok_after(reads)),
        ms(left) if left is not None else "-", str(len(writes)), str(sum(not c.ok for c in writes)),
        ms(around(writes)), ms(first_ok_after(writes))]), flush=True)
    for e in traffic.errors[:3]:
        print(f"     error: {e}", flush=True)


def failover(bed: ClusterBed, client: ClusterClient, scale: Scale, sections: Sections) -> None:
    """Section 3."""
    print("\n".join([
        "",
        (f"3. fail-over: a {FAILOVER_ROWS} x {FAILOVER_DIM} table row-wise over {HOSTS} daemons, 2 replicas a "
         f"shard; a reader (pooled, {FAILOVER_BAGS} bags x PF {FAILOVER_PF}) and a writer ({WRITE_IDS} rows a call) "
         f"in loops; {STEADY_SECONDS:g} s after they start one daemon is SIGKILLed; [cluster] lease_seconds = "
         f"{LEASE_SECONDS} (renewed every {LEASE_SECONDS / 3:.2f} s)"),
        ("   times in ms; longest: of the calls in flight within 2 leases of the kill; first ok / acked again: "
         "from the kill to the end of the first call started after it that succeeded; left live: from the kill "
         "until etcd no longer listed the daemon"),
        failover_row([name for name, _ in FAILOVER_COLUMNS])]), flush=True)
    for trial in range(scale.failover_trials):
        victim = (trial + 1) % HOSTS
        if sections.run(f"3. fail-over, trial {trial}", failover_trial, bed, client, trial, victim) \
                and trial + 1 < scale.failover_trials:
            log(f"section 3: starting host {victim} again")
            start_host(bed, victim, bed.base_dir / f"host{victim}-after-trial{trial}")
            wait_registered(client, HOSTS)
    print("   targets: no failed read or write; the longest read under one lease period", flush=True)


# ---- main --------------------------------------------------------------------------------------------

def header(bed: ClusterBed, scale: Scale, quick: bool) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    where = ("each daemon in its own network namespace (veth to the root namespace)" if bed.mode == "netns"
             else "every daemon on 127.0.0.1 (loopback mode: not root, or no namespaces)")
    return "\n".join([
        f"embtier cluster benchmark ({'quick' if quick else 'full'} run)",
        f"host: {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, Linux {platform.release()}",
        (f"bed: {HOSTS} embtierd + 1 etcd, {where}; all of them and this client share the {os.cpu_count()} CPUs; "
         f"daemon flags {' '.join(DAEMON_FLAGS)}, tiering disabled, [cluster] lease_seconds = {LEASE_SECONDS}")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller large tables, fewer repetitions (about 30 s)")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    sections = Sections()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embtier-bench-cluster-") as base, \
            ClusterBed(HOSTS, "ebench", Path(base)) as bed:
        log(f"starting {HOSTS} daemons ({bed.mode} mode)")
        for i in range(HOSTS):
            start_host(bed, i)
        publish_empty_plan(bed)
        print(header(bed, scale, args.quick), flush=True)
        with connect(bed) as client:
            sections.run("1. planner vs greedy", planner_vs_greedy, bed, client, scale)
            sections.run("2. fan-out overhead", fan_out, bed, client, scale, sections)
            sections.run("3. fail-over", failover, bed, client, scale, sections)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s", flush=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
