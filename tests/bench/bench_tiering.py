"""Benchmark of the tiering engine: hit ratios against the best static placement, the
simulator's prediction, page-granular and LRU tiering, recovery from a hot-set shift, and
what migration and heat tracking cost the lookup path.  One run, one in-process Store.

1. Setup: a table of 4M x 64 float32 (1 GiB) in a Store whose DRAM tier holds 10 % of its rows,
   CXL (emulated in DRAM on this host) 20 %, SCM (an O_DIRECT file in the state dir) the rest.
   The bench drives the intervals itself: an interval is 244 requests of 512 bags x 32 ids
   (3997696 ids: ~500K heat samples at the default heat_sample_shift 3) served by
   Store.lookup_pooled, then one TieringEngine.run_once() (LFU, hysteresis 0.25, heat halved every
   4 intervals, budget 256 MiB = 1M rows per interval; interval_seconds 1, so moves also stop 1 s
   after run_once starts).  Ids are bounded Zipf(alpha) over the rows, hot ranks scattered by a
   permutation (clients.loadgen.ZipfIds); rows served per tier come from lookup_pooled's tier_rows.
2. Steady state, alpha 0.9 / 1.05 / 1.2, each on a freshly created table (rows placed in id
   order, as the daemon places them): 8 warm-up intervals, then 3 measured ones.  Beside the
   measured DRAM / CXL / SCM hit ratios: the oracle (static placement of ZipfIds.scatter[:dram]
   in DRAM, the next ranks in CXL), as expected from the Zipf probabilities and as measured on
   the same ids; the simulator (daemon/simulate.py: the engine's own plan on arrays) replaying the
   same id trace with the same capacities, interval and budget, row-granular LFU, page-granular
   LFU (16 rows = one 4 KiB page moved as a unit, as kernel tiering does) and row-granular LRU.
   The in-sample oracle (best static placement for the measured ids themselves) is a footnote.
   The simulator has the byte budget but no deadline, so where the engine's moves are cut short
   by interval_seconds its prediction runs ahead: rows moved per interval are printed for both.
3. Hot-set shift (alpha 1.05, after step 2's measured intervals): the workload switches to a
   ZipfIds of another seed; DRAM hit ratio per interval for 12 intervals against the oracle of the
   new hot set (its static placement on the same ids).
4. Lookups while the engine migrates.  In the daemon the engine runs in its own thread beside the
   serving threads, so a "with" window runs run_once() in a background thread while this
   thread times lookups (1 kernel thread), after a second shift (and a quarter interval of the new
   ids) so that each interval has real moves to make.  Two engine arms per rep, in alternating
   order: "quiet", the engine as it ships (its reads of rows off SCM paced at
   SCM_READ_ROWS_PER_SECOND in runs of reads from SCM_READ_DEPTH in flight: Pacer), and "unpaced",
   the same engine reading SCM as fast as the device goes (MOVE_BATCH_ROWS a batch, the lookups'
   queue depth: the engine before quiet migration).  Migration changes the placement the lookups
   see, so every "with" window is bracketed by two windows with the engine idle, one just before
   it and one just after it (idle / one arm / idle / the other / idle), and its rate is compared
   with the mean of the two (the placement drift cancels to first order).  Two kinds of lookups
   share every window, each call on fresh ids, each timed over an equal share of the window: the
   shifted workload (rows in all three tiers: SCM reads contend with the moves' reads; the "with
   SCM promotions" figure) and the previous hot set's top ranks, homed in DRAM throughout
   (checked with tier_rows: CPU, memory, GIL and table-lock interference only; the "memory-only"
   figure).  A last window per rep is the control: another thread reads SCM rows the way the
   unpaced mover does (Store.read_encoded, MOVE_BATCH_ROWS at a time) for as long as that rep's
   unpaced run_once took, moving nothing; it tells the cost of the moves' I/O from that of the
   engine.  Also: the duration of run_once and the rows it moved per arm, and of the plan alone
   (policy_base.run_interval on copies of the arrays, no I/O).  --migration-only runs this step
   alone, after warm-up intervals in place of steps 2 and 3 (--reps: its repetitions).
5. Tracking overhead: the heat counters cannot be turned off (kernels.heat_sample_shift is
   0..16), so shift 3 (the default, 1 access in 8 counted) is compared with shift 16 (1 in 65536,
   effectively off) and shift 0 (every access), each on a DRAM-only copy of the table in a store
   of its own, in interleaved repetitions (order rotated) on fresh Zipf(1.05) id batches.
6. Tracking accuracy: the share of the true top-10 % rows (ZipfIds.scatter[:rows // 10]) that the
   uint8 counters rank in their top 10 % after one aging period (4 intervals of ids counted from
   zero), at shift 3 and shift 0 on the same ids; ties at the threshold are broken at random
   (expected overlap).  For reference: exact counts of the same ids, and the tiered table's aged
   counters at the end of step 2 (what the policy ranked).
7. Time effect of placement (tiers.cxl.emulated_latency_ns): a table half in DRAM, half in the
   emulated CXL tier; pooling rows homed in CXL against as many homed in DRAM, interleaved, with
   0, 100 and 300 ns injected per CXL row.  Every figure made with injected latency says so.

The host is shared and noisy: timed comparisons are interleaved and ratios are medians of
per-repetition ratios (25-75 % range in brackets).  Hit ratios are not timed, but the engine's
moves stop at its deadline, so they depend a little on the machine's speed.

Each step prints its figures as soon as it has measured them (step 2 alpha by alpha, in the order
run: the shift alpha last, its summary then steps 3 and 4 on the same table); a step that fails is
reported and the next one runs.

Run from the repository root:  .venv/bin/python -m tests.bench.bench_tiering [--quick] [--dir DIR]
The full run takes about 10 minutes, most of it in SCM reads (the lookups of rows on SCM and the
promotions); --quick: a 256K-row table and fewer intervals and repetitions, under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from embtier_tools.loadgen import ZipfIds
from embtierd import config, native
from embtierd.store.catalog import Store
from embtierd.tiering.config import TieringConfig
from embtierd.tiering.engine import (
    MOVE_BATCH_ROWS,
    SCM_READ_DEPTH,
    SCM_READ_ROWS_PER_SECOND,
    TieringEngine,
    lower_priority,
)
from embtierd.tiering.policies import make_policy
from embtierd.tiering.policy_base import UNLIMITED, run_interval
from embtierd.tiering.simulate import SimConfig, SimResult, oracle_hit_ratios, simulate

from tests.bench.bench_kernels import Sections, fs_type

TABLE = "emb"
DIM = 64
BAGS = 512
BAG_LEN = 32
REQUEST_IDS = BAGS * BAG_LEN
DRAM_SHARE, CXL_SHARE = 0.10, 0.20
ALPHAS = (0.9, 1.05, 1.2)
SHIFT_ALPHA = 1.05
HEAT_SAMPLE_SHIFT = 3
ENGINE = TieringConfig(enabled=True, interval_seconds=1.0, bandwidth_bytes_per_second=256 << 20,
                       hysteresis=0.25, aging_intervals=4, policy="lfu")
DRAM, CXL, SCM = 0, 1, 2
SEED_STEADY, SEED_SHIFT, SEED_SECOND_SHIFT = 0, 1, 2
HOT_CALL_IDS = 4 * REQUEST_IDS       # hot-only lookups in step 4: 2048 bags a call
BASELINE_WINDOW_SECONDS = 1.0        # step 4's engine-idle windows
OVERHEAD_CALLS = 16                  # step 5: requests timed together per participant and repetition
TARGET_ORACLE, TARGET_SHIFT_INTERVALS, TARGET_WITHIN = 0.95, 10, 0.95
TARGET_MIGRATION, TARGET_TRACKING = 0.95, 0.95


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one run."""

    rows: int
    requests_per_interval: int
    warmup_intervals: int
    measured_intervals: int
    shift_intervals: int
    migration_reps: int
    overhead_reps: int

    @property
    def ids_per_interval(self) -> int:
        return self.requests_per_interval * REQUEST_IDS

    @property
    def capacity_rows(self) -> tuple[int, int]:
        """Rows of the table that DRAM and CXL hold."""
        return round(self.rows * DRAM_SHARE), round(self.rows * CXL_SHARE)


FULL = Plan(rows=4 << 20, requests_per_interval=244, warmup_intervals=8, measured_intervals=3, shift_intervals=12,
            migration_reps=8, overhead_reps=30)
QUICK = Plan(rows=256 << 10, requests_per_interval=16, warmup_intervals=4, measured_intervals=2, shift_intervals=6,
             migration_reps=3, overhead_reps=6)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lengths_for(ids: np.ndarray) -> np.ndarray:
    return np.full(ids.size // BAG_LEN, BAG_LEN, dtype=np.int32)


def lookup(store: Store, ids: np.ndarray, tiers: np.ndarray) -> float:
    """One pooled lookup of ids (bags of BAG_LEN); adds the rows each tier served to tiers; its seconds."""
    got = np.zeros(3, dtype=np.int64)
    start = time.perf_counter()
    store.lookup_pooled(TABLE, ids, lengths_for(ids), tier_rows=got)
    elapsed = time.perf_counter() - start
    tiers += got
    return elapsed


def serve(store: Store, ids: np.ndarray) -> np.ndarray:
    """ids as consecutive requests of BAGS bags; rows served per tier."""
    tiers = np.zeros(3, dtype=np.int64)
    for start in range(0, ids.size, REQUEST_IDS):
        lookup(store, ids[start:start + REQUEST_IDS], tiers)
    return tiers


def shares(counts: np.ndarray) -> np.ndarray:
    return counts / max(1, counts.sum())


def quantiles(values: list[float]) -> tuple[float, float, float]:
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    return float(med), float(q25), float(q75)


class HotSet:
    """A ZipfIds workload with the oracle placement of its rows for given DRAM and CXL capacities."""

    def __init__(self, rows: int, alpha: float, seed: int, capacity_rows: tuple[int, int]):
        self.zipf = ZipfIds(rows, alpha, seed)
        dram, cxl = capacity_rows
        self.oracle_tier = np.full(rows, SCM, dtype=np.uint8)
        self.oracle_tier[self.zipf.scatter[:dram]] = DRAM
        self.oracle_tier[self.zipf.scatter[dram:dram + cxl]] = CXL
        cdf = self.zipf.cdf
        self.expected = np.array([cdf[dram - 1], cdf[dram + cxl - 1] - cdf[dram - 1], 1 - cdf[dram + cxl - 1]])

    def draw(self, rng: np.random.Generator, size: int, top_ranks: int | None = None) -> np.ndarray:
        """size i.i.d. ids, as ZipfIds.draw (only the top_ranks most popular rows, when given).

        The uniforms are sorted so that the CDF search walks it once instead of missing the cache
        at every step, then the ranks are shuffled back into a random order: the same distribution,
        drawn several times faster."""
        cdf = self.zipf.cdf
        u = np.sort(rng.random(size))
        if top_ranks is not None:
            u *= cdf[top_ranks - 1]
        ranks = np.searchsorted(cdf, u, side="right")
        rng.shuffle(ranks)
        return self.zipf.scatter[np.minimum(ranks, cdf.size - 1)].astype(np.int64)

    def oracle_hits(self, ids: np.ndarray) -> np.ndarray:
        """Hit ratios of the oracle placement on ids."""
        return shares(np.bincount(self.oracle_tier[ids], minlength=3))


@dataclass
class Interval:
    hits: np.ndarray        # rows served per tier
    oracle: np.ndarray      # oracle placement's hit ratios on the same ids
    moved_rows: int
    backlog_rows: int
    run_seconds: float


class TieredTable:
    """The table in a store of its own (DRAM 10 % of its rows, CXL 20 %, SCM the rest), with its engine."""

    def __init__(self, plan: Plan, parent: Path, label: str):
        self.plan = plan
        self.state = Path(tempfile.mkdtemp(prefix=f"tiered-{label}-", dir=parent))
        self.stride = native.row_stride(DIM, "float32")
        self.capacity_rows = plan.capacity_rows
        self.store = Store(config.load(overrides={
            "state_dir": str(self.state),
            "tiers": {"dram": {"capacity": self.capacity_rows[0] * self.stride},
                      "cxl": {"capacity": self.capacity_rows[1] * self.stride},
                      "scm": {"capacity": plan.rows * self.stride * 5 // 4}},
            "kernels": {"kernel_threads": 1, "heat_sample_shift": HEAT_SAMPLE_SHIFT}}))
        try:
            self.info = self.store.create_table(TABLE, plan.rows, DIM, initializer="uniform", seed=1)
            placed = (self.info.rows_by_tier["dram"], self.info.rows_by_tier["cxl"])
            if placed != self.capacity_rows:
                raise RuntimeError(f"rows placed in dram, cxl: {placed}; wanted {self.capacity_rows}")
        except BaseException:
            self.close()
            raise
        self.engine = TieringEngine(self.store, ENGINE)

    @property
    def budget_rows(self) -> int:
        return int(ENGINE.bandwidth_bytes_per_second * ENGINE.interval_seconds) // self.stride

    def interval(self, ids: np.ndarray, hot: HotSet) -> Interval:
        """Serves ids, then runs one engine interval."""
        hits = serve(self.store, ids)
        start = time.perf_counter()
        moved = self.engine.run_once()
        elapsed = time.perf_counter() - start
        return Interval(hits, hot.oracle_hits(ids), sum(moved.values()), self.engine.state(TABLE).backlog_rows, elapsed)

    def planning_seconds(self) -> float:
        """One interval's plan over copies of the table's heat and placement, moves applied to the copy only."""
        heat, placement = self.store.heat(TABLE).copy(), self.store.placement(TABLE)
        room = [self.store.room_rows(TABLE, DRAM), self.store.room_rows(TABLE, CXL), UNLIMITED]
        policy = make_policy(ENGINE.policy, self.plan.rows, ENGINE.hysteresis, ENGINE.aging_intervals)

        def move(rows: np.ndarray, tier: int) -> int:
            placement[rows] = tier
            return rows.size

        start = time.perf_counter()
        run_interval(policy, heat, placement, room, self.budget_rows, move)
        return time.perf_counter() - start

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.state, ignore_errors=True)


# ---- 2. steady state ----------------------------------------------------------------------------

@dataclass
class SteadyState:
    alpha: float
    intervals: list[Interval]
    expected_oracle: np.ndarray
    in_sample_oracle: np.ndarray
    rows_by_tier: dict[str, int]       # rows homed in each tier after the measured intervals
    heat: np.ndarray                   # the table's aged counters after them (what the policy ranked)
    sims: dict[str, SimResult] = field(default_factory=dict)

    def measured(self, skip: int) -> tuple[np.ndarray, np.ndarray]:
        """(tier hit ratios, oracle placement's hit ratios) over the intervals after skip."""
        hits = sum(i.hits for i in self.intervals[skip:])
        oracle = np.mean([i.oracle for i in self.intervals[skip:]], axis=0)
        return shares(hits), oracle


def run_intervals(tiered: TieredTable, hot: HotSet, rng: np.random.Generator, count: int,
                  trace: np.ndarray | None = None, what: str = "") -> list[Interval]:
    """count intervals of hot's ids; their ids go to trace (count x ids_per_interval) when given."""
    out = []
    n = tiered.plan.ids_per_interval
    for i in range(count):
        ids = hot.draw(rng, n)
        if trace is not None:
            trace[i * n:(i + 1) * n] = ids
        out.append(tiered.interval(ids, hot))
        last = out[-1]
        log(f"{what} interval {i + 1}/{count}: dram {shares(last.hits)[DRAM]:.4f} (oracle "
            f"{last.oracle[DRAM]:.4f}), moved {last.moved_rows}, backlog {last.backlog_rows}, "
            f"run_once {last.run_seconds:.2f} s")
    return out


def simulations(trace: np.ndarray, tiered: TieredTable) -> dict[str, SimResult]:
    """The simulator on the same trace: row-granular LFU, page-granular LFU, row-granular LRU."""
    base = {"num_rows": tiered.plan.rows, "capacity_rows": tiered.capacity_rows,
            "ids_per_interval": tiered.plan.ids_per_interval, "budget_rows": tiered.budget_rows,
            "hysteresis": ENGINE.hysteresis, "aging_intervals": ENGINE.aging_intervals,
            "heat_sample_shift": HEAT_SAMPLE_SHIFT}
    page_rows = 4096 // tiered.stride
    variants = {"sim: LFU, rows": SimConfig(policy="lfu", **base),
                f"sim: LFU, 4 KiB pages ({page_rows} rows)": SimConfig(policy="lfu", rows_per_unit=page_rows, **base),
                "sim: LRU, rows": SimConfig(policy="lru", **base)}
    out = {}
    for name, cfg in variants.items():
        start = time.perf_counter()
        out[name] = simulate(trace, cfg)
        log(f"{name}: {time.perf_counter() - start:.1f} s")
    return out


def steady_state(tiered: TieredTable, alpha: float, rng: np.random.Generator) -> tuple[SteadyState, np.ndarray]:
    """Step 2 for one alpha; also returns the id trace (for the simulator)."""
    plan = tiered.plan
    hot = HotSet(plan.rows, alpha, SEED_STEADY, tiered.capacity_rows)
    count = plan.warmup_intervals + plan.measured_intervals
    trace = np.empty(count * plan.ids_per_interval, dtype=np.int64)
    intervals = run_intervals(tiered, hot, rng, count, trace, f"alpha {alpha}")
    measured = trace[plan.warmup_intervals * plan.ids_per_interval:]
    result = SteadyState(alpha, intervals, hot.expected, oracle_hit_ratios(measured, plan.rows, tiered.capacity_rows),
                         tiered.store.describe(TABLE).rows_by_tier, tiered.store.heat(TABLE).copy())
    return result, trace


# ---- 3. hot-set shift ---------------------------------------------------------------------------

def shift_recovery(tiered: TieredTable, rng: np.random.Generator) -> list[Interval]:
    hot = HotSet(tiered.plan.rows, SHIFT_ALPHA, SEED_SHIFT, tiered.capacity_rows)
    return run_intervals(tiered, hot, rng, tiered.plan.shift_intervals, what="shift")


# ---- 4. lookups while the engine migrates -------------------------------------------------------

@dataclass
class Window:
    """Lookups of one kind in one window: rows, seconds spent in the calls, rows per tier."""

    rows: int = 0
    seconds: float = 0.0
    tiers: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else float("nan")


ENGINE_ARMS = ("quiet", "unpaced")  # step 4: the engine as it ships, and with its moves' SCM reads unpaced


@contextlib.contextmanager
def engine_arm(tiered: TieredTable, arm: str) -> Iterator[None]:
    """The engine as it ships ("quiet": SCM reads paced, short batches, few in flight), or "unpaced": the
    moves read SCM as fast as the device goes, MOVE_BATCH_ROWS at a time, kernels.scm_queue_depth in flight
    (the engine before quiet migration)."""
    engine = tiered.engine
    saved = engine.scm_rows_per_second, engine.scm_read_depth
    if arm == "unpaced":
        engine.scm_rows_per_second, engine.scm_read_depth = math.inf, None
    try:
        yield
    finally:
        engine.scm_rows_per_second, engine.scm_read_depth = saved


@dataclass
class MigrationRep:
    windows: dict[str, dict[str, Window]]   # window (idle 1-3, an engine arm, scm reads) -> kind -> window
    idle: dict[str, tuple[str, ...]]        # an arm -> the idle windows its rate is compared with
    run_seconds: dict[str, float]           # engine arm -> its run_once's seconds
    moved_rows: dict[str, int]              # engine arm -> rows its run_once moved

    def ratio(self, kind: str, arm: str) -> float:
        """The arm's rate against the mean of the idle windows around it (for the SCM-reads control, the
        window just before it)."""
        return self.windows[arm][kind].rate / np.mean([self.windows[a][kind].rate for a in self.idle[arm]])


def lookup_window(store: Store, draws: dict[str, Callable[[], np.ndarray]], going: Callable[[], bool]
                  ) -> dict[str, Window]:
    """Calls of each kind (fresh ids every call), one of each first, then while going() the kind that has
    had the least time so far: each kind is timed over an equal share of the window (a call of rows on
    SCM takes some 30-100 times as long as one of DRAM-resident rows)."""
    windows = {kind: Window() for kind in draws}
    kind = next(iter(draws))
    while True:
        ids = draws[kind]()
        w = windows[kind]
        w.seconds += lookup(store, ids, w.tiers)
        w.rows += ids.size
        kind = min(windows, key=lambda k: windows[k].seconds)
        if not going() and all(w.rows for w in windows.values()):
            return windows


def scm_reads(store: Store, seconds: float, seed: int) -> int:
    """Reads random SCM-homed rows in the unpaced mover's batches (Store.read_encoded: the read path
    of a promotion) for seconds, moving nothing; rows read."""
    rng = np.random.default_rng(seed)
    homed = np.flatnonzero(store.placement(TABLE) == SCM)
    until, rows = time.perf_counter() + seconds, 0
    while time.perf_counter() < until:
        store.read_encoded(TABLE, homed[rng.integers(0, homed.size, MOVE_BATCH_ROWS)])
        rows += MOVE_BATCH_ROWS
    return rows


def migration_interference(tiered: TieredTable, rng: np.random.Generator) -> list[MigrationRep]:
    """Step 4: after a second shift (and a quarter interval of the new ids, for a backlog of moves),
    reps of engine idle / run_once of one arm in a thread / idle / run_once of the other arm / idle /
    SCM reads in a thread (the control); the arms' order alternates from rep to rep."""
    plan, store = tiered.plan, tiered.store
    old = HotSet(plan.rows, SHIFT_ALPHA, SEED_SHIFT, tiered.capacity_rows)
    new = HotSet(plan.rows, SHIFT_ALPHA, SEED_SECOND_SHIFT, tiered.capacity_rows)
    serve(store, new.draw(rng, plan.ids_per_interval // 4))
    hot_ranks = tiered.capacity_rows[0] // 8
    draws = {"shifted workload": lambda: new.draw(rng, REQUEST_IDS),
             "DRAM-resident hot rows": lambda: old.draw(rng, HOT_CALL_IDS, hot_ranks)}

    def idle_window() -> dict[str, Window]:
        until = time.perf_counter() + BASELINE_WINDOW_SECONDS
        return lookup_window(store, draws, lambda: time.perf_counter() < until)

    def beside(work: Callable[[], object]) -> tuple[dict[str, Window], object]:
        running = background.submit(work)
        windows = lookup_window(store, draws, lambda: not running.done())
        return windows, running.result()

    def engine_interval(arm: str) -> tuple[float, int]:
        with engine_arm(tiered, arm):
            start = time.perf_counter()
            moved = sum(tiered.engine.run_once().values())
            return time.perf_counter() - start, moved

    reps = []
    # the engine's thread in the daemon runs at a lower priority; so does this one (and the control's reads)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiering", initializer=lower_priority) as background:
        for rep in range(plan.migration_reps):
            arms = ENGINE_ARMS[rep % 2:] + ENGINE_ARMS[:rep % 2]
            windows = {"idle 1": idle_window()}
            seconds, moved = {}, {}
            for k, arm in enumerate(arms, 2):
                windows[arm], (seconds[arm], moved[arm]) = beside(lambda arm=arm: engine_interval(arm))
                windows[f"idle {k}"] = idle_window()
            idle = {arms[0]: ("idle 1", "idle 2"), arms[1]: ("idle 2", "idle 3"), "scm reads": ("idle 3",)}
            windows["scm reads"], _ = beside(lambda s=seconds["unpaced"], rep=rep: scm_reads(store, s, rep))
            reps.append(MigrationRep(windows, idle, seconds, moved))
            log(f"migration rep {rep + 1}/{plan.migration_reps}: " + "; ".join(
                f"{arm} run_once {seconds[arm]:.2f} s, moved {moved[arm]}, ratios " +
                ", ".join(f"{k} {reps[-1].ratio(k, arm):.3f}" for k in draws) for arm in arms) +
                "; SCM reads " + ", ".join(f"{k} {reps[-1].ratio(k, 'scm reads'):.3f}" for k in draws))
    return reps


# ---- 5. and 6. tracking overhead and accuracy ---------------------------------------------------

@contextlib.contextmanager
def dram_copy(plan: Plan, parent: Path, shift: int) -> Iterator[Store]:
    """The table (same values) alone in DRAM, in a store whose kernels count 1 access in 2^shift."""
    state = Path(tempfile.mkdtemp(prefix=f"dram-shift{shift}-", dir=parent))
    nbytes = plan.rows * native.row_stride(DIM, "float32")
    store = Store(config.load(overrides={
        "state_dir": str(state),
        "tiers": {"dram": {"capacity": nbytes + (16 << 20)}, "cxl": {"capacity": 0}, "scm": {"capacity": "16M"}},
        "kernels": {"kernel_threads": 1, "heat_sample_shift": shift}}))
    try:
        store.create_table(TABLE, plan.rows, DIM, initializer="uniform", seed=1)
        yield store
    finally:
        store.close()
        shutil.rmtree(state, ignore_errors=True)


def tracking_overhead(stores: dict[int, Store], hot: HotSet, plan: Plan, rng: np.random.Generator
                      ) -> dict[int, list[float]]:
    """Seconds per repetition of OVERHEAD_CALLS requests per shift, in rotated order, fresh ids each."""
    times: dict[int, list[float]] = {shift: [] for shift in stores}
    order = list(stores)
    tiers = np.zeros(3, dtype=np.int64)
    for rep in range(plan.overhead_reps + 2):   # the first two are warm-up
        batches = {shift: hot.draw(rng, OVERHEAD_CALLS * REQUEST_IDS) for shift in stores}
        for shift in order[rep % len(order):] + order[:rep % len(order)]:
            ids = batches[shift]
            elapsed = sum(lookup(stores[shift], ids[s:s + REQUEST_IDS], tiers) for s in range(0, ids.size, REQUEST_IDS))
            if rep >= 2:
                times[shift].append(elapsed)
    return times


@dataclass
class Ranking:
    overlap: float       # share of the true top K the counters rank in their top K (ties at random)
    threshold: int       # counter value of the K-th row
    by_tie: float        # share of the top-K slots decided among rows tied at the threshold


def top_k_overlap(counts: np.ndarray, truth: np.ndarray) -> Ranking:
    k = truth.size
    threshold = int(np.partition(counts, counts.size - k)[counts.size - k])
    above, tied = counts > threshold, counts == threshold
    slots = k - int(np.count_nonzero(above))
    hit = np.count_nonzero(above[truth]) + np.count_nonzero(tied[truth]) * slots / np.count_nonzero(tied)
    return Ranking(hit / k, threshold, slots / k)


def tracking_accuracy(stores: dict[int, Store], hot: HotSet, plan: Plan, rng: np.random.Generator
                      ) -> dict[str, Ranking]:
    """Counters zeroed, one aging period of the same ids through every store, then their top 10 %."""
    truth = hot.zipf.scatter[:plan.rows // 10]
    for store in stores.values():
        store.heat(TABLE, writable=True)[:] = 0
    exact = np.zeros(plan.rows, dtype=np.int64)
    for _ in range(ENGINE.aging_intervals):
        ids = hot.draw(rng, plan.ids_per_interval)
        exact += np.bincount(ids, minlength=plan.rows)
        for store in stores.values():
            serve(store, ids)
    out = {f"heat_sample_shift {shift}": top_k_overlap(store.heat(TABLE), truth) for shift, store in stores.items()}
    out["exact counts of the same ids"] = top_k_overlap(exact, truth)
    return out


# ---- report -------------------------------------------------------------------------------------

def fmt_hits(r: np.ndarray) -> str:
    return f"{r[DRAM]:7.4f} {r[CXL]:7.4f} {r[SCM]:7.4f}"


def print_setup(plan: Plan, tiered: TieredTable, where: str, quick: bool) -> None:
    info, tiers = tiered.info, {t.name: t for t in tiered.store.tier_infos()}
    rows = info.rows_by_tier
    print(f"embtier tiering benchmark{' (quick)' if quick else ''}: table {plan.rows} x {DIM} "
          f"float32 ({plan.rows * tiered.stride / 2**30:.2f} GiB), kernels {native.isa()}, 1 kernel thread")
    print("\n1. setup")
    print(f"   rows per tier: dram {rows['dram']} ({rows['dram'] / plan.rows:.1%}), cxl {rows['cxl']} "
          f"({rows['cxl'] / plan.rows:.1%}{', emulated in DRAM' if info.emulated_by_tier['cxl'] else ''}), "
          f"scm {rows['scm']} ({rows['scm'] / plan.rows:.1%}, O_DIRECT file in {where})")
    print(f"   tier capacities: dram {tiers['dram'].capacity_bytes / 2**20:.1f} MiB, cxl "
          f"{tiers['cxl'].capacity_bytes / 2**20:.1f} MiB, scm {tiers['scm'].capacity_bytes / 2**20:.1f} MiB")
    print(f"   engine: {ENGINE.policy}, hysteresis {ENGINE.hysteresis}, heat halved every {ENGINE.aging_intervals} "
          f"intervals, budget {ENGINE.bandwidth_bytes_per_second >> 20} MiB = {tiered.budget_rows} rows per "
          f"interval, moves stop {ENGINE.interval_seconds:g} s after an interval starts")
    print(f"   interval: {plan.requests_per_interval} requests x {BAGS} bags x {BAG_LEN} ids = {plan.ids_per_interval} "
          f"ids (~{plan.ids_per_interval >> HEAT_SAMPLE_SHIFT} heat samples at heat_sample_shift {HEAT_SAMPLE_SHIFT}),"
          f" then run_once()", flush=True)


def print_steady_head(plan: Plan) -> None:
    print(f"\n2. steady state: {plan.warmup_intervals} warm-up intervals, then {plan.measured_intervals} measured "
          f"({plan.measured_intervals * plan.ids_per_interval / 1e6:.1f}M ids); hit ratios per id")
    print(f"   {'alpha':>5}  {'placement':<34} {'DRAM':>7} {'CXL':>7} {'SCM':>7} {'SCM/bag':>8}  DRAM vs oracle",
          flush=True)


def print_steady(plan: Plan, r: SteadyState) -> None:
    """Step 2's lines of one alpha."""
    skip = plan.warmup_intervals
    hits, oracle = r.measured(skip)
    rows = [("measured (engine, tier_rows)", hits), ("oracle: expected (Zipf)", r.expected_oracle),
            ("oracle: placement on the same ids", oracle)]
    rows += [(name, sim.hit_ratios(skip)) for name, sim in r.sims.items()]
    for k, (name, h) in enumerate(rows):
        label = f"{r.alpha:5.2f}" if k == 0 else " " * 5
        print(f"   {label}  {name:<34} {fmt_hits(h)} {h[SCM] * BAG_LEN:8.2f}  {h[DRAM] / oracle[DRAM]:6.3f}x")
    sims = list(r.sims.values())
    trace = " ".join(f"{shares(i.hits)[DRAM]:.3f}" for i in r.intervals)
    print(f"          DRAM hit ratio by interval: {trace}")
    measured = r.intervals[skip:]
    print(f"          rows moved per measured interval: engine {np.median([i.moved_rows for i in measured]):.0f}"
          f" (backlog {np.median([i.backlog_rows for i in measured]):.0f}, run_once "
          f"{np.median([i.run_seconds for i in measured]):.2f} s), sim LFU rows "
          f"{np.median(sims[0].moved_rows[skip:]):.0f}")
    homed = r.rows_by_tier
    print(f"          rows homed after them: dram {homed['dram']} ({homed['dram'] / plan.capacity_rows[0]:.1%} of its "
          f"share), cxl {homed['cxl']} ({homed['cxl'] / plan.capacity_rows[1]:.1%}), scm {homed['scm']}", flush=True)


def print_steady_summary(plan: Plan, results: list[SteadyState]) -> None:
    """Step 2's closing lines, over the alphas measured (SHIFT_ALPHA among them)."""
    skip = plan.warmup_intervals
    print("   in-sample oracle (best static placement for the measured ids themselves), DRAM / CXL: " + ", ".join(
        f"alpha {r.alpha}: {r.in_sample_oracle[DRAM]:.4f} / {r.in_sample_oracle[CXL]:.4f}" for r in results))
    hits, oracle = next(r for r in results if r.alpha == SHIFT_ALPHA).measured(skip)
    ratio = hits[DRAM] / oracle[DRAM]
    print(f"   target: measured DRAM >= {TARGET_ORACLE}x oracle at alpha {SHIFT_ALPHA}: {ratio:.3f}x "
          f"{'MET' if ratio >= TARGET_ORACLE else 'MISSED'}")
    page_wins = {}
    for r in results:
        sims = list(r.sims.values())
        page_wins[r.alpha] = sims[0].hit_ratios(skip)[DRAM] > sims[1].hit_ratios(skip)[DRAM]
    print("   target: row-granular LFU beats page-granular in DRAM hit ratio: " + ", ".join(
        f"alpha {a}: {'yes' if w else 'NO'}" for a, w in page_wins.items()), flush=True)


def print_shift(intervals: list[Interval]) -> None:
    print(f"\n3. hot-set shift at alpha {SHIFT_ALPHA} (ZipfIds seed {SEED_STEADY} -> {SEED_SHIFT}): DRAM hit ratio per "
          f"interval against the oracle of the new hot set")
    print(f"   {'interval':>8} {'DRAM':>7} {'oracle':>7} {'ratio':>6} {'CXL':>7} {'SCM':>7} {'moved':>8} "
          f"{'backlog':>8} {'run_once':>8}")
    first = None
    for k, i in enumerate(intervals, 1):
        h = shares(i.hits)
        ratio = h[DRAM] / i.oracle[DRAM]
        if first is None and ratio >= TARGET_WITHIN:
            first = k
        print(f"   {k:>8} {h[DRAM]:7.4f} {i.oracle[DRAM]:7.4f} {ratio:6.3f} {h[CXL]:7.4f} {h[SCM]:7.4f} "
              f"{i.moved_rows:>8} {i.backlog_rows:>8} {i.run_seconds:7.2f}s")
    met = first is not None and first <= TARGET_SHIFT_INTERVALS
    print(f"   first interval within {1 - TARGET_WITHIN:.0%} of the oracle: {first or 'none'} "
          f"(target <= {TARGET_SHIFT_INTERVALS}): {'MET' if met else 'MISSED'}", flush=True)


def print_migration(reps: list[MigrationRep], steady_run: list[Interval], planning: float) -> None:
    print(f"\n4. pooled lookups while the engine migrates (1 kernel thread; {len(reps)} reps of engine idle / "
          f"run_once in a thread, quiet or unpaced, alternating / idle / the other / idle / SCM reads in a thread, "
          f"after a second shift)")
    print(f"   quiet: the engine as it ships (SCM reads paced at {SCM_READ_ROWS_PER_SECOND} "
          f"rows/s, in runs of reads from {SCM_READ_DEPTH} in flight, more while behind the rate); "
          f"unpaced: as fast as the "
          f"device goes, {MOVE_BATCH_ROWS} rows a batch, kernels.scm_queue_depth in flight")
    arms = (*ENGINE_ARMS, "scm reads")
    print(f"   {'lookups':<24} {'idle rows/s':>12} " + " ".join(f"{arm + ' (ratio)':>14} {'[q25, q75]':>15}"
                                                               for arm in arms) + "   DRAM/CXL/SCM shares " +
          " | ".join(ENGINE_ARMS))
    kinds = list(reps[0].windows["idle 1"])
    for kind in kinds:
        idle = [rep.windows[w][kind].rate for rep in reps for w in ("idle 1", "idle 2", "idle 3")]
        cells = []
        for arm in arms:
            med, q25, q75 = quantiles([rep.ratio(kind, arm) for rep in reps])
            cells.append(f"{med:14.3f} [{q25:.3f}, {q75:.3f}]")
        mix = [shares(sum(rep.windows[arm][kind].tiers for rep in reps)) for arm in ENGINE_ARMS]
        print(f"   {kind:<24} {np.median(idle) / 1e6:10.2f} M " + " ".join(cells) + "   " +
              " | ".join("/".join(f"{x:.2f}" for x in m) for m in mix))
    print("   (ratio: lookups per second while that arm's run_once runs against the mean of the idle windows "
          "around it; SCM reads: the control, another thread reading SCM rows as the unpaced mover does for as "
          "long as that rep's unpaced run_once took, moving nothing, against the idle window before it)")
    for arm in ENGINE_ARMS:
        seconds = [rep.run_seconds[arm] for rep in reps]
        moved = [rep.moved_rows[arm] for rep in reps]
        print(f"   run_once, {arm}: median {np.median(seconds):.2f} s (max {max(seconds):.2f} s), moving median "
              f"{np.median(moved):.0f} rows (total {sum(moved)})")
    print(f"   run_once in the intervals before (no lookups running): median "
          f"{np.median([i.run_seconds for i in steady_run]):.2f} s, moving median "
          f"{np.median([i.moved_rows for i in steady_run]):.0f} rows; the plan alone (arrays, no I/O): "
          f"{planning:.2f} s")
    names = {"shifted workload": "with SCM promotions (shifted workload)",
             "DRAM-resident hot rows": "memory-only (DRAM-resident hot rows)"}
    for kind in kinds:
        med, q25, q75 = quantiles([rep.ratio(kind, "quiet") for rep in reps])
        base = quantiles([rep.ratio(kind, "unpaced") for rep in reps])[0]
        print(f"   target: lookups {names.get(kind, kind)} during a tiering interval >= {TARGET_MIGRATION}x idle: "
              f"{med:.3f}x [{q25:.3f}, {q75:.3f}] (unpaced {base:.3f}x) {'MET' if med >= TARGET_MIGRATION else 'MISSED'}",
              flush=True)


def print_overhead(times: dict[int, list[float]]) -> None:
    ids = OVERHEAD_CALLS * REQUEST_IDS
    print(f"\n5. heat tracking overhead: DRAM-only copies of the table, Zipf({SHIFT_ALPHA}), {len(times[16])} reps of "
          f"{OVERHEAD_CALLS} requests per setting, order rotated (there is no 'off': shift 16 counts 1 access in "
          f"65536)")
    for shift, t in times.items():
        med, q25, q75 = quantiles([a / b for a, b in zip(times[16], t)])
        print(f"   heat_sample_shift {shift:>2}: {ids / np.median(t) / 1e6:6.2f} M rows/s, vs shift 16: {med:.3f}x "
              f"[{q25:.3f}, {q75:.3f}]")
    med = quantiles([a / b for a, b in zip(times[16], times[HEAT_SAMPLE_SHIFT])])[0]
    print(f"   target: tracking at shift {HEAT_SAMPLE_SHIFT} costs < {1 - TARGET_TRACKING:.0%} (>= {TARGET_TRACKING}x): "
          f"{med:.3f}x {'MET' if med >= TARGET_TRACKING else 'MISSED'}", flush=True)


def print_accuracy(rankings: dict[str, Ranking], plan: Plan) -> None:
    print(f"\n6. heat tracking accuracy, alpha {SHIFT_ALPHA}: share of the true top 10 % rows ({plan.rows // 10}) "
          f"ranked in the counters' top 10 % after one aging period ({ENGINE.aging_intervals} intervals, "
          f"{ENGINE.aging_intervals * plan.ids_per_interval / 1e6:.1f}M ids)")
    for name, r in rankings.items():
        print(f"   {name:<50} {r.overlap:6.3f}   (threshold count {r.threshold}; {r.by_tie:.1%} of the top-10 % "
              f"slots go to rows tied at it)", flush=True)


# ---- main ---------------------------------------------------------------------------------------

CXL_LATENCIES_NS = (0, 100, 300)  # 100 ns: the extra latency published for CXL memory expanders


def cxl_latency_effect(plan: Plan, parent: Path, rng: np.random.Generator) -> dict[int, list[float]]:
    """Per injected latency: per-rep ratios of the time to pool rows homed in CXL to the time to pool
    as many rows homed in DRAM (a table half in each, uniform ids within each half)."""
    rows = min(plan.rows, 1 << 20)
    half_bytes = rows // 2 * native.row_stride(DIM, "float32")
    ratios: dict[int, list[float]] = {}
    for ns in CXL_LATENCIES_NS:
        state = Path(tempfile.mkdtemp(prefix=f"cxl-{ns}ns-", dir=parent))
        store = Store(config.load(overrides={
            "state_dir": str(state),
            "tiers": {"dram": {"capacity": half_bytes}, "cxl": {"capacity": half_bytes, "emulated_latency_ns": ns},
                      "scm": {"capacity": "64M"}},
            "kernels": {"kernel_threads": 1}}))
        try:
            store.create_table(TABLE, rows, DIM, initializer="uniform", seed=1)
            placement = store.placement(TABLE)
            homes = {tier: np.flatnonzero(placement == tier) for tier in (0, 1)}
            ratios[ns] = []
            for _ in range(max(3, plan.overhead_reps // 3)):
                took = {}
                for tier in (0, 1):
                    ids = rng.choice(homes[tier], REQUEST_IDS).astype(np.int64)
                    tiers = np.zeros(3, dtype=np.int64)
                    took[tier] = lookup(store, ids, tiers)
                    assert tiers[tier] == ids.size
                ratios[ns].append(took[1] / took[0])
        finally:
            store.close()
            shutil.rmtree(state, ignore_errors=True)
    return ratios


def print_cxl_latency(ratios: dict[int, list[float]]) -> None:
    print(f"\n7. time effect of placement: pooling {REQUEST_IDS} rows homed in CXL vs in DRAM (uniform ids in "
          f"each half of a table split between the two), per injected CXL latency")
    for ns, values in ratios.items():
        median, q25, q75 = quantiles(values)
        label = "emulated CXL, nothing injected" if ns == 0 else f"{ns} ns injected per CXL row"
        print(f"   {label:34} CXL rows take {median:6.2f}x the DRAM rows' time [{q25:.2f}, {q75:.2f}]")
    print("   (injected latency: the CXL tier is emulated in DRAM here; the delay is serialised per row, with no "
          "overlap of misses as real memory-level parallelism would give, so it is an upper bound of the effect)",
          flush=True)


def tiered_steps(plan: Plan, alpha: float, parent: Path, rng: np.random.Generator, steady: dict[float, SteadyState],
                 setup: Callable[[TieredTable], None] | None) -> None:
    """Step 2 for alpha on a table of its own, into steady[alpha], after setup(table) and step 2's head when
    setup is given; for SHIFT_ALPHA, run last, step 2's summary then steps 3 and 4 on the same table."""
    log(f"alpha {alpha}: creating the table")
    tiered = TieredTable(plan, parent, f"a{alpha}")
    try:
        if setup:
            setup(tiered)
            print_steady_head(plan)
        result, trace = steady_state(tiered, alpha, rng)
        result.sims = simulations(trace, tiered)
        del trace
        steady[alpha] = result
        print_steady(plan, result)
        if alpha == SHIFT_ALPHA:
            print_steady_summary(plan, [steady[a] for a in ALPHAS if a in steady])
            planning = tiered.planning_seconds()
            print_shift(shift_recovery(tiered, rng))
            print_migration(migration_interference(tiered, rng), result.intervals[plan.warmup_intervals:], planning)
    finally:
        tiered.close()


def migration_step(plan: Plan, parent: Path, rng: np.random.Generator) -> None:
    """Step 4 alone: warm-up intervals on step 3's hot set (in place of steps 2 and 3), then step 4."""
    tiered = TieredTable(plan, parent, "migration")
    try:
        hot = HotSet(plan.rows, SHIFT_ALPHA, SEED_SHIFT, tiered.capacity_rows)
        warm = run_intervals(tiered, hot, rng, plan.warmup_intervals, what="warm-up")
        print_migration(migration_interference(tiered, rng), warm[plan.warmup_intervals // 2:],
                        tiered.planning_seconds())
    finally:
        tiered.close()


def tracking_steps(sections: Sections, plan: Plan, parent: Path, rng: np.random.Generator,
                   aged_heat: np.ndarray | None) -> None:
    """Steps 5 and 6, each a section, on DRAM-only copies of the table; aged_heat: the tiered table's counters
    at the end of step 2, ranked beside them when step 2 ran at SHIFT_ALPHA."""
    hot = HotSet(plan.rows, SHIFT_ALPHA, SEED_STEADY, plan.capacity_rows)
    with dram_copy(plan, parent, HEAT_SAMPLE_SHIFT) as s3, dram_copy(plan, parent, 16) as s16, \
            dram_copy(plan, parent, 0) as s0:
        log("tracking overhead")
        sections.run("5. heat tracking overhead", lambda: print_overhead(
            tracking_overhead({HEAT_SAMPLE_SHIFT: s3, 16: s16, 0: s0}, hot, plan, rng)))
        log("tracking accuracy")
        sections.run("6. heat tracking accuracy", tracking_accuracy_step, {HEAT_SAMPLE_SHIFT: s3, 0: s0}, hot, plan,
                     rng, aged_heat)


def tracking_accuracy_step(stores: dict[int, Store], hot: HotSet, plan: Plan, rng: np.random.Generator,
                           aged_heat: np.ndarray | None) -> None:
    rankings = tracking_accuracy(stores, hot, plan, rng)
    if aged_heat is not None:
        rankings[f"tiered table at the end of step 2 (shift {HEAT_SAMPLE_SHIFT}, aged)"] = top_k_overlap(
            aged_heat, hot.zipf.scatter[:plan.rows // 10])
    print_accuracy(rankings, plan)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small table, few intervals (under a minute)")
    parser.add_argument("--cxl-latency-only", action="store_true", help="only step 7 (injected CXL latency)")
    parser.add_argument("--migration-only", action="store_true",
                        help="only step 4 (lookups while the engine migrates), after warm-up intervals at alpha "
                             f"{SHIFT_ALPHA} in place of steps 2 and 3")
    parser.add_argument("--reps", type=int, help="step 4's repetitions (default: 8, --quick 3)")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[2] / ".state" / "bench"),
                        help="parent of the temporary state dirs; must allow O_DIRECT (not tmpfs)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = dataclasses.replace(plan, migration_reps=args.reps)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="embtier-bench-tiering-", dir=args.dir))
    started = time.perf_counter()
    sections = Sections()
    try:
        kind = fs_type(run_dir)
        if kind in ("tmpfs", "ramfs"):
            sys.exit(f"{args.dir} is on {kind}: SCM needs O_DIRECT, pass --dir on a disk file system")
        where = f"{run_dir} ({kind})"
        rng = np.random.default_rng(7)
        if args.cxl_latency_only:
            print_cxl_latency(cxl_latency_effect(plan, run_dir, rng))
            return 0
        if args.migration_only:
            sections.run("4. lookups while the engine migrates", migration_step, plan, run_dir, rng)
            print(f"\nwall time {time.perf_counter() - started:.0f} s", flush=True)
            return sections.exit_code()
        steady: dict[float, SteadyState] = {}
        # the shift alpha last: step 2's summary covers every alpha, steps 3-4 go on from its table
        setup = functools.partial(print_setup, plan, where=where, quick=args.quick)
        for n, alpha in enumerate(sorted(ALPHAS, key=lambda a: a == SHIFT_ALPHA)):
            name = f"2. steady state at alpha {alpha}" + (", 3. and 4." if alpha == SHIFT_ALPHA else "")
            sections.run(name, tiered_steps, plan, alpha, run_dir, rng, steady, setup if n == 0 else None)
        aged_heat = steady[SHIFT_ALPHA].heat if SHIFT_ALPHA in steady else None
        sections.run("5. and 6. heat tracking", tracking_steps, sections, plan, run_dir, rng, aged_heat)
        log("injected CXL latency")
        sections.run("7. time effect of placement", lambda: print_cxl_latency(cxl_latency_effect(plan, run_dir, rng)))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\nwall time {time.perf_counter() - started:.0f} s", flush=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
