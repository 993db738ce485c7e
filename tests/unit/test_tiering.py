"""The tiering engine: the LFU plan, and convergence of DRAM onto the hot set
of a Zipf workload, and after the hot set moves."""

from __future__ import annotations

import numpy as np
from embtier.loadgen import ZipfIds
from embtierd.policy_base import plan_swaps
from embtierd.policy_lfu import LfuPolicy
from embtierd.tiering import TieringEngine
from embtierd.tiering_config import TieringConfig


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
