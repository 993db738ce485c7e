"""Benchmark of durability.  So far: the write-ahead log's throughput at
fsync "always" with 1 and 8 concurrent writers (group commit), through the
in-process store with its journal attached, as in the daemon.  (Checkpoint
write and capacity reductions and restore error will join it with the
checkpoints.)

Each writer sends WriteRows of BATCH_ROWS rows of a 2M x 64 float32 table
(Zipf(1.05) row ids), waiting for each acknowledgement (the log fsynced)
before the next, for SECONDS; 1 and 8 writers alternate rep by rep and the
ratio is the median of per-rep ratios.  Also "interval" and "off" with one
writer, for the cost of the fsync itself.

Run from the repository root:  .venv/bin/python -m tests.bench.bench_checkpoint [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from embtier.loadgen import ZipfIds
from embtierd import config
from embtierd.journal import Journal
from embtierd.store import Store
from embtierd.wal import WriteAheadLog

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[2] / ".state" / "bench"))
    args = parser.parse_args()
    reps, seconds = (3, 1.0) if args.quick else (10, 3.0)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="embtier-bench-checkpoint-", dir=args.dir))
    try:
        print(f"write-ahead log: WriteRows of {BATCH_ROWS} rows x {DIM} float32 into a {ROWS}-row table, "
              f"{reps} reps of {seconds:g} s, 1 and 8 writers alternating")
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
              f"over {len(fsyncs)} fsyncs; log {wal.bytes_written / 2**20:.0f} MiB")
        wal.close()
        store.close()
        for policy in ("interval", "off"):
            store, wal = open_store(run_dir / policy, policy)
            rate = np.median([writes_per_second(store, 1, seconds, rep) for rep in range(max(2, reps // 3))])
            print(f"   fsync {policy:8}, 1 writer : {rate:10,.0f} rows/s  ({rate / np.median(one):.1f}x always)")
            wal.close()
            store.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
