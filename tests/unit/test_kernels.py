"""Gather and pool against a numpy reference: every dtype, mode and instruction
set, duplicates, empty bags, weights, odd dims, rows on all three tiers."""

from __future__ import annotations

import numpy as np
import pytest
from embtierd import codec, native
from embtierd.store.catalog import Store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import make_config

NUM_ROWS = 600
ROWS_PER_MEMORY_TIER = 200  # DRAM and CXL hold 200 rows each, SCM the other 200
DIMS = (1, 3, 16, 37, 64)
DTYPES = ("float32", "float16", "int8")


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """(dtype, dim) -> (store, reference rows as stored, decoded to float32), built once per module."""
    built: dict = {}

    def get(dtype: str, dim: int):
        if (dtype, dim) not in built:
            stride = native.row_stride(dim, dtype)
            cap = ROWS_PER_MEMORY_TIER * stride
            store = Store(make_config(tmp_path_factory.mktemp("kernels"), dram=cap, cxl=cap, scm="16M"))
            store.create_table("t", NUM_ROWS, dim, dtype)
            values = np.random.default_rng(dim).standard_normal((NUM_ROWS, dim), dtype=np.float32)
            ids = np.arange(NUM_ROWS, dtype=np.int64)
            store.write_rows("t", ids, values)
            ref = codec.decode(codec.encode(values, dtype, stride), dtype, dim)
            built[(dtype, dim)] = (store, ref)
        return built[(dtype, dim)]

    yield get
    for store, _ in built.values():
        store.close()


def pool_reference(ref, ids, lengths, weights, mode):
    out = np.zeros((len(lengths), ref.shape[1]), dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        rows = ref[ids[starts[b]:starts[b + 1]]].astype(np.float64)
        if weights is not None:
            rows *= weights[starts[b]:starts[b + 1], None]
        out[b] = rows.max(axis=0) if mode == "max" else rows.sum(axis=0) / (n if mode == "mean" else 1)
    return out


@st.composite
def bags(draw):
    lengths = draw(st.lists(st.integers(0, 9), min_size=0, max_size=24))
    total = sum(lengths)
    # A small pool of candidate ids makes duplicates common; the full range reaches every tier.
    pool = draw(st.sampled_from([NUM_ROWS, 8]))
    picks = draw(st.lists(st.integers(0, pool - 1), min_size=total, max_size=total))
    offset = draw(st.integers(0, NUM_ROWS - pool))
    ids = np.array([offset + p for p in picks], dtype=np.int64)
    weighted = draw(st.booleans())
    weights = (np.array(draw(st.lists(st.floats(-2, 2, width=32), min_size=total, max_size=total)),
                        dtype=np.float32) if weighted else None)
    return ids, np.array(lengths, dtype=np.int32), weights


def test_table_spans_all_tiers(tables):
    store, _ = tables("float32", 16)
    assert np.bincount(store.placement("t"), minlength=3).tolist() == [200, 200, 200]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dim=st.sampled_from(DIMS), mode=st.sampled_from(["sum", "mean", "max"]), case=bags())
def test_pool_matches_numpy(tables, isa, dtype, dim, mode, case):
    ids, lengths, weights = case
    store, ref = tables(dtype, dim)
    got = store.lookup_pooled("t", ids, lengths, weights, mode)
    want = pool_reference(ref, ids, lengths, weights, mode)
    assert got.shape == (len(lengths), dim)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dim=st.sampled_from(DIMS), ids=st.lists(st.integers(0, NUM_ROWS - 1), max_size=64))
def test_gather_matches_numpy(tables, isa, dtype, dim, ids):
    store, ref = tables(dtype, dim)
    ids = np.array(ids, dtype=np.int64)
    got = store.lookup("t", ids)
    assert got.shape == (len(ids), dim)
    if dtype == "int8":  # the kernel dequantizes with one fused multiply-add
        np.testing.assert_allclose(got, ref[ids], rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, ref[ids])


@pytest.mark.parametrize("dim", DIMS)
def test_int8_within_quantization_bound(tables, dim):
    store, _ = tables("int8", dim)
    values = np.random.default_rng(7).uniform(-3, 3, (NUM_ROWS, dim)).astype(np.float32)
    ids = np.arange(NUM_ROWS, dtype=np.int64)
    store.write_rows("t", ids, values)
    step = codec.int8_scales(store.read_encoded("t", ids), dim)
    err = np.abs(store.lookup("t", ids) - values).max(axis=1)
    assert np.all(err <= step / 2 * (1 + 1e-4) + 1e-6)
    assert np.all(step <= (values.max(axis=1) - values.min(axis=1)) / 255 * (1 + 1e-6) + 1e-12)


def test_scm_only_rows(tables):
    store, ref = tables("float32", 37)
    scm_ids = np.flatnonzero(store.placement("t") == native.TIER_SCM).astype(np.int64)
    assert scm_ids.size >= 200  # memory tiers round their capacity down to 64 bytes
    ids = np.random.default_rng(3).choice(scm_ids, 500)
    np.testing.assert_array_equal(store.lookup("t", ids), ref[ids])
    lengths = np.full(100, 5, dtype=np.int32)
    np.testing.assert_allclose(store.lookup_pooled("t", ids, lengths), pool_reference(ref, ids, lengths, None, "sum"),
                               rtol=1e-5, atol=1e-5)


def test_scm_rows_are_on_disk(store_factory):
    store = store_factory(dram=0, cxl=0, scm="4M")
    store.create_table("disk", 300, 24, "float32")
    values = np.random.default_rng(5).standard_normal((300, 24), dtype=np.float32)
    store.write_rows("disk", np.arange(300, dtype=np.int64), values)
    raw = store.tiers.scm.path.read_bytes()
    for row in (0, 170, 299):
        assert raw.find(values[row].tobytes()) >= 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_multithreaded_pool(store_factory, dtype):
    store = store_factory(dram="4M", cxl="1M", scm="64M", kernel_threads=3)
    store.create_table("big", 50_000, 16, dtype, initializer="uniform", seed=11)
    ref = store.lookup("big", np.arange(50_000, dtype=np.int64))
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 17, 4096).astype(np.int32)
    ids = rng.integers(0, 50_000, int(lengths.sum())).astype(np.int64)
    weights = rng.uniform(0, 1, ids.size).astype(np.float32)
    for mode in ("sum", "mean", "max"):
        got = store.lookup_pooled("big", ids, lengths, weights, mode)
        np.testing.assert_allclose(got, pool_reference(ref, ids, lengths, weights, mode), rtol=1e-5, atol=1e-5)


def test_access_counting(store_factory):
    store = store_factory(dram="1M", heat_sample_shift=0)
    store.create_table("h", 100, 8)
    ids = np.array([3, 3, 3, 7, 99] + [5] * 300, dtype=np.int64)
    store.lookup_pooled("h", ids, np.array([ids.size], dtype=np.int32))
    store.lookup("h", np.array([7], dtype=np.int64))
    heat = store.heat("h")
    assert heat[3] == 3 and heat[7] == 2 and heat[99] == 1
    assert heat[5] == 255  # saturates
    assert heat.sum() == 3 + 2 + 1 + 255


def test_sampled_access_counting(store_factory):
    store = store_factory(dram="1M", heat_sample_shift=3)
    store.create_table("h", 10_000, 8)
    ids = np.arange(8000, dtype=np.int64)
    store.lookup_pooled("h", ids, np.full(80, 100, dtype=np.int32))
    heat = store.heat("h")
    assert 999 <= int(heat.sum()) <= 1001  # one access in eight, at a random phase
    assert heat.max() == 1


@pytest.mark.parametrize("dram", ["1M", "4K"])  # all rows in memory (fused resolve) / some on SCM (two passes)
@pytest.mark.parametrize("tier", [native.TIER_CXL, 3])  # a CXL slot with no storage / a tier that does not exist
def test_corrupt_placement_is_an_error_not_a_crash(store_factory, dram, tier):
    from embtierd._native import ffi
    from embtierd.errors import EmbtierError

    store = store_factory(dram=dram, cxl="0", scm="4M")
    store.create_table("c", 1000, 8)
    table = store._tables["c"].native
    with pytest.raises(ValueError, match="read-only"):
        table.loc[7] = 0  # placement changes through publish only
    # rows 0 and 1 swap homes: the map is no longer the identity, which lookups of a DRAM-only table skip
    table.publish(np.array([0, 1], dtype=np.int64), table.loc[[1, 0]].copy())
    corrupt = ffi.cast("uint32_t *", ffi.from_buffer(table.loc))  # memory corruption, forged on the raw map
    corrupt[7] = (tier << table.tier_shift) | 3
    ids = np.array([1, 7, 2], dtype=np.int64)
    for call in (lambda: store.lookup("c", ids),
                 lambda: store.lookup_pooled("c", ids, np.array([3], dtype=np.int32)),
                 lambda: store.pool_partials("c", ids, np.array([3], dtype=np.int32)),
                 lambda: store.read_encoded("c", ids)):
        with pytest.raises(EmbtierError, match=r"ids\[1\] has a home with no storage"):
            call()
    np.testing.assert_array_equal(store.lookup("c", np.array([1, 2], dtype=np.int64)), 0)


@pytest.mark.parametrize("dram", ["1M", "4K"])  # fused resolve / two passes with SCM rows
def test_rows_served_per_tier(store_factory, dram):
    store = store_factory(dram=dram, cxl="4K", scm="4M", kernel_threads=2)
    store.create_table("c", 30_000, 8)
    placement = store.placement("c")
    ids = np.random.default_rng(4).integers(0, 30_000, 20_000)
    want = np.bincount(placement[ids], minlength=3)
    counts = np.zeros(3, dtype=np.int64)
    store.lookup_pooled("c", ids, np.full(200, 100, dtype=np.int32), tier_rows=counts)
    np.testing.assert_array_equal(counts, want)
    store.lookup("c", ids[:50], tier_rows=counts)
    np.testing.assert_array_equal(counts, np.bincount(placement[ids[:50]], minlength=3))
