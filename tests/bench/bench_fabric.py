"""Benchmark of the emulated fabric's own costs and balance (in process, no root needed).

1. Port balance: a 100K x 16 table whose DRAM holds 4096 rows and CXL 16384
   (4 emulated ports, each a quarter of the tier's memory); Zipf(1.05)
   lookups build heat, one tiering interval moves the rows between tiers and
   levels the ports, then fresh Zipf traffic is counted per port.  Printed:
   busiest port / mean with the levelling (fabric.rebalance_tolerance 0.1),
   against the same run without it (tolerance 100: rows keep the port they
   were dealt on arrival, wherever the full tier had room), and against
   round robin by id on the same placement; the rows the levelling copied,
   as a share of the rows the interval moved between tiers, and its time as
   a share of the interval's.  Two traces: Zipf ranks scattered over the
   ids, and hot ids that are all multiples of 4 (the case round robin by id
   cannot balance).
2. Accounting cost: pooling 16K ids (512 bags x 32) with the kernel
   counting the rows per fabric part (what LookupPooled's accounting reads),
   and the device mode's partial pools, each as a ratio to plain pooling of
   the same ids, median of interleaved repetitions.

Each line is printed as soon as it is measured; a part that fails is
reported and the next one runs.

Run from the repository root:  .venv/bin/python -m tests.bench.bench_fabric
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import numpy as np
from embtier_tools.loadgen import ZipfIds
from embtierd import config
from embtierd.store.catalog import Store
from embtierd.tiering.config import TieringConfig
from embtierd.tiering.engine import TieringEngine

from tests.bench.bench_kernels import Sections

ROWS, DIM, PORTS = 100_000, 16, 4
CXL_BYTES = 1 << 20


def store_in(state: str, dram: str, cxl: str, tolerance: float = 0.1) -> Store:
    return Store(config.load(overrides={"state_dir": state, "tiers": {"dram": {"capacity": dram}, "cxl": {
        "capacity": cxl}, "scm": {"capacity": "64M"}}, "tiering": {"enabled": False},
        "fabric": {"rebalance_tolerance": tolerance}}))


@dataclass
class Balance:
    levelled: float      # busiest port / mean, with the levelling
    unlevelled: float    # the same without it
    round_robin: float   # round robin by id over the CXL rows of the levelled run
    copied_share: float  # rows the levelling copied / rows moved between tiers
    time_share: float    # the levelling's time / the interval's


def one_run(trace: str, tolerance: float) -> tuple[np.ndarray, np.ndarray, int, int, float, float]:
    """(per-port load, round robin per-port load, rows moved between tiers, rows copied by the levelling,
    levelling seconds, interval seconds) of one table through one tiering interval."""
    with tempfile.TemporaryDirectory() as state:
        store = store_in(state, "256K", str(CXL_BYTES), tolerance)
        store.create_table("t", ROWS, DIM, initializer="uniform", seed=1)
        span, scale = (ROWS, 1) if trace == "scattered" else (ROWS // 4, 4)
        zipf = ZipfIds(span, 1.05, seed=3)
        rng = np.random.default_rng(0)
        for _ in range(20):
            store.lookup("t", scale * zipf.draw(rng, 20_000))
        spread = store.mover.spread_ports
        timing = {"copied": 0, "seconds": 0.0}

        def timed(table, max_rows):
            start = time.perf_counter()
            copied = spread(table, max_rows)
            timing["seconds"] += time.perf_counter() - start
            timing["copied"] += copied
            return copied

        store.mover.spread_ports = timed
        start = time.perf_counter()
        moved = TieringEngine(store, TieringConfig(True, 1.0, 1 << 30, 0.25, aging_intervals=8)).run_once()
        interval = time.perf_counter() - start
        ids = scale * zipf.draw(np.random.default_rng(1), 1_000_000)
        parts = store.parts_of("t", ids)
        cxl_ids = ids[(parts >= 1) & (parts <= PORTS)]
        load = np.bincount(parts, minlength=PORTS + 2)[1:1 + PORTS]
        round_robin = np.bincount(cxl_ids % PORTS, minlength=PORTS)
        store.close()
    return load, round_robin, sum(moved.values()), timing["copied"], timing["seconds"], interval


def balance(trace: str) -> Balance:
    load, round_robin, moved, copied, seconds, interval = one_run(trace, 0.1)
    unlevelled = one_run(trace, 100.0)[0]
    ratio = [float(c.max() / c.mean()) for c in (load, unlevelled, round_robin)]
    return Balance(*ratio, copied / moved, seconds / interval)


def accounting_cost(reps: int = 30, calls: int = 50) -> tuple[float, float]:
    """Medians over reps of (pooling with the kernel counting rows per fabric part / pooling alone,
    the device mode's partial pools / pooling alone) on the same ids, interleaved."""
    with tempfile.TemporaryDirectory() as state:
        store = store_in(state, "16M", "64M")
        store.create_table("t", 200_000, 64, initializer="uniform", seed=1)
        ids = ZipfIds(200_000, 1.05, seed=2).draw(np.random.default_rng(3), 512 * 32)
        lengths = np.full(512, 32, dtype=np.int32)
        parts = len(store.part_names)

        def pool():
            store.lookup_pooled("t", ids, lengths)

        def counted():
            store.lookup_pooled("t", ids, lengths, part_rows=np.zeros(parts, dtype=np.int64))

        def device():
            store.pool_partials("t", ids, lengths, part_rows=np.zeros(parts, dtype=np.int64))

        ratios = []
        functions = [pool, counted, device]
        for rep in range(reps):
            seconds = {}
            for f in functions[rep % 3:] + functions[:rep % 3]:  # each goes first in turn
                start = time.perf_counter()
                for _ in range(calls):
                    f()
                seconds[f] = time.perf_counter() - start
            ratios.append((seconds[counted] / seconds[pool], seconds[device] / seconds[pool]))
        store.close()
    counted_ratio, device_ratio = np.median(np.array(ratios), axis=0)
    return float(counted_ratio), float(device_ratio)


def print_balance(trace: str) -> None:
    b = balance(trace)
    print(f"  {trace:<17}{b.levelled:8.2f}x{b.unlevelled:13.2f}x{b.round_robin:12.2f}x"
          f"{b.copied_share:20.2f}x{b.time_share:16.2f}x", flush=True)


def print_accounting() -> None:
    counted, device = accounting_cost()
    print(f"accounting: pooling with the kernel counting rows per fabric part = {counted:.2f}x pooling alone; "
          f"device mode (partition by part in C + one pooling call over parts x bags) = {device:.2f}x "
          f"(512 x 32 ids, dim 64, in process)", flush=True)


def main() -> int:
    sections = Sections()
    print(f"port balance: busiest port / mean, {PORTS} emulated ports, Zipf(1.05), a table of {ROWS} rows of "
          f"{DIM * 4} bytes with {CXL_BYTES // (DIM * 4)} in CXL")
    print(f"  {'trace':<17}{'levelled':>9}{'not levelled':>14}{'round robin':>13}"
          f"{'copies / tier moves':>21}{'time / interval':>17}", flush=True)
    for trace in ("scattered", "multiples of 4"):
        sections.run(f"port balance, {trace}", print_balance, trace)
    sections.run("accounting cost", print_accounting)
    return sections.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
