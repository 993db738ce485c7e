"""The sizing simulator: hit ratios against the oracle, page-granular tiering, trace checks, and agreement
with the real store and tiering engine running the same trace."""

from __future__ import annotations

import numpy as np
import pytest
from embtier_tools.loadgen import ZipfIds
from embtierd.tiering.config import TableSettings, TieringConfig
from embtierd.tiering.engine import TieringEngine
from embtierd.tiering.simulate import SimConfig, oracle_hit_ratios, simulate

ROWS = 5000


@pytest.fixture(scope="module")
def zipf() -> ZipfIds:
    return ZipfIds(ROWS, 1.05, 2)


@pytest.fixture(scope="module")
def trace(zipf) -> np.ndarray:
    return zipf.draw(np.random.default_rng(0), 30 * 8192)


def test_unlimited_budget_approaches_the_oracle(zipf, trace):
    result = simulate(trace, SimConfig(ROWS, (250, 250), 8192))
    oracle = oracle_hit_ratios(trace, ROWS, (250, 250))
    assert oracle[0] == pytest.approx(np.isin(trace, zipf.scatter[:250]).mean(), abs=0.01)  # the true top rows
    assert oracle.sum() == pytest.approx(1.0)
    start, settled = result.hit_ratios()[0], result.hit_ratios(skip_intervals=5)[0]
    assert result.hits[0, 0] / 8192 < 0.1                  # rows start in id order: the hot ones are elsewhere
    assert settled >= 0.95 * oracle[0] and settled > start
    assert result.hit_ratios(5)[:2].sum() >= 0.95 * oracle[:2].sum()


def test_hits_per_interval_sum_to_its_ids():
    trace = np.arange(10_000) % 700
    result = simulate(trace, SimConfig(700, (100, 100), 3000, heat_sample_shift=0))
    assert result.hits.sum(axis=1).tolist() == [3000, 3000, 3000, 1000]
    assert result.hits.shape == (4, 3) and result.moved_rows.shape == (4,) and result.backlog_rows.shape == (4,)
    assert result.hit_ratios().sum() == pytest.approx(1.0)


def test_budget_limits_moves_and_counts_the_backlog(trace):
    result = simulate(trace, SimConfig(ROWS, (250, 250), 8192, budget_rows=40))
    assert result.moved_rows.max() <= 40
    assert result.backlog_rows[0] > 0
    unlimited = simulate(trace, SimConfig(ROWS, (250, 250), 8192))
    assert unlimited.backlog_rows.sum() == 0 and unlimited.moved_rows[0] > 40
    assert result.hit_ratios(5)[0] < unlimited.hit_ratios(5)[0]


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_page_granular_misses_scattered_hot_rows(trace, policy):
    rows = simulate(trace, SimConfig(ROWS, (250, 250), 8192, policy=policy)).hit_ratios(5)
    pages = simulate(trace, SimConfig(ROWS, (250, 250), 8192, policy=policy, rows_per_unit=16)).hit_ratios(5)
    assert pages[0] < rows[0] - 0.1


@pytest.mark.parametrize("bad", [5000, -1, 123456])
def test_out_of_range_id_is_named(bad):
    trace = np.array([0, 4999, bad, 7])
    with pytest.raises(ValueError, match=rf"trace: id {bad} is out of range \[0, 5000\)"):
        simulate(trace, SimConfig(ROWS, (10, 10), 100))


def test_ids_per_interval_must_be_positive():
    with pytest.raises(ValueError, match="ids_per_interval must be >= 1, got 0"):
        simulate(np.arange(10), SimConfig(ROWS, (10, 10), 0))


@pytest.mark.parametrize("policy, budget_rows", [("lfu", 200), ("lfu", 1 << 20), ("lru", 200)])
def test_agrees_with_the_tiering_engine(store_factory, policy, budget_rows):
    """The same trace through a store and its tiering engine: per-interval DRAM hit ratios match."""
    rows, per_interval, intervals = 4000, 4096, 10
    store = store_factory(dram="16K", cxl="16K", scm="16M", heat_sample_shift=0)
    info = store.create_table("t", rows, 16, policy=TableSettings(policy=policy))
    assert info.rows_by_tier["dram"] > 0 and info.rows_by_tier["cxl"] > 0 and info.rows_by_tier["scm"] > 0
    stride = store.geometry("t")[2]
    engine = TieringEngine(store, TieringConfig(True, 1.0, budget_rows * stride, 0.25, aging_intervals=2,
                                                policy=policy))
    trace = ZipfIds(rows, 1.05, 3).draw(np.random.default_rng(1), intervals * per_interval)
    served = np.zeros((intervals, 3), dtype=np.int64)
    for i in range(intervals):
        store.lookup("t", trace[i * per_interval:(i + 1) * per_interval], tier_rows=served[i])
        engine.run_once()
    capacity_rows = (info.rows_by_tier["dram"], info.rows_by_tier["cxl"])  # what the store gave the table
    simulated = simulate(trace, SimConfig(rows, capacity_rows, per_interval, budget_rows=budget_rows, policy=policy,
                                          aging_intervals=2, heat_sample_shift=0))
    # the engine did move hot rows up (LRU on a 200-row budget gains least: about 8 % of the lookups)
    assert served[-1, 0] - served[0, 0] > 0.05 * per_interval
    np.testing.assert_allclose(simulated.hits / per_interval, served / per_interval, atol=0.01)
