"""Tier sizing by simulation: replay an id trace against candidate DRAM and
CXL capacities under a tiering policy and report the hit ratio each tier
would get.

The simulator runs the daemon's own plan (policy_base.run_interval) on an
array placement: the trace is cut into intervals of ids_per_interval ids;
each interval's ids are served from the placement of that moment (that is
what the daemon measures), the sampled heat is counted the way the kernels
count it (1 in 2^heat_sample_shift positions, saturating uint8 per row),
then the policy moves rows within the bandwidth budget and ages the heat.
Rows start placed as the daemon places a new table: in id order, DRAM
first.

rows_per_unit > 1 simulates page-granular tiering (what kernel NUMA
balancing and TPP do): heat is counted, and rows move, per group of
rows_per_unit consecutive rows (a 4 KiB page holds 4096 // row_bytes rows).
Page counters do not saturate, so the comparison is about granularity,
not counter width.

Pure numpy: `embtier simulate` runs it without a daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from embtierd.tiering.policies import make_policy
from embtierd.tiering.policy_base import CXL, DRAM, SCM, UNLIMITED, run_interval


@dataclass(frozen=True)
class SimConfig:
    num_rows: int
    capacity_rows: tuple[int, int]     # rows of the table that DRAM and CXL can hold
    ids_per_interval: int              # lookups (ids) served between two policy intervals
    budget_rows: int = UNLIMITED       # rows the mover may move per interval (bandwidth x interval / row bytes)
    policy: str = "lfu"
    hysteresis: float = 0.25
    aging_intervals: int = 4
    heat_sample_shift: int = 3
    rows_per_unit: int = 1             # 1: row-granular; 4096 // row_bytes: page-granular
    seed: int = 0


@dataclass
class SimResult:
    hits: np.ndarray                   # [interval, tier]: ids served from each tier
    moved_rows: np.ndarray             # [interval]: rows moved after the interval
    backlog_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def hit_ratios(self, skip_intervals: int = 0) -> np.ndarray:
        """Share of ids served by DRAM, CXL and SCM over the intervals after skip_intervals."""
        hits = self.hits[skip_intervals:].sum(axis=0)
        return hits / max(1, hits.sum())


def initial_placement(units: int, capacity_units: tuple[int, int]) -> np.ndarray:
    placement = np.full(units, SCM, dtype=np.uint8)
    dram = min(units, capacity_units[0])
    cxl = min(units - dram, capacity_units[1])
    placement[:dram] = DRAM
    placement[dram:dram + cxl] = CXL
    return placement


def simulate(trace: np.ndarray, config: SimConfig) -> SimResult:
    """Replays trace (ids of one table, in request order) interval by interval."""
    trace = np.asarray(trace, dtype=np.int64).ravel()
    if trace.size and (trace.min() < 0 or trace.max() >= config.num_rows):
        bad = trace.min() if trace.min() < 0 else trace.max()
        raise ValueError(f"trace: id {bad} is out of range [0, {config.num_rows})")
    if config.ids_per_interval < 1:
        raise ValueError(f"ids_per_interval must be >= 1, got {config.ids_per_interval}")
    rpu = config.rows_per_unit
    units = -(-config.num_rows // rpu)
    capacity = (config.capacity_rows[0] // rpu, config.capacity_rows[1] // rpu)
    placement = initial_placement(units, capacity)
    heat = np.zeros(units, dtype=np.uint8 if rpu == 1 else np.uint32)
    policy = make_policy(config.policy, units, config.hysteresis, config.aging_intervals)
    budget = config.budget_rows // rpu if config.budget_rows < UNLIMITED else UNLIMITED
    step = 1 << config.heat_sample_shift
    rng = np.random.default_rng(config.seed)

    def move(rows: np.ndarray, tier: int) -> int:
        placement[rows] = tier
        return rows.size

    intervals = -(-trace.size // config.ids_per_interval)
    hits = np.zeros((intervals, 3), dtype=np.int64)
    moved = np.zeros(intervals, dtype=np.int64)
    backlog = np.zeros(intervals, dtype=np.int64)
    for i in range(intervals):
        ids = trace[i * config.ids_per_interval:(i + 1) * config.ids_per_interval] // rpu
        hits[i] = np.bincount(placement[ids], minlength=3)
        counts = np.bincount(ids[rng.integers(step)::step], minlength=units)
        if rpu == 1:
            np.minimum(heat.astype(np.int64) + counts, 255, out=counts)
        else:
            counts += heat
        heat[:] = counts
        used = np.bincount(placement, minlength=3)
        room = [int(capacity[0] - used[0]), int(capacity[1] - used[1]), UNLIMITED]
        result = run_interval(policy, heat, placement, room, budget, move)
        moved[i] = result.rows_moved * rpu
        backlog[i] = result.backlog_rows * rpu
    return SimResult(hits=hits, moved_rows=moved, backlog_rows=backlog)


def oracle_hit_ratios(trace: np.ndarray, num_rows: int, capacity_rows: tuple[int, int]) -> np.ndarray:
    """Hit ratios of the best static placement for trace: its most frequent rows in DRAM, the next in CXL."""
    counts = np.bincount(np.asarray(trace, dtype=np.int64).ravel(), minlength=num_rows)
    ranked = np.sort(counts)[::-1]
    dram = ranked[:capacity_rows[0]].sum()
    cxl = ranked[capacity_rows[0]:capacity_rows[0] + capacity_rows[1]].sum()
    total = max(1, ranked.sum())
    return np.array([dram, cxl, total - dram - cxl]) / total
