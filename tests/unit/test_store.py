"""The in-process store: table lifecycle, placement, writes, and every bad input
raising its error while the store keeps serving."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from embtierd.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError, TierFullError


@pytest.fixture
def store(store_factory):
    s = store_factory(dram="16K", cxl="16K", scm="8M")
    s.create_table("t", 1000, 8, initializer="uniform", seed=3)
    return s


def ids_of(*values):
    return np.array(values, dtype=np.int64)


def test_new_table_fills_fastest_tier_first(store):
    info = store.describe("t")
    assert info.rows_by_tier == {"dram": 512, "cxl": 488, "scm": 0}  # 16 KiB / 32-byte rows
    placement = store.placement("t")
    assert np.all(np.diff(placement.astype(int)) >= 0)  # row order: dram rows, then cxl, then scm
    assert info.emulated_by_tier["cxl"] is True and info.emulated_by_tier["dram"] is False
    assert info.metadata_bytes_per_row <= 12


def test_placement_across_three_tiers(store_factory):
    s = store_factory(dram="4K", cxl="4K", scm="8M")
    info = s.create_table("x", 1000, 8)
    assert info.rows_by_tier == {"dram": 128, "cxl": 128, "scm": 744}
    assert info.bytes_by_tier["scm"] % 4096 == 0


def test_uniform_initializer_is_reproducible_and_bounded(store_factory):
    a, b = store_factory(dram="1M"), store_factory(dram="4K", cxl="4K")
    for s in (a, b):
        s.create_table("u", 3000, 16, initializer="uniform", seed=42, init_scale=0.25)
    ids = np.arange(3000, dtype=np.int64)
    rows = a.lookup("u", ids)
    np.testing.assert_array_equal(rows, b.lookup("u", ids))  # placement does not change values
    assert np.abs(rows).max() <= 0.25 and rows.std() > 0.1


def test_write_assign_and_add(store):
    rng = np.random.default_rng(0)
    ids = ids_of(5, 900, 5, 17)
    values = rng.standard_normal((4, 8), dtype=np.float32)
    before = store.lookup("t", ids_of(17))
    v1 = store.write_rows("t", ids, values)
    got = store.lookup("t", ids_of(5, 900, 17))
    np.testing.assert_array_equal(got, values[[2, 1, 3]])  # the later duplicate wins
    v2 = store.write_rows("t", ids, values, mode="add", scale=0.5)
    want = values[[2, 1, 3]] + 0.5 * np.stack([values[0] + values[2], values[1], values[3]])
    np.testing.assert_allclose(store.lookup("t", ids_of(5, 900, 17)), want, rtol=1e-6)
    assert v2 == v1 + 1 == store.describe("t").version
    assert not np.array_equal(before, values[3])


def test_an_add_whose_sum_a_float16_row_cannot_hold_is_refused_whole(store_factory):
    s = store_factory()
    s.create_table("h", 10, 4, dtype="float16")
    s.write_rows("h", ids_of(3, 4), np.full((2, 4), 60000, dtype=np.float32))
    before = s.read_encoded("h", np.arange(10, dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match=r"table 'h' of row 4, element 2 = 70000\.0 does not fit float16"):
        s.write_rows("h", ids_of(3, 4), np.array([[0, 0, 0, 0], [0, 0, 10000, 0]], np.float32), mode="add")
    with pytest.raises(InvalidArgumentError, match=r"^values\[1, 0\] = inf is not finite"):
        s.write_rows("h", ids_of(3, 4), np.array([[0, 0, 0, 0], [np.inf, 0, 0, 0]], np.float32), mode="add")
    np.testing.assert_array_equal(s.read_encoded("h", np.arange(10, dtype=np.int64)), before)  # nothing written


def test_empty_requests(store):
    assert store.lookup("t", np.array([], dtype=np.int64)).shape == (0, 8)
    got = store.lookup_pooled("t", np.array([], dtype=np.int64), np.zeros(3, dtype=np.int32))
    np.testing.assert_array_equal(got, np.zeros((3, 8), dtype=np.float32))
    store.write_rows("t", np.array([], dtype=np.int64), np.zeros((0, 8), dtype=np.float32))


BAD_LOOKUPS = [
    ("ids[2] = -1 is out of range [0, 1000)", lambda s: s.lookup("t", ids_of(1, 2, -1))),
    ("ids[1] = 1000 is out of range", lambda s: s.lookup("t", ids_of(0, 1000))),
    ("ids[0] = 9223372036854775807", lambda s: s.lookup("t", ids_of(2**63 - 1))),
    ("ids[3] = 5000 is out of range",
     lambda s: s.lookup_pooled("t", ids_of(1, 2, 3, 5000), np.array([2, 2], dtype=np.int32))),
    ("lengths sum to 3 but 4 ids", lambda s: s.lookup_pooled("t", ids_of(1, 2, 3, 4), np.array([1, 2], np.int32))),
    ("lengths[1] = -2 is negative", lambda s: s.lookup_pooled("t", ids_of(1, 2), np.array([4, -2], np.int32))),
    ("ids must have dtype int64, got int32", lambda s: s.lookup("t", np.array([1, 2], dtype=np.int32))),
    ("ids must have dtype int64, got float64", lambda s: s.lookup("t", np.array([1.0]))),
    ("ids must be a numpy array, got list", lambda s: s.lookup("t", [1, 2])),
    ("ids must have 1 dimension(s)", lambda s: s.lookup("t", np.zeros((2, 2), dtype=np.int64))),
    ("ids must be C-contiguous", lambda s: s.lookup("t", np.arange(10, dtype=np.int64)[::2])),
    ("lengths must have dtype int32", lambda s: s.lookup_pooled("t", ids_of(1), np.array([1], dtype=np.int64))),
    ("weights has 1 entries but ids has 2",
     lambda s: s.lookup_pooled("t", ids_of(1, 2), np.array([2], np.int32), np.ones(1, np.float32))),
    ("weights must have dtype float32",
     lambda s: s.lookup_pooled("t", ids_of(1, 2), np.array([2], np.int32), np.ones(2))),
    ("mode must be one of sum, mean, max; got 'avg'",
     lambda s: s.lookup_pooled("t", ids_of(1), np.array([1], np.int32), mode="avg")),
    ("values has shape (2, 7); expected (2, 8)",
     lambda s: s.write_rows("t", ids_of(1, 2), np.zeros((2, 7), np.float32))),
    ("values must have dtype float32", lambda s: s.write_rows("t", ids_of(1), np.zeros((1, 8)))),
    ("ids[1] = 1000 is out of range",
     lambda s: s.write_rows("t", ids_of(1, 1000), np.zeros((2, 8), np.float32))),
    ("ids[0] = -5 is out of range",
     lambda s: s.write_rows("t", ids_of(-5), np.zeros((1, 8), np.float32), mode="add")),
    ("mode must be one of assign, add", lambda s: s.write_rows("t", ids_of(1), np.zeros((1, 8), np.float32), "put")),
]


@pytest.mark.parametrize("message, call", BAD_LOOKUPS, ids=[m for m, _ in BAD_LOOKUPS])
def test_bad_input_raises_and_store_lives_on(store, message, call):
    before = store.lookup("t", np.arange(1000, dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        call(store)
    np.testing.assert_array_equal(store.lookup("t", np.arange(1000, dtype=np.int64)), before)  # nothing written


def test_table_errors(store):
    with pytest.raises(NotFoundError, match="table 'nope' does not exist"):
        store.lookup("nope", ids_of(1))
    with pytest.raises(AlreadyExistsError, match="table 't' already exists"):
        store.create_table("t", 10, 8)
    with pytest.raises(InvalidArgumentError, match="dtype must be one of"):
        store.create_table("d", 10, 8, dtype="bfloat16")
    with pytest.raises(InvalidArgumentError, match="num_rows must be in"):
        store.create_table("d", 0, 8)
    with pytest.raises(InvalidArgumentError, match="dim must be in"):
        store.create_table("d", 10, -1)
    with pytest.raises(InvalidArgumentError, match="name must be"):
        store.create_table("bad name/", 10, 8)
    with pytest.raises(InvalidArgumentError, match="initializer must be one of"):
        store.create_table("d", 10, 8, initializer="normal")


def test_tier_full_is_all_or_nothing(store):
    used = [t.used_bytes for t in store.tier_infos()]
    with pytest.raises(TierFullError, match="table 'huge' needs about"):
        store.create_table("huge", 10_000_000, 64)
    assert [t.used_bytes for t in store.tier_infos()] == used
    with pytest.raises(NotFoundError):
        store.describe("huge")


def test_drop_releases_space(store):
    assert store.tier_infos()[0].used_bytes == 16384
    store.drop_table("t")
    assert all(t.used_bytes == 0 for t in store.tier_infos())
    assert store.tables() == []
    with pytest.raises(NotFoundError):
        store.drop_table("t")
    store.create_table("t", 1000, 8)  # the space is reusable, and reused rows start as zeros
    np.testing.assert_array_equal(store.lookup("t", np.arange(1000, dtype=np.int64)), 0)


def test_drop_while_reading(store):
    errors, stop = [], threading.Event()

    def reader():
        ids = np.arange(1000, dtype=np.int64)
        while not stop.is_set():
            try:
                store.lookup_pooled("t", ids, np.full(10, 100, np.int32))
            except NotFoundError:
                return
            except Exception as e:  # noqa: BLE001 - any other error is the failure this test looks for
                errors.append(e)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    store.drop_table("t")
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert errors == []


def test_readers_never_see_torn_rows(store_factory):
    """Each write stores one constant across the row; a torn read would mix two constants."""
    s = store_factory(dram="64K", cxl="64K", scm="8M")
    s.create_table("w", 2000, 64)  # rows in all three tiers
    assert len(set(s.placement("w").tolist())) == 3
    ids = np.arange(2000, dtype=np.int64)
    stop, torn = threading.Event(), []

    def reader():
        while not stop.is_set():
            rows = s.lookup("w", ids)
            bad = np.flatnonzero(rows.min(axis=1) != rows.max(axis=1))
            if bad.size:
                torn.append(int(bad[0]))
                return

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for version in range(1, 60):
        s.write_rows("w", ids, np.full((2000, 64), version, dtype=np.float32))
    stop.set()
    for t in readers:
        t.join(timeout=10)
    assert torn == []
    np.testing.assert_array_equal(s.lookup("w", ids), 59)

