"""The tiering engine: the LFU plan, and convergence of DRAM onto the hot set
of a Zipf workload, and after the hot set moves."""

from __future__ import annotations

import time

import numpy as np
import pytest
from embtier_tools.loadgen import ZipfIds
from embtierd.errors import TierFullError
from embtierd.tiering.config import TableGroup, TableSettings, TieringConfig
from embtierd.tiering.engine import Pacer, TieringEngine
from embtierd.tiering.policy_base import plan_swaps
from embtierd.tiering.policy_lfu import LfuPolicy


def test_plan_pairs_hottest_below_with_coldest_inside():
    heat = np.array([0, 50, 3, 9, 40, 1, 2, 60], dtype=np.uint8)
    placement = np.array([0, 2, 0, 0, 1, 0, 2, 2], dtype=np.uint8)  # DRAM: rows 0, 2, 3, 5
    lfu = LfuPolicy(hysteresis=0.25)
    up, down = plan_swaps(lfu, heat, placement, 0)
    assert up.tolist() == [7, 1, 4] and down.tolist() == [0, 5, 2]   # row 6 (heat 2) is not worth row 3 (heat 9)
    up, down = plan_swaps(lfu, heat, placement, 0, limit=2)
    assert up.tolist() == [7, 1] and down.tolist() == [0, 5]
    up, _ = plan_swaps(LfuPolicy(hysteresis=100), heat, placement, 0)
    assert up.tolist() == [7]  # only the swap against an untouched row (heat 0) clears a 100x bar
    heat[6] = 0  # an untouched row below must sort last, not first (uint8 negation would wrap)
    up, down = plan_swaps(lfu, heat, placement, 0, limit=4)
    assert up.tolist() == [7, 1, 4] and down.tolist() == [0, 5, 2]


def dram_hit_ratio(store, ids) -> float:
    counts = np.zeros(3, dtype=np.int64)
    store.lookup_pooled("z", ids, np.full(ids.size // 32, 32, dtype=np.int32), tier_rows=counts)
    return counts[0] / counts.sum()


def test_dram_converges_on_the_hot_set_and_follows_it(store_factory):
    rows = 40_000
    store = store_factory(dram="256K", cxl="256K", scm="32M", heat_sample_shift=0)  # 2048 rows each in DRAM, CXL
    store.create_table("z", rows, 32)
    engine = TieringEngine(store, TieringConfig(True, 1.0, 64 << 20, 0.25, aging_intervals=1))
    rng = np.random.default_rng(0)
    for seed in (1, 2):  # the hot set, then a different one
        zipf = ZipfIds(rows, 1.05, seed)
        oracle = zipf.scatter[:2048]  # the 2048 most popular rows
        start = dram_hit_ratio(store, zipf.draw(rng, 32 * 4096))
        for _ in range(10):
            for _ in range(3):
                store.lookup_pooled("z", zipf.draw(rng, 32 * 4096), np.full(4096, 32, dtype=np.int32))
            engine.run_once()
        measured = dram_hit_ratio(store, zipf.draw(rng, 32 * 4096))
        probe = zipf.draw(rng, 32 * 4096)
        best = np.isin(probe, oracle).mean()
        assert measured >= 0.9 * best, (seed, start, measured, best)
        assert measured > start + 0.2
        in_dram = np.flatnonzero(store.placement("z") == 0)
        assert np.isin(oracle[:200], in_dram).mean() >= 0.95  # the very hottest rows are all in DRAM


def test_the_pacer_spends_scm_reads_at_their_rate_until_the_deadline():
    pacer = Pacer(float("inf"), time.monotonic() + 60, scm_rows_per_second=1000)
    pacer.moved(4096)  # bytes at an unlimited bandwidth: no wait
    assert time.monotonic() - pacer.start < 0.1
    pacer.read(250)
    assert time.monotonic() - pacer.start >= 0.25
    short = Pacer(float("inf"), time.monotonic() + 0.2, scm_rows_per_second=1)
    short.read(1000)  # due in 1000 s: never waits past the deadline
    assert 0.2 <= time.monotonic() - short.start < 5


def test_the_pacer_keeps_as_few_scm_reads_in_flight_as_keep_the_rate():
    behind = Pacer(float("inf"), time.monotonic() + 60, scm_rows_per_second=1e12, min_read_depth=4,
                   max_read_depth=64)
    depths = [behind.read_depth]
    for _ in range(5):
        behind.read(1000)  # due at once: the reads fell behind their rate
        depths.append(behind.read_depth)
    assert depths == [4, 8, 16, 32, None, None]  # at the lookups' depth, the move reads as it always did
    behind.read(0)  # a run that read nothing off SCM leaves the depth as it is
    assert behind.read_depth is None
    ahead = Pacer(float("inf"), time.monotonic() + 60, scm_rows_per_second=1e5, min_read_depth=4, max_read_depth=64)
    ahead.depth = 32
    ahead.read(2000)  # due in 20 ms: ahead of the rate
    assert ahead.read_depth == 16
    assert Pacer(float("inf"), time.monotonic() + 60).read_depth is None  # no least depth: never limited


def test_promotions_out_of_scm_are_paced_and_all_land(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M", heat_sample_shift=0)  # DRAM: 1024 rows of 64 bytes
    store.create_table("p", 5000, 16)
    hot = np.arange(3000, 3600, dtype=np.int64)  # on SCM
    touch(store, "p", hot, times=4)
    engine = engine_for(store)
    engine.scm_rows_per_second = 1000
    start = time.monotonic()
    moved = engine.run_once()
    assert moved[("scm", "dram")] == 600 and np.all(store.placement("p")[hot] == 0)
    assert time.monotonic() - start >= 0.5  # 600 rows read off SCM at 1000 a second


def test_hot_rows_take_room_freed_by_a_dropped_table(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M", heat_sample_shift=0)  # DRAM: 1024 rows of 64 bytes
    store.create_table("first", 500, 16)    # one chunk of 512 rows: half of DRAM
    store.create_table("late", 5000, 16)    # the other 512 DRAM rows, the rest on SCM
    engine = TieringEngine(store, TieringConfig(True, 1.0, 64 << 20, 0.25, aging_intervals=1))
    hot = np.arange(4000, 4100, dtype=np.int64)  # on SCM
    for _ in range(2):
        store.lookup_pooled("late", hot, np.full(10, 10, dtype=np.int32))
    engine.run_once()
    assert np.all(store.placement("late")[hot] == 0)  # swapped in against late's own cold DRAM rows
    assert store.describe("late").rows_by_tier["dram"] == 512
    store.drop_table("first")
    hotter = np.arange(3000, 3900, dtype=np.int64)
    for _ in range(3):
        store.lookup_pooled("late", hotter, np.full(9, 100, dtype=np.int32))
    engine.run_once()
    assert store.describe("late").rows_by_tier["dram"] == 1024  # the freed half of DRAM, taken without demotions
    assert np.all(store.placement("late")[hotter] == 0)          # the rest by swaps with colder rows


# ---- per-table policies through the store and the engine -------------------------

ROW_BYTES = 64  # dim 16, float32


def engine_for(store, budget_rows: int = 1 << 20, **kwargs) -> TieringEngine:
    return TieringEngine(store, TieringConfig(True, 1.0, budget_rows * ROW_BYTES, 0.25, aging_intervals=1, **kwargs))


def dram_limit(rows: int | None) -> TableSettings:
    return TableSettings(capacity_bytes={"dram": None if rows is None else rows * ROW_BYTES, "cxl": None})


def touch(store, name: str, ids: np.ndarray, times: int = 1) -> None:
    for _ in range(times):
        store.lookup(name, np.asarray(ids, dtype=np.int64))


def test_dram_limit_at_creation(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M", heat_sample_shift=0)  # DRAM: 1024 rows
    info = store.create_table("a", 5000, 16, policy=dram_limit(256))
    assert store.geometry("a")[2] == ROW_BYTES
    assert info.rows_by_tier == {"dram": 256, "cxl": 0, "scm": 4744}
    assert store.room_rows("a", 0) == 0
    engine = engine_for(store)
    touch(store, "a", np.arange(4000, 4500), times=3)  # hot rows on SCM: they may only swap in
    engine.run_once()
    assert store.describe("a").rows_by_tier["dram"] == 256
    assert np.count_nonzero(store.placement("a")[4000:4500] == 0) == 256  # all of the table's DRAM, no more


def test_dram_limit_leaves_dram_to_other_tables(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M")
    store.create_table("a", 5000, 16, policy=dram_limit(256))
    assert store.create_table("b", 5000, 16).rows_by_tier["dram"] == 1024 - 256


def test_lowering_a_limit_gives_the_memory_back_to_the_tier(store_factory):
    store = store_factory(dram="256K", cxl="0", scm="16M", heat_sample_shift=0)  # 4096 rows of 64 bytes
    store.create_table("a", 3000, 16, initializer="uniform", seed=4)
    values = store.lookup("a", np.arange(3000))
    used = store.tier_infos()[0].used_bytes
    engine = engine_for(store)
    store.set_policy("a", dram_limit(1000))
    touch(store, "a", np.arange(100, 400), times=3)  # rows of the first chunk stay hot
    for _ in range(3):
        engine.run_once()
    assert store.describe("a").rows_by_tier["dram"] <= 1000
    assert store.tier_infos()[0].used_bytes <= used - 2000 * ROW_BYTES  # its rows beyond the limit: released
    assert np.all(store.placement("a")[100:400] == 0)
    np.testing.assert_array_equal(store.lookup("a", np.arange(3000)), values)  # every row intact, wherever it is
    assert store.create_table("b", 5000, 16).rows_by_tier["dram"] >= 2048  # the freed room serves another table


@pytest.mark.parametrize("pin", ["scm", "cxl"])  # (pinned to DRAM: see the next test)
def test_pinned_table_is_placed_in_its_tier(store_factory, pin):
    store = store_factory(dram="64K", cxl="64K", scm="16M")
    info = store.create_table("p", 700, 16, policy=TableSettings(pin=pin))
    assert info.rows_by_tier == {tier: 700 if tier == pin else 0 for tier in ("dram", "cxl", "scm")}
    engine = engine_for(store)
    touch(store, "p", np.arange(100), times=3)
    engine.run_once()
    assert np.all(store.placement("p") == ("dram", "cxl", "scm").index(pin))  # hot or not, it stays


def test_table_pinned_to_dram_is_refused_rather_than_spilled(store_factory):
    store = store_factory(dram="64K", cxl="64K", scm="16M")  # 1024 rows each in DRAM and CXL
    with pytest.raises(TierFullError, match="tier dram \\(the table is pinned there\\) cannot hold it"):
        store.create_table("p", 1500, 16, policy=TableSettings(pin="dram"))
    with pytest.raises(TierFullError, match="tier dram"):
        store.create_table("p", 600, 16, policy=TableSettings(pin="dram", capacity_bytes={"dram": 500 * ROW_BYTES}))
    assert store.tables() == []
    info = store.create_table("p", 1000, 16, policy=TableSettings(pin="dram"))  # all or nothing: DRAM is free again
    assert info.rows_by_tier == {"dram": 1000, "cxl": 0, "scm": 0}


def test_set_policy_pin_moves_rows_over_the_next_intervals(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M", heat_sample_shift=0)
    store.create_table("t", 500, 16)
    assert store.describe("t").rows_by_tier["dram"] == 500
    engine = engine_for(store, budget_rows=200)
    hot = np.arange(300, 310)
    touch(store, "t", hot, times=5)
    store.set_policy("t", TableSettings(pin="scm"))
    moved = engine.run_once()
    assert moved == {("dram", "scm"): 200}
    assert np.all(store.placement("t")[hot] == 2)              # hottest first
    assert engine.state("t").backlog_rows == 300 and engine.state("t").moved_rows == 200
    engine.run_once()
    engine.run_once()
    assert store.describe("t").rows_by_tier == {"dram": 0, "cxl": 0, "scm": 500}
    assert engine.state("t").backlog_rows == 0
    store.set_policy("t", TableSettings(pin="dram"))
    engine.run_once()
    assert store.describe("t").rows_by_tier == {"dram": 200, "cxl": 0, "scm": 300}


def test_set_policy_lowering_the_dram_limit_demotes_the_coldest(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M", heat_sample_shift=0)
    store.create_table("t", 500, 16)
    engine = engine_for(store, budget_rows=100)
    hot = np.arange(0, 500, 5)  # 100 rows
    touch(store, "t", hot, times=3)
    store.set_policy("t", dram_limit(150))
    engine.run_once()
    assert store.describe("t").rows_by_tier["dram"] == 400 and engine.state("t").backlog_rows == 250
    for _ in range(3):
        touch(store, "t", hot, times=3)
        engine.run_once()
    assert store.describe("t").rows_by_tier == {"dram": 150, "cxl": 0, "scm": 350}
    assert np.all(store.placement("t")[hot] == 0) and engine.state("t").backlog_rows == 0
    store.set_policy("t", dram_limit(None))
    warm = np.arange(1, 500, 5)
    below = np.count_nonzero(store.placement("t")[warm] != 0)
    touch(store, "t", warm)
    engine.run_once()
    assert store.describe("t").rows_by_tier["dram"] == 150 + below  # room again, taken by the rows accessed
    assert np.all(store.placement("t")[warm] == 0)


def two_tables_sharing_dram(store, policies: dict[str, TableSettings], rows: int) -> None:
    """Tables of rows rows that each get half of the store's DRAM (a placeholder table holds the other
    half while the first is created)."""
    first, second = policies
    store.create_table("placeholder", 500, 16)  # one chunk of 512 rows
    store.create_table(first, rows, 16, policy=policies[first])
    store.drop_table("placeholder")
    store.create_table(second, rows, 16, policy=policies[second])


def test_lru_and_lfu_tables_each_converge_on_their_hot_sets(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M", heat_sample_shift=0)  # 512 DRAM rows per table
    two_tables_sharing_dram(store, {"recent": TableSettings(policy="lru"), "frequent": TableSettings(policy="lfu")}, 4000)
    assert [store.describe(n).rows_by_tier["dram"] for n in ("recent", "frequent")] == [512, 512]
    assert store.room_rows("recent", 0) == 0 and store.room_rows("frequent", 0) == 0
    engine = engine_for(store)
    rng = np.random.default_rng(0)
    hot = {name: rng.choice(np.arange(1000, 4000), 300, replace=False) for name in ("recent", "frequent")}
    for _ in range(4):
        for name in ("recent", "frequent"):
            touch(store, name, hot[name], times=4)
            touch(store, name, rng.integers(0, 4000, 100))  # noise: seen once
        engine.run_once()
    for name in ("recent", "frequent"):
        assert np.all(store.placement(name)[hot[name]] == 0), name
        assert store.describe(name).rows_by_tier["dram"] == 512
    assert engine.state("recent").policy.name == "lru" and engine.state("frequent").policy.name == "lfu"
    assert not store.heat("recent").any()                  # LRU clears its counters
    assert np.all(store.heat("frequent")[hot["frequent"]] >= 2)  # LFU halves them


def test_budget_is_shared_and_the_first_table_rotates(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M", heat_sample_shift=0)
    for name in ("a", "b"):
        store.create_table(name, 500, 16, policy=TableSettings(pin="scm"))
        store.set_policy(name, TableSettings())  # now free to move up: 500 rows each would go to DRAM
        touch(store, name, np.arange(500))
    engine = engine_for(store, budget_rows=150)
    assert engine.run_once() == {("scm", "dram"): 150}
    assert (engine.state("a").moved_rows, engine.state("b").moved_rows) == (150, 0)
    assert (engine.state("a").backlog_rows, engine.state("b").backlog_rows) == (350, 500)
    touch(store, "a", np.arange(500))
    touch(store, "b", np.arange(500))
    assert engine.run_once() == {("scm", "dram"): 150}
    assert (engine.state("a").moved_rows, engine.state("b").moved_rows) == (0, 150)


def test_dropped_table_leaves_the_engine_state(store_factory):
    store = store_factory(dram="64K", cxl="0", scm="16M")
    lru = TableSettings(policy="lru")
    store.create_table("a", 100, 16)
    store.create_table("b", 100, 16, policy=lru)
    engine = engine_for(store)
    engine.run_once()
    engine.run_once()
    old = engine.state("b")
    assert old.policy_name == "lru" and old.policy.interval == 3
    store.drop_table("b")
    store.create_table("b", 100, 16, policy=lru)  # same name, same policy, between two intervals
    engine.run_once()
    assert engine.state("b") is not old and engine.state("b").policy.interval == 2  # a new table, a new state
    store.drop_table("b")
    engine.run_once()
    assert engine.state("b") is None and engine.state("a") is not None


def test_tenant_shares_hold_under_a_competing_tenants_hot_set_shift(store_factory):
    """Tenant A (tables a1, a2) and tenant B (table b) each have half of DRAM: A's hot rows stay in
    DRAM while B's hot set grows past its half and moves, and A's share follows A's hot set from one
    of its tables to the other."""
    store = store_factory(dram="64K", cxl="0", scm="32M", heat_sample_shift=0)  # 1024 DRAM rows
    for name in ("a1", "a2", "b"):
        store.create_table(name, 3000, 16)  # (a1 takes all of DRAM at creation)
    half = 512 * ROW_BYTES
    engine = engine_for(store, groups=(TableGroup("A", ("a1", "a2"), {"dram": half, "cxl": None}),
                                       TableGroup("B", ("b",), {"dram": half, "cxl": None})))
    rng = np.random.default_rng(0)
    a1_hot, a2_hot = rng.choice(3000, 200, replace=False), rng.choice(3000, 200, replace=False)

    def dram(name):
        return np.flatnonzero(store.placement(name) == 0)

    def settle(b_hot, b_times, a_sets):
        for _ in range(6):
            for name, hot in a_sets:
                touch(store, name, hot, times=2)
            touch(store, "b", b_hot, times=b_times)
            engine.run_once()

    settle(rng.choice(3000, 900, replace=False), 4, [("a1", a1_hot), ("a2", a2_hot)])  # B wants 900 rows
    assert dram("a1").size + dram("a2").size <= 512 and dram("b").size <= 512
    assert np.isin(a1_hot, dram("a1")).all() and np.isin(a2_hot, dram("a2")).all()
    assert dram("b").size >= 400  # B has its half (A's cold rows gave theirs back)
    settle(rng.choice(3000, 900, replace=False), 20, [("a1", a1_hot), ("a2", a2_hot)])  # B's hot set moves, hotter
    assert np.isin(a1_hot, dram("a1")).all() and np.isin(a2_hot, dram("a2")).all()
    assert dram("b").size <= 512
    a2_more = np.union1d(a2_hot, rng.choice(3000, 300, replace=False))[:450]  # A's hot set moves to a2
    settle(rng.choice(3000, 900, replace=False), 4, [("a2", a2_more)])
    assert np.isin(a2_more, dram("a2")).all() and dram("a1").size + dram("a2").size <= 512
