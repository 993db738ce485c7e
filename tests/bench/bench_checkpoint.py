"""Benchmark of durability: checkpoint write and capacity reductions and the
error of quantized restores (Check-N-Run's figures), and the write-ahead
log's throughput at fsync "always" with 1 and 8 writers (group commit).

Checkpoints.  A training-like update trace on a 2M x 64 float32 table
(rows ~ N(0, 0.1)): INTERVALS intervals, each adding N(0, 0.01) steps to a
set of rows drawn Zipf(1.05) until 1 % (one run) or 10 % (another) of the
rows are touched.  For each policy (full every interval; incremental =
changes since the last checkpoint; differential = since the last full;
auto = Check-N-Run's intermittent differential) and quant_bits (0 = exact,
8, 4, 3, 2; adaptive quantizer) the real Checkpointer runs on a real store
after an initial checkpoint and after each interval.  Printed:
  write: a full float32 checkpoint's bytes / the mean bytes written per
         interval (the initial checkpoint, the same for every policy, left out);
  capacity: one full float32 checkpoint / the bytes of the newest
         checkpoint's chain (what restoring the newest state needs), the
         mean over the intervals and the worst interval;
  error: mean over rows of |restored - true| / |true| (L2 per row) of the
         newest state rebuilt from its chain.
"full" is measured once per bit width (every full checkpoint of the table
is the same size).  The restored error does not depend on the policy (a
row's newest copy in any chain was taken after its last change, so it is
quantize(final value)); the table prints it per policy anyway, and the
plain (min/max) vs adaptive comparison once per bit width.  Checkpoints go
to a tmpfs directory (/dev/shm) when there is one: what is measured is
bytes, not the disk.

Write-ahead log.  Each writer sends WriteRows of BATCH_ROWS rows of a 2M x
64 float32 table (Zipf(1.05) row ids), waiting for each acknowledgement
(the log fsynced) before the next, for SECONDS; 1 and 8 writers alternate
rep by rep and the ratio is the median of per-rep ratios.  Also "interval"
and "off" with one writer, for the cost of the fsync itself.

Each part (the quantizer, each share of rows touched, the log) prints its
figures as soon as it has measured them; one that fails is reported and the
next one runs.

Run from the repository root:
  .venv/bin/python -m tests.bench.bench_checkpoint [--quick] [--only checkpoints|wal|quantizer]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from embtier_tools.loadgen import ZipfIds
from embtierd import codec, config, native
from embtierd.config import CheckpointConfig
from embtierd.durability.checkpoint import Checkpointer
from embtierd.durability.journal import Journal
from embtierd.durability.wal import WriteAheadLog
from embtierd.store.catalog import Store

from tests.bench.bench_kernels import Sections

ROWS, DIM, BATCH_ROWS = 2 << 20, 64, 64
ZIPF = ZipfIds(ROWS, 1.05, seed=1)


def open_store(state: Path, fsync: str, on_fsync=None) -> tuple[Store, WriteAheadLog]:
    store = Store(config.load(overrides={
        "state_dir": str(state),
        "tiers": {"dram": {"capacity": "640M"}, "cxl": {"capacity": 0}, "scm": {"capacity": "64M"}},
        "tiering": {"enabled": False}}))
    store.create_table("t", ROWS, DIM)
    wal = WriteAheadLog(state / "wal", fsync, on_fsync=on_fsync)
    store.journal = Journal(wal)
    return store, wal


def writes_per_second(store: Store, writers: int, seconds: float, seed: int) -> float:
    """Rows acknowledged per second with writers threads writing at once."""
    done = [0] * writers
    stop = threading.Event()
    batches = [ZIPF.draw(np.random.default_rng(seed * 100 + k), 64 * BATCH_ROWS).reshape(64, BATCH_ROWS)
               for k in range(writers)]  # drawn before the clock starts

    def writer(k: int) -> None:
        values = np.random.default_rng(k).standard_normal((BATCH_ROWS, DIM), dtype=np.float32)
        i = 0
        while not stop.is_set():
            store.write_rows("t", batches[k][i % 64], values)
            done[k] += BATCH_ROWS
            i += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


# ---- checkpoints ---------------------------------------------------------------------------------

POLICIES = ("full", "incremental", "differential", "auto")
BITS = (0, 8, 4, 3, 2)
INTERVALS = 10


def touched_rows(rows: int, fraction: float, interval: int, zipf: ZipfIds) -> np.ndarray:
    """The distinct rows one interval updates: Zipf draws until fraction of the rows are hit."""
    rng = np.random.default_rng([7, interval, int(fraction * 1000)])
    want = int(rows * fraction)
    seen = np.zeros(rows, dtype=bool)
    order = []
    while seen.sum() < want:
        ids = zipf.draw(rng, 1 << 20)
        fresh = ids[~seen[ids]]
        fresh = fresh[np.sort(np.unique(fresh, return_index=True)[1])]
        seen[fresh] = True
        order.append(fresh)
    return np.sort(np.concatenate(order)[:want])


class Trace:
    """The update trace, the same for every run: the initial rows and each interval's touched rows
    (their steps are drawn from a seed per interval when applied)."""

    def __init__(self, rows: int, fraction: float):
        self.rows, self.fraction = rows, fraction
        zipf = ZipfIds(rows, 1.05, seed=1)
        self.touched = [touched_rows(rows, fraction, i, zipf) for i in range(INTERVALS)]

    def initial(self, store: Store) -> None:
        for first in range(0, self.rows, 1 << 18):
            ids = np.arange(first, min(first + (1 << 18), self.rows))
            values = np.random.default_rng([3, first]).normal(0, 0.1, (ids.size, DIM)).astype(np.float32)
            store.write_rows("t", ids, values)

    def step(self, store: Store, interval: int) -> None:
        ids = self.touched[interval]
        steps = np.random.default_rng([5, interval]).normal(0, 0.01, (ids.size, DIM)).astype(np.float32)
        store.write_rows("t", ids, steps, mode="add")


def checkpoint_store(state: Path, rows: int) -> tuple[Store, WriteAheadLog]:
    store = Store(config.load(overrides={
        "state_dir": str(state),
        "tiers": {"dram": {"capacity": f"{rows * DIM * 4 // 2**20 + 64}M"}, "cxl": {"capacity": 0},
                  "scm": {"capacity": "16M"}},
        "tiering": {"enabled": False}}))
    store.create_table("t", rows, DIM)
    return store, WriteAheadLog(state / "wal", "off")


def relative_error(store: Store, rows: dict[str, np.ndarray]) -> float:
    truth = store.lookup("t", np.arange(store.spec("t")["num_rows"]))
    got = codec.decode(rows["t"], "float32", DIM)
    return float(np.mean(np.linalg.norm(got - truth, axis=1) / np.linalg.norm(truth, axis=1)))


def run_policy(trace: Trace, state: Path, policy: str, bits: int, quantizer: str) -> dict:
    """Bytes written per interval, bytes of the newest chain, and the restored error of one run."""
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    store, wal = checkpoint_store(state, trace.rows)
    trace.initial(store)
    ck = Checkpointer(store, wal, state / "checkpoints",
                      CheckpointConfig(interval_seconds=0, keep=INTERVALS + 2, quant_bits=bits, quantizer=quantizer))
    ck.take("full" if policy == "full" else policy)
    written, chains, kinds, seconds = [], [], [], []
    for interval in range(INTERVALS if policy != "full" else 1):
        trace.step(store, interval)
        info = ck.take(policy)
        written.append(info.bytes_written)
        chains.append(chain_bytes(ck, info.id))
        kinds.append(info.kind[0])
        seconds.append(info.duration_seconds)
    error = relative_error(store, ck.materialize(info.id))
    wal.close()
    store.close()
    shutil.rmtree(state, ignore_errors=True)
    return {"written": float(np.mean(written)), "chain": float(np.mean(chains)), "worst": max(chains),
            "error": error, "kinds": "".join(kinds), "seconds": float(np.mean(seconds))}


def chain_bytes(ck: Checkpointer, newest: int) -> int:
    """Bytes of the checkpoints a restore of newest reads."""
    infos = {i.id: i for i in ck.list()}
    total, node = 0, newest
    while node:
        total += infos[node].bytes_written
        node = infos[node].parent_id
    return total


def bench_checkpoints(sections: Sections, root: Path, rows: int) -> None:
    print(f"checkpoints: {rows} x {DIM} float32 table ({rows * DIM * 4 / 2**20:.0f} MiB of values), {INTERVALS} "
          f"intervals of Zipf(1.05) updates; reductions against the bytes of a full exact checkpoint taken in "
          f"the same run", flush=True)
    for fraction in (0.01, 0.10):
        sections.run(f"checkpoints, {fraction:.0%} of the rows touched", bench_fraction, root, rows, fraction)
    print("\n  targets at 10 %: write >= 17x at 8 bits with error <= 0.01; capacity >= 2.5x at 8 bits, >= 5x at 4;"
          " adaptive error below plain at 4 and 2 bits", flush=True)


def bench_fraction(root: Path, rows: int, fraction: float) -> None:
    """The table of one share of rows touched per interval, a line per policy and bit width as it is measured."""
    trace = Trace(rows, fraction)
    baseline = run_policy(trace, root / "run", "full", 0, "adaptive")
    full32 = baseline["written"]
    print(f"\n  {fraction:.0%} of the rows touched per interval (full exact checkpoint: {full32 / 2**20:.1f} MiB)")
    print(f"  {'policy':<13}{'bits':>5}{'write':>9}{'capacity':>10}{'(worst)':>9}{'error':>10}   "
          f"{'s/ckpt':>7}  kinds (F full, I incremental, D differential)")
    for policy in POLICIES:
        for bits in BITS:
            r = baseline if (policy, bits) == ("full", 0) else run_policy(trace, root / "run", policy, bits,
                                                                            "adaptive")
            print(f"  {policy:<13}{bits or 'exact':>5}{full32 / r['written']:8.1f}x{full32 / r['chain']:9.2f}x"
                  f"{full32 / r['worst']:8.2f}x{r['error']:10.5f}   {r['seconds']:7.2f}  {r['kinds']}", flush=True)
    if fraction == 0.10:
        print("\n  restored error, plain (min/max) vs adaptive asymmetric (incremental chain, 10 % run):")
        for bits in BITS[1:]:
            plain = run_policy(trace, root / "run", "incremental", bits, "minmax")["error"]
            adaptive = run_policy(trace, root / "run", "incremental", bits, "adaptive")["error"]
            print(f"    {bits} bits: minmax {plain:.5f}  adaptive {adaptive:.5f}  ({adaptive / plain:.2f}x)",
                  flush=True)


def bench_quantizer(rows: int, reps: int, threads: int) -> None:
    """Quantizer speed on one table's worth of rows, as ratios to copying the same rows (memory speed),
    interleaved rep by rep; rows/s beside them."""
    values = np.random.default_rng(0).normal(0, 0.1, (rows, DIM)).astype(np.float32)
    codes, lo, scale = native.quantize(values, 4, True, True)
    calls = {"copy (baseline)": values.copy,
             "minmax 4-bit": lambda: native.quantize(values, 4, False, True),
             "adaptive 4-bit": lambda: native.quantize(values, 4, True, True),
             "adaptive 8-bit": lambda: native.quantize(values, 8, True, True),
             "dequantize 4-bit": lambda: native.dequantize(codes, lo, scale, DIM, 4)}
    seconds = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    base = np.median(seconds["copy (baseline)"])
    print(f"quantizer: {rows} x {DIM} float32, {threads} kernel thread(s), median of {reps}")
    for name, s in seconds.items():
        print(f"  {name:<18} {np.median(s) / base:6.2f}x the copy   {rows / np.median(s) / 1e6:6.2f} M rows/s",
              flush=True)


def bench_wal(parent: Path, reps: int, seconds: float) -> None:
    """The log's throughput at fsync "always" with 1 and 8 writers, then "interval" and "off" with one."""
    parent.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="embtier-bench-checkpoint-", dir=parent))
    try:
        print(f"write-ahead log: WriteRows of {BATCH_ROWS} rows x {DIM} float32 into a {ROWS}-row table, "
              f"{reps} reps of {seconds:g} s, 1 and 8 writers alternating", flush=True)
        fsyncs: list[float] = []
        store, wal = open_store(run_dir / "always", "always", fsyncs.append)
        one, eight = [], []
        for rep in range(reps):
            one.append(writes_per_second(store, 1, seconds, rep))
            eight.append(writes_per_second(store, 8, seconds, rep))
        ratios = [e / o for e, o in zip(eight, one)]
        print(f"   fsync always, 1 writer : {np.median(one):10,.0f} rows/s")
        print(f"   fsync always, 8 writers: {np.median(eight):10,.0f} rows/s  -> {np.median(ratios):.2f}x one writer "
              f"[{np.percentile(ratios, 25):.2f}, {np.percentile(ratios, 75):.2f}] (target >= 4x)")
        print(f"   fsync latency p50 {np.median(fsyncs) * 1e3:.2f} ms, p99 {np.percentile(fsyncs, 99) * 1e3:.2f} ms "
              f"over {len(fsyncs)} fsyncs; log {wal.bytes_written / 2**20:.0f} MiB", flush=True)
        wal.close()
        store.close()
        for policy in ("interval", "off"):
            store, wal = open_store(run_dir / policy, policy)
            rate = np.median([writes_per_second(store, 1, seconds, rep) for rep in range(max(2, reps // 3))])
            print(f"   fsync {policy:8}, 1 writer : {rate:10,.0f} rows/s  ({rate / np.median(one):.1f}x always)",
                  flush=True)
            wal.close()
            store.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256K-row table and shorter log runs")
    parser.add_argument("--only", choices=["checkpoints", "wal", "quantizer"])
    parser.add_argument("--threads", type=int, default=2, help="kernel threads for the quantizer part")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[2] / ".state" / "bench"))
    args = parser.parse_args()
    reps, seconds = (3, 1.0) if args.quick else (10, 3.0)
    sections = Sections()
    if args.only in (None, "quantizer"):
        native.set_kernel_threads(args.threads)
        sections.run("quantizer", bench_quantizer, (256 << 10) if args.quick else ROWS, reps, args.threads)
        native.set_kernel_threads(1)
    if args.only in (None, "checkpoints"):
        shm = Path("/dev/shm")
        root = Path(tempfile.mkdtemp(prefix="embtier-bench-ckpt-", dir=shm if shm.is_dir() else args.dir))
        try:
            bench_checkpoints(sections, root, (256 << 10) if args.quick else ROWS)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if args.only in (None, "wal"):
        sections.run("write-ahead log", bench_wal, Path(args.dir), reps, seconds)
    return sections.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
