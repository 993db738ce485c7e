"""Benchmark of the emulated fabric's own costs and balance (in process, no root needed).

1. Port balance: a 100K x 16 table whose DRAM holds 4096 rows and CXL 16384
   (4 emulated ports); Zipf(1.05) lookups build heat, one tiering interval
   moves and spreads the rows, then fresh Zipf traffic is counted per port.
   Printed: busiest port / mean for the heat spreading, against two
   assignments measured on the same placement: contiguous slot ranges (one
   device per address range) and round robin by id.  Two traces: Zipf ranks
   scattered over the ids, and hot ids that are all multiples of 4 (the case
   round robin by id cannot balance).
2. Accounting cost: the per-request part lookup + count that LookupPooled's
   fabric accounting adds, as a ratio to the pooling kernel on the same
   16K ids (512 bags x 32), median of interleaved repetitions.

Run from the repository root:  .venv/bin/python -m tests.bench.bench_fabric
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from embtier.loadgen import ZipfIds
from embtierd import config
from embtierd.store import Store
from embtierd.tiering import TieringEngine
from embtierd.tiering_config import TieringConfig

ROWS, DIM, PORTS = 100_000, 16, 4


def store_in(state: str, dram: str, cxl: str) -> Store:
    return Store(config.load(overrides={"state_dir": state, "tiers": {"dram": {"capacity": dram}, "cxl": {
        "capacity": cxl}, "scm": {"capacity": "64M"}}, "tiering": {"enabled": False}}))


def balance(trace: str) -> tuple[float, float, float]:
    """(heat spreading, contiguous slot ranges, round robin by id): busiest port / mean port load."""
    with tempfile.TemporaryDirectory() as state:
        store = store_in(state, "256K", "1M")
        store.create_table("t", ROWS, DIM, initializer="uniform", seed=1)
        span, scale = (ROWS, 1) if trace == "scattered" else (ROWS // 4, 4)
        zipf = ZipfIds(span, 1.05, seed=3)
        rng = np.random.default_rng(0)
        for _ in range(20):
            store.lookup("t", scale * zipf.draw(rng, 20_000))
        TieringEngine(store, TieringConfig(True, 1.0, 1 << 30, 0.25, aging_intervals=8)).run_once()
        ids = scale * zipf.draw(np.random.default_rng(1), 1_000_000)
        table = store._tables["t"].native  # the placement map: which rows are in CXL, and their slots
        in_cxl = (table.loc[ids] >> table.tier_shift) == 1
        cxl_ids = ids[in_cxl]
        heat = np.bincount(store.parts_of("t", cxl_ids), minlength=PORTS + 2)[1:1 + PORTS]
        slots = table.loc[cxl_ids] & ((1 << table.tier_shift) - 1)
        contiguous = np.bincount(slots * PORTS // (16384), minlength=PORTS)[:PORTS]
        round_robin = np.bincount(cxl_ids % PORTS, minlength=PORTS)
        store.close()
    return tuple(float(c.max() / c.mean()) for c in (heat, contiguous, round_robin))


def accounting_cost(reps: int = 30, calls: int = 50) -> float:
    """Median over reps of (part lookup + count) / (pooling) time on the same ids."""
    with tempfile.TemporaryDirectory() as state:
        store = store_in(state, "16M", "64M")
        store.create_table("t", 200_000, 64, initializer="uniform", seed=1)
        ids = ZipfIds(200_000, 1.05, seed=2).draw(np.random.default_rng(3), 512 * 32)
        lengths = np.full(512, 32, dtype=np.int32)
        parts = len(store.part_names)

        def account():
            np.bincount(store.parts_of("t", ids), minlength=parts)

        def pool():
            store.lookup_pooled("t", ids, lengths)

        ratios = []
        for _ in range(reps):
            seconds = []
            for f in (account, pool):
                start = time.perf_counter()
                for _ in range(calls):
                    f()
                seconds.append(time.perf_counter() - start)
            ratios.append(seconds[0] / seconds[1])
        store.close()
    return float(np.median(ratios))


def main() -> int:
    print(f"port balance: busiest port / mean, {PORTS} emulated ports, Zipf(1.05), a table of {ROWS} rows with "
          f"16384 in CXL")
    print(f"  {'trace':<22}{'heat spreading':>15}{'contiguous slots':>18}{'round robin by id':>19}")
    for trace in ("scattered", "multiples of 4"):
        spread, contiguous, round_robin = balance(trace)
        print(f"  {trace:<22}{spread:14.2f}x{contiguous:17.2f}x{round_robin:18.2f}x", flush=True)
    print(f"accounting: part lookup + count = {accounting_cost():.2f}x the pooling kernel's time on the same "
          f"512 x 32 ids (in process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
