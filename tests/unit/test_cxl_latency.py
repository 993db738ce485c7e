"""Injected CXL latency: lookups wait per CXL row they serve, values do not change,
and the tier set injects tiers.cxl.emulated_latency_ns only into an emulated CXL tier.

Timings are asserted as lower bounds only: a busy host makes a call slower, never faster."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest
from embtierd.errors import InvalidArgumentError
from embtierd.tiers import open_tiers
from embtierd.topology import discover

from tests.support import GIB, KIB, make_config, make_sysfs

DELAY_NS = 200_000
LAYOUTS = {  # 1000 rows of 32 bytes: rows 0-127 in DRAM, then CXL, then SCM
    "dram+cxl": {"dram": "4K", "cxl": "64K", "scm": "8M"},
    "dram+cxl+scm": {"dram": "4K", "cxl": "4K", "scm": "8M"},  # rows 256-999 in SCM: the batched path
}
CXL_IDS = np.arange(128, 178, dtype=np.int64)  # 50 rows in CXL in both layouts


@pytest.fixture(params=LAYOUTS)
def store(request, store_factory):
    s = store_factory(**LAYOUTS[request.param])
    s.create_table("t", 1000, 8, initializer="uniform", seed=1)
    return s


def set_delay(store, ns: int) -> None:
    store._get("t").native.set_cxl_delay(ns)


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def test_values_unchanged_with_delay(store, isa):
    ids = np.random.default_rng(0).integers(0, 1000, 400).astype(np.int64)
    lengths = np.array([0, 150, 1, 249], dtype=np.int32)
    weights = np.random.default_rng(1).standard_normal(400, dtype=np.float32)

    def lookups():
        rows_tiers, pooled_tiers = np.zeros(3, np.int64), np.zeros(3, np.int64)
        return (store.lookup("t", ids, rows_tiers), rows_tiers,
                *[store.lookup_pooled("t", ids, lengths, weights, mode) for mode in ("sum", "mean", "max")],
                store.lookup_pooled("t", ids, lengths, tier_rows=pooled_tiers), pooled_tiers)

    plain = lookups()
    set_delay(store, 1000)
    delayed = lookups()
    for want, got in zip(plain, delayed, strict=True):
        np.testing.assert_array_equal(got, want)
    assert delayed[1][1] > 0  # the lookups did serve CXL rows


def test_lookup_waits_per_cxl_row(store):
    tier_rows = np.zeros(3, np.int64)
    store.lookup("t", CXL_IDS, tier_rows)
    assert tier_rows.tolist() == [0, CXL_IDS.size, 0]
    set_delay(store, DELAY_NS)
    bound = CXL_IDS.size * DELAY_NS * 1e-9  # 10 ms
    _, seconds = timed(lambda: store.lookup("t", CXL_IDS))
    assert seconds >= bound
    lengths = np.full(5, 10, dtype=np.int32)
    _, seconds = timed(lambda: store.lookup_pooled("t", CXL_IDS, lengths, mode="mean"))
    assert seconds >= bound
    repeated = np.full(CXL_IDS.size, CXL_IDS[0])  # every access waits, not every distinct row
    _, seconds = timed(lambda: store.lookup("t", repeated))
    assert seconds >= bound


def test_parallel_parts_each_wait_for_their_rows(store_factory):
    s = store_factory(dram="4K", cxl="64K", kernel_threads=4)
    s.create_table("t", 1000, 8)
    ids = np.random.default_rng(2).integers(128, 1000, 32768).astype(np.int64)  # all CXL, 4 parts of 8192
    set_delay(s, 1000)
    tier_rows = np.zeros(3, np.int64)
    _, seconds = timed(lambda: s.lookup("t", ids, tier_rows))
    assert tier_rows.tolist() == [0, ids.size, 0]
    assert seconds >= ids.size * 1000 * 1e-9 / 4  # parts wait side by side, none for less than its rows


@pytest.mark.parametrize("ns", [-1, 1_000_001, 2.5, True])
def test_setter_rejects_bad_values(store, ns):
    with pytest.raises(InvalidArgumentError, match=r"injected CXL latency .* \[0, 1000000\]"):
        set_delay(store, ns)


def cxl_latency_config(state_dir, latency_ns):
    cfg = make_config(state_dir, dram="1M", cxl="1M")
    return dataclasses.replace(cfg, cxl=dataclasses.replace(cfg.cxl, emulated_latency_ns=latency_ns))


def test_emulated_cxl_tier_gets_the_latency(tmp_path):
    root = make_sysfs(tmp_path / "sys", {0: ("0", 8 * GIB // KIB)}, online="0")
    tiers = open_tiers(cxl_latency_config(tmp_path / "state", 250), discover(root))
    try:
        assert tiers.cxl.emulated and tiers.cxl.injected_latency_ns == 250
        assert tiers.dram.injected_latency_ns == 0
    finally:
        tiers.close()


def test_real_cxl_tier_ignores_the_latency(tmp_path, caplog):
    root = make_sysfs(tmp_path / "sys", {0: ("0-1", 24 * GIB // KIB), 2: ("\n", 64 * GIB // KIB)}, online="0,2")
    with caplog.at_level(logging.WARNING, logger="embtierd.tiers"):
        tiers = open_tiers(cxl_latency_config(tmp_path / "state", 250), discover(root))
    try:
        assert not tiers.cxl.emulated and tiers.cxl.injected_latency_ns == 0
        assert "tiers.cxl.emulated_latency_ns = 250 ignored" in caplog.text
    finally:
        tiers.close()
