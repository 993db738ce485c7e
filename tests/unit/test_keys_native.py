"""Key spaces in the kernels (native/src/keys.c), through NativeTable and the Store, against a
pure-Python model of the contract (native/include/embtier.h, "key spaces"): a MANAGED map gives new
ids rows in order, once full evicts the coldest id that is not protected, and serves unknown ids its
default row; HASHED rows are embtier.keys.hashed_rows, MAPPED rows embtier.keys.mapped_rows; a keyed
lookup reads what the same lookup of the model's rows reads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from embtier.keys import hashed_rows, mapped_rows
from embtierd import native
from embtierd.errors import InvalidArgumentError, KeyspaceFullError
from embtierd.keys.space import KeySpace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
CHUNK_SHIFT = 10  # 1024 rows a chunk: tables of more rows have chunks on both fabric parts
DIM = 4


@pytest.fixture
def make_table():
    """make(num_rows, kind, seed, values) -> a NativeTable of num_rows float32 rows of DIM in DRAM
    (row r in slot r, chunk c on fabric part c % 2) with key space kind (epochs only by keys_epoch),
    values [num_rows, DIM] written when given."""
    made = []

    def make(num_rows: int, kind: str = "managed", seed: int = 0, values: np.ndarray | None = None,
             mapping: tuple[np.ndarray, np.ndarray, int] | None = None):
        chunks = -(-num_rows >> CHUNK_SHIFT)
        table = native.NativeTable(kind, num_rows, DIM, "float32", CHUNK_SHIFT, chunks)
        chunk_bytes = table.stride << CHUNK_SHIFT
        address, _ = native.mem_map(chunks * chunk_bytes, False)
        made.append((table, address, chunks * chunk_bytes))
        table.set_parts(2)
        for chunk in range(chunks):
            table.set_chunk(native.TIER_DRAM, chunk, address + chunk * chunk_bytes, chunk_bytes)
            table.set_chunk_part(native.TIER_DRAM, chunk, chunk % 2)
        rows = np.arange(num_rows, dtype=np.int64)
        table.publish(rows, rows.astype(np.uint32))
        if kind == "mapped":
            table.set_mapping(seed, *mapping)
        else:
            table.set_keys(kind, seed)
        if values is not None:
            table.write_rows(rows, values.view(np.uint8))
        return table

    yield make
    for table, address, nbytes in made:
        table.mark_dropped()
        native.mem_unmap(address, nbytes)
    native.set_kernel_threads(1)


def int64s(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class MapModel:
    """The contract's MANAGED map: the id of each live row, and the rows touched (written, planned or
    read by key) in the current and in the previous epoch, which are protected from eviction."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: list[int] = []
        self.row_of: dict[int, int] = {}
        self.touched = [set(), set()]

    def new_epoch(self) -> None:
        self.touched = [set(), self.touched[0]]

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The rows a keyed lookup reads (the default row, capacity, for unknown ids); touches the known."""
        rows = np.array([self.row_of.get(k, self.capacity) for k in ids.tolist()], dtype=np.int64)
        self.touched[0].update(rows[rows < self.capacity].tolist())
        return rows

    def plan(self, table: native.NativeTable, ids: np.ndarray) -> np.ndarray | None:
        """table.plan_keys(ids), checked: live ids keep their rows; the distinct new ids, in order, take
        the never-used rows in order, then each the row of the coldest live id that is neither protected
        nor in the batch (ties: any of them), or none: then KeyspaceFullError at the first left without,
        and the map unchanged.  Returns the rows, or None when full."""
        keys = ids.tolist()
        heat = table.heat.copy()
        self.touched[0].update(self.row_of[k] for k in keys if k in self.row_of)
        free = set(range(len(self.keys))) - self.touched[0] - self.touched[1]
        new = list(dict.fromkeys(k for k in keys if k not in self.row_of))
        room = self.capacity - len(self.keys) + len(free)
        if len(new) > room:
            before = (table.keys_stats(), table.keys_of_rows.copy())
            with pytest.raises(KeyspaceFullError, match=rf"ids\[{keys.index(new[room])}\] = {new[room]}:"):
                table.plan_keys(ids)
            assert table.keys_stats() == before[0] and np.array_equal(table.keys_of_rows, before[1])
            return None
        rows, fresh = table.plan_keys(ids)
        given_rows: dict[int, int] = {}
        next_row = len(self.keys)
        for key, row, is_new in zip(keys, rows.tolist(), fresh.tolist()):
            assert is_new == (key not in self.row_of)
            if not is_new:
                assert row == self.row_of[key]
            elif key in given_rows:
                assert row == given_rows[key]
            elif next_row < self.capacity:
                assert row == next_row
                next_row += 1
            else:
                assert row in free and heat[row] == min(heat[list(free)]), (row, free, heat[:self.capacity])
                free.discard(row)
            given_rows.setdefault(key, row)
        return rows

    def apply(self, ids: np.ndarray, rows: np.ndarray) -> int:
        """The map after apply_keys(ids, rows) (valid ones); returns the ids forgotten."""
        gone = 0
        for key, row in zip(ids.tolist(), rows.tolist()):
            if row == len(self.keys):
                self.keys.append(key)
            elif self.keys[row] != key:
                del self.row_of[self.keys[row]]
                self.keys[row] = key
                gone += 1
            self.row_of[key] = row
            self.touched[0].add(row)
        return gone

    def write(self, table: native.NativeTable, ids: np.ndarray) -> bool:
        """Plans ids and applies the plan on table and on the model (False when full); checks both."""
        rows = self.plan(table, ids)
        if rows is None:
            return False
        assert table.apply_keys(ids, rows) == self.apply(ids, rows)
        assert table.keys_of_rows.tolist() == self.keys
        return True


def epochs(table: native.NativeTable, model: MapModel, count: int) -> None:
    for _ in range(count):
        table.keys_epoch()
        model.new_epoch()


# ---- rows of new ids --------------------------------------------------------------------------------


def test_new_ids_take_the_next_rows_in_order_and_a_repeated_id_one_row(make_table):
    table = make_table(11)  # capacity 10, row 10 the default row
    ids = int64s(5, INT64_MIN, 5, INT64_MAX, -1, 0, INT64_MIN)
    rows, fresh = table.plan_keys(ids)
    assert rows.tolist() == [0, 1, 0, 2, 3, 4, 1] and fresh.all()
    assert table.keys_stats()["live"] == 0 and table.keys_of_rows.size == 0  # a plan changes nothing
    assert table.apply_keys(ids, rows) == 0
    assert table.keys_of_rows.tolist() == [5, INT64_MIN, INT64_MAX, -1, 0]
    rows, fresh = table.plan_keys(int64s(INT64_MAX, 7, 5, 7))
    assert rows.tolist() == [2, 5, 0, 5] and fresh.tolist() == [False, True, False, True]


any_int64 = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from([INT64_MIN, INT64_MAX, 0, -1, 1]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(any_int64, max_size=24), max_size=8), unknown_ids=st.lists(any_int64, max_size=8))
def test_any_int64_ids_get_rows_and_read_them(make_table, batches, unknown_ids):
    values = np.random.default_rng(7).standard_normal((201, DIM), dtype=np.float32)
    table = make_table(201, values=values)
    model = MapModel(200)
    for batch in batches:
        assert model.write(table, np.array(batch, dtype=np.int64))
    ids = np.array([*model.keys, *(k for k in unknown_ids if k not in model.row_of)], dtype=np.int64)
    out, unknown = np.empty((ids.size, DIM), np.float32), np.zeros(1, np.int64)
    table.gather(ids, out, by_key=True, unknown=unknown)
    assert np.array_equal(out, values[model.read(ids)])
    assert unknown[0] == ids.size - len(model.keys)


# ---- unknown ids ------------------------------------------------------------------------------------


def test_unknown_ids_read_the_default_row_and_are_counted(make_table):
    values = np.arange(9 * DIM, dtype=np.float32).reshape(9, DIM)
    table = make_table(9, values=values)  # capacity 8, row 8 the default row
    table.apply_keys(int64s(100, 200), int64s(0, 1))
    out, unknown = np.empty((5, DIM), np.float32), np.full(1, -3, np.int64)
    table.gather(int64s(200, 300, 100, 300, INT64_MIN), out, by_key=True, unknown=unknown)
    assert np.array_equal(out, values[[1, 8, 0, 8, 8]]) and unknown[0] == 3
    pooled = np.empty((2, DIM), np.float32)
    table.pool(int64s(300, 100, 7), np.array([1, 2], np.int32), None, native.POOL_MODES["sum"], pooled,
               by_key=True, unknown=unknown)
    assert np.array_equal(pooled, [values[8], values[0] + values[8]]) and unknown[0] == 2
    table.gather(int64s(8, 0), out[:2], unknown=unknown)  # rows, not keys: none unknown
    assert np.array_equal(out[:2], values[[8, 0]]) and unknown[0] == 0
    assert table.keys_stats()["unknown"] == 5
    assert table.keys_stats()["live"] == 2  # lookups never insert


# ---- eviction and protection ------------------------------------------------------------------------


def test_a_full_map_evicts_the_coldest_unprotected_id(make_table):
    table = make_table(6)  # capacity 5
    model = MapModel(5)
    assert model.write(table, int64s(10, 11, 12, 13, 14))
    epochs(table, model, 2)  # nothing protected any more
    table.heat[:5] = [7, 3, 9, 1, 5]
    rows, fresh = table.plan_keys(int64s(20, 11, 21))  # 11, in the batch, stays
    assert rows.tolist() == [3, 1, 4] and fresh.tolist() == [True, False, True]
    assert table.apply_keys(int64s(20, 11, 21), rows) == 2
    assert table.keys_of_rows.tolist() == [10, 11, 12, 20, 21]
    assert table.heat[[3, 4]].tolist() == [0, 0]  # the rows start cold
    assert table.keys_stats()["evictions"] == 2
    unknown = np.zeros(1, np.int64)
    table.gather(int64s(13, 14, 10), np.empty((3, DIM), np.float32), by_key=True, unknown=unknown)
    assert unknown[0] == 2  # the evicted ids are forgotten


def test_ids_written_or_read_in_the_last_two_epochs_are_never_evicted(make_table):
    table = make_table(5)  # capacity 4
    model = MapModel(4)
    assert model.write(table, int64s(1, 2, 3, 4))
    table.heat[:4] = [0, 9, 3, 7]
    epochs(table, model, 1)
    assert not model.write(table, int64s(5))  # all written in the previous epoch
    table.gather(int64s(1), np.empty((1, DIM), np.float32), by_key=True)  # 1, the coldest, read in epoch 1
    model.read(int64s(1))
    epochs(table, model, 1)  # 2, 3, 4 no longer protected; 1 is
    table.heat[:4] = [0, 9, 3, 7]
    assert model.write(table, int64s(5)) and model.keys == [1, 2, 5, 4]  # 3, the coldest unprotected
    assert model.write(table, int64s(6)) and model.keys == [1, 2, 5, 6]
    assert not model.write(table, int64s(7, 8))  # 2 is free for 7, nothing for 8
    table.plan_keys(int64s(2))  # a plan of a live id protects it too
    model.read(int64s(2))
    assert not model.write(table, int64s(7))
    epochs(table, model, 2)
    assert model.write(table, int64s(7, 8))
    assert table.keys_stats()["epoch"] == 4


def test_a_full_map_of_protected_ids_refuses_new_ids_and_changes_nothing(make_table):
    values = np.arange(4 * DIM, dtype=np.float32).reshape(4, DIM)
    table = make_table(4, values=values)  # capacity 3
    assert table.apply_keys(int64s(1, 2, 3), int64s(0, 1, 2)) == 0
    table.keys_epoch()
    stats = table.keys_stats()
    with pytest.raises(KeyspaceFullError, match=r"ids\[1\] = 9: all 3 rows"):
        table.plan_keys(int64s(2, 9, 10))
    assert table.keys_stats() == stats and table.keys_of_rows.tolist() == [1, 2, 3]
    out = np.empty((4, DIM), np.float32)
    table.gather(int64s(1, 2, 3, 9), out, by_key=True)
    assert np.array_equal(out, values[[0, 1, 2, 3]])


def test_eviction_follows_heat_that_changes_between_plans(make_table):
    """The candidates kept from one plan to the next are checked against the heat of their rows: reads
    by row (no protection) make a candidate hotter than another row, which is then the one taken."""
    table = make_table(201)  # capacity 200: 4 candidates kept at a time
    model = MapModel(200)
    assert model.write(table, np.arange(1000, 1200, dtype=np.int64))
    epochs(table, model, 2)
    table.heat[:200] = np.random.default_rng(3).permutation(200) + 20
    out = np.empty((30, DIM), np.float32)
    for new_id in range(30):
        assert model.write(table, int64s(new_id))
        cold = np.array(sorted(set(range(200)) - model.touched[0], key=lambda r: table.heat[r])[:3], np.int64)
        table.gather(np.repeat(cold[new_id % 3:][:1], 30), out)  # 30 reads: the coldest but two gets hot
    assert table.keys_stats()["evictions"] == 30


def test_a_plan_never_applied_leaves_the_coldest_rows_to_the_next(make_table):
    """A write planned but not applied (its sums refused, its log record not written) changes no later
    plan: the candidates it took, from the pool it found or from ones it filled, are taken again."""
    table = make_table(201)  # capacity 200: 4 candidates kept at a time
    model = MapModel(200)
    assert model.write(table, np.arange(1000, 1200, dtype=np.int64))
    epochs(table, model, 2)
    table.heat[:200] = np.arange(200)[::-1] + 10  # row 199 the coldest, then 198, ...
    assert table.plan_keys(int64s(5))[0].tolist() == [199]
    assert table.plan_keys(int64s(6, 7))[0].tolist() == [199, 198]
    assert table.plan_keys(np.arange(10, 20, dtype=np.int64))[0].tolist() == list(range(199, 189, -1))
    assert table.plan_keys(int64s(5))[0].tolist() == [199]
    assert model.write(table, int64s(5, 6)) and model.write(table, np.arange(10, 20, dtype=np.int64))
    assert model.keys[188:] == [*range(19, 9, -1), 6, 5]


@pytest.mark.parametrize("capacity", [1, 7, 64])
def test_the_index_finds_every_live_id_after_thousands_of_evictions(make_table, capacity):
    """Deletion by backward shift, under evictions of random ids among some that share home buckets
    at the end and at the start of the index (keys.c: fmix64 multiplied onto 15/8 capacity + 1
    buckets, the rows of hashed_rows with seed 0), so that clusters wrap around."""
    rng = np.random.default_rng(capacity)
    buckets = capacity + capacity * 7 // 8 + 1
    candidates = rng.integers(INT64_MIN, INT64_MAX, 200_000, dtype=np.int64, endpoint=True)
    homes = hashed_rows(candidates, buckets)
    shared = [candidates[homes == home][:capacity] for home in (buckets - 2, buckets - 1, 0, 1, buckets // 2)]
    pool = np.unique(np.concatenate([*shared, rng.integers(INT64_MIN, INT64_MAX, capacity, dtype=np.int64)]))
    table = make_table(capacity + 1)
    model = MapModel(capacity)
    out, unknown = np.empty((pool.size, DIM), np.float32), np.zeros(1, np.int64)
    for _ in range(3000):
        table.heat[:capacity] = rng.integers(0, 256, capacity)
        epochs(table, model, 2)
        model.write(table, rng.choice(pool, int(rng.integers(1, capacity + 1))))
        live = np.array(model.keys, dtype=np.int64)
        rows, fresh = table.plan_keys(live)
        assert rows.tolist() == list(range(live.size)) and not fresh.any()
        gone = pool[~np.isin(pool, live)]
        table.gather(gone, out[:gone.size], by_key=True, unknown=unknown)
        assert unknown[0] == gone.size
    assert table.keys_stats()["evictions"] > 1000


# ---- applies, loads, figures ------------------------------------------------------------------------


@pytest.mark.parametrize("ids, rows, message", [
    ((20,), (-1,), r"rows\[0\] = -1 cannot be given to an id \(capacity 5, 3 rows live\)"),
    ((20, 21), (3, 5), r"rows\[1\] = 5 cannot be given"),                 # past the capacity
    ((20,), (4,), r"rows\[0\] = 4 cannot be given"),                      # past the live rows
    ((20, 21, 20), (3, 4, 2), r"ids\[2\] = 20 cannot take rows\[2\] = 2"),  # an id given two rows
    ((20, 21), (3, 3), r"ids\[1\] = 21 cannot take rows\[1\] = 3"),       # a row given two ids
    ((20, 12), (3, 0), r"ids\[1\] = 12 cannot take rows\[1\] = 0"),       # an id live at another row
], ids=["negative", "past capacity", "past live", "id twice", "row twice", "live elsewhere"])
def test_apply_refuses_forged_rows_naming_the_position(make_table, ids, rows, message):
    table = make_table(6)  # capacity 5
    table.apply_keys(int64s(10, 11, 12), int64s(0, 1, 2))
    stats = table.keys_stats()
    with pytest.raises(InvalidArgumentError, match=message):
        table.apply_keys(int64s(*ids), int64s(*rows))
    assert table.keys_stats() == stats and table.keys_of_rows.tolist() == [10, 11, 12]


def test_apply_takes_any_rows_that_keep_the_live_rows_whole(make_table):
    """What a write-ahead log replay re-applies: repeats of an id with its row, rows that extend the
    live rows one after the other, rows of live ids (evicted, protected or not)."""
    table = make_table(6)
    assert table.apply_keys(int64s(10, 11, 10, 12), int64s(0, 1, 0, 2)) == 0
    assert table.apply_keys(int64s(13, 20, 11, 14), int64s(3, 0, 1, 4)) == 1
    assert table.keys_of_rows.tolist() == [20, 11, 12, 13, 14]
    with pytest.raises(InvalidArgumentError, match=r"rows does not fit the call"):
        table.apply_keys(int64s(1, 2), int64s(0))


def test_only_managed_tables_have_a_map(make_table):
    table = make_table(10, "hashed", seed=3)
    with pytest.raises(InvalidArgumentError):
        table.apply_keys(int64s(1), int64s(0))
    with pytest.raises(InvalidArgumentError):
        table.load_keys(int64s(1))
    assert table.keys_of_rows.size == 0 and not any(table.keys_stats().values())
    with pytest.raises(InvalidArgumentError, match="the key space is set once"):
        table.set_keys("managed")
    with pytest.raises(InvalidArgumentError, match="needs 2 rows or more"):
        native.NativeTable("one", 1, 1, "float32", 0, 1).set_keys("managed")


def test_load_and_keys_of_rows_round_trip(make_table):
    table, copy = make_table(9), make_table(9)  # capacity 8
    keys = int64s(INT64_MAX, 3, INT64_MIN, -5)
    table.load_keys(keys)
    assert table.keys_of_rows.tolist() == keys.tolist()
    rows, fresh = table.plan_keys(keys[::-1].copy())
    assert rows.tolist() == [3, 2, 1, 0] and not fresh.any()
    copy.apply_keys(int64s(1, 2), int64s(0, 1))
    copy.gather(int64s(9), np.empty((1, DIM), np.float32), by_key=True)
    copy.keys_epoch()
    copy.load_keys(table.keys_of_rows.copy())
    assert copy.keys_of_rows.tolist() == keys.tolist()
    assert copy.keys_stats() == {"live": 4, "evictions": 0, "map_bytes": table.keys_stats()["map_bytes"],
                                 "capacity": 8, "unknown": 0, "epoch": 0}
    with pytest.raises(InvalidArgumentError, match=r"keys\[2\] = 3 is given twice"):
        copy.load_keys(int64s(1, 3, 3))
    with pytest.raises(InvalidArgumentError, match="9 ids do not fit its 8 rows"):
        copy.load_keys(np.arange(9, dtype=np.int64))
    assert copy.keys_of_rows.tolist() == keys.tolist()  # nothing changed
    copy.load_keys(np.empty(0, np.int64))
    assert copy.keys_of_rows.size == 0 and copy.plan_keys(int64s(5))[0].tolist() == [0]


@pytest.mark.parametrize("capacity", [1, 7, 1000, 1024, 5000, 1 << 20])
def test_the_map_takes_under_16_bytes_a_row_from_1024_rows_on(capacity):
    shift = 16
    table = native.NativeTable("m", capacity + 1, 1, "float32", shift, -(-(capacity + 1) >> shift))
    table.set_keys("managed")
    stats = table.keys_stats()
    assert stats["capacity"] == capacity and stats["map_bytes"] <= 15.9375 * capacity + 40
    if capacity >= 1024:
        assert stats["map_bytes"] / capacity <= 16


def test_a_mapping_is_set_once_checked_whole_and_never_changed(make_table):
    """set_mapping's refusals name the first bad position and leave the table unmapped; a mapped table's
    map refuses the MANAGED calls, reports its listed ids and bytes, and plans rows without fresh ids."""
    ids, rows = int64s(INT64_MIN, 5, INT64_MAX, -7), int64s(0, 9, 9, 3)
    table = native.NativeTable("m", 10, 1, "float32", 4, 1)
    for bad_ids, bad_rows, hash_from, message in [
            (int64s(1, 2, 1, 2), int64s(0, 0, 0, 0), 0, r"mapping_ids\[2\] = 1 repeats mapping_ids\[0\]"),
            (int64s(1, 2, 3), int64s(0, 10, -1), 0, r"mapping_rows\[1\] = 10 is out of range \[0, 10\)"),
            (int64s(1), int64s(0, 1), 0, "mapping_ids has 1 ids but mapping_rows has 2 rows"),
            (int64s(1), int64s(0), 10, r"mapping_hash_from must be in \[0, num_rows = 10\), got 10"),
            (int64s(1), int64s(0), -1, "got -1")]:
        with pytest.raises(InvalidArgumentError, match=message):
            table.set_mapping(0, bad_ids, bad_rows, hash_from)
    table.set_mapping(3, ids, rows, 8)
    with pytest.raises(InvalidArgumentError, match="the key space is set once"):
        table.set_mapping(3, ids, rows, 8)
    with pytest.raises(InvalidArgumentError, match="the key space is set once"):
        table.set_keys("hashed")
    with pytest.raises(InvalidArgumentError, match="not managed"):
        table.apply_keys(int64s(1), int64s(0))
    with pytest.raises(InvalidArgumentError, match="not managed"):
        table.load_keys(int64s(1))
    listed, their_rows = table.mapping
    assert listed.tolist() == ids.tolist() and their_rows.tolist() == rows.tolist()
    assert table.keys_of_rows.size == 0
    stats = table.keys_stats()
    assert stats["live"] == 4 and stats["map_bytes"] >= 4 * (8 + 4 + 4) and stats["capacity"] == 0
    queries = int64s(5, -7, INT64_MIN, INT64_MAX, 0, 1, 2, -100)
    planned, fresh = table.plan_keys(queries)
    assert planned.tolist() == mapped_rows(queries, ids, rows, 10, 8, 3).tolist() and not fresh.any()
    assert set(planned[4:].tolist()) <= {8, 9}


# ---- hashed rows and keyed lookups ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
@pytest.mark.parametrize("num_rows", [1, 7, 2**32])
def test_hash_rows_is_the_documented_hash(seed, num_rows):
    rng = np.random.default_rng(num_rows + seed % 1000)
    ids = np.concatenate([rng.integers(INT64_MIN, INT64_MAX, 5000, dtype=np.int64, endpoint=True),
                          int64s(INT64_MIN, INT64_MAX, -1, 0, 1)])
    rows = native.hash_rows(ids, seed, num_rows)
    assert np.array_equal(rows, hashed_rows(ids, num_rows, seed))
    assert 0 <= rows.min() and rows.max() < num_rows


@pytest.mark.parametrize("num_rows", [0, -1, 2**32 + 1])
def test_hash_rows_refuses_a_table_size_out_of_range(num_rows):
    with pytest.raises(InvalidArgumentError, match=f"num_rows={num_rows}"):
        native.hash_rows(int64s(1), 0, num_rows)


def keyed_request(rng: np.random.Generator, live: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n keys: live ones, any int64, the extremes; lengths of bags over them, some empty)."""
    keys = rng.integers(INT64_MIN, INT64_MAX, n, dtype=np.int64, endpoint=True)
    pick = rng.random(n)
    keys[pick < 0.7] = rng.choice(live, int(np.count_nonzero(pick < 0.7)))
    keys[pick > 0.95] = INT64_MIN
    cuts = np.sort(rng.integers(0, n + 1, max(n // 3, 1)))
    return keys, np.diff(np.concatenate([[0], cuts, [n]])).astype(np.int32)


@pytest.mark.parametrize("kind", ["hashed", "managed", "mapped"])
def test_keyed_lookups_read_the_rows_of_their_keys(make_table, kind):
    """gather, pool and partition by key equal numpy (gather), the same call on the model's rows
    (pool) and a stable numpy sort by (fabric part, bag) of those rows (partition)."""
    rng = np.random.default_rng(5)
    num_rows, seed = 3000, 2**64 - 1
    values = rng.standard_normal((num_rows, DIM), dtype=np.float32)
    live = np.unique(rng.integers(INT64_MIN, INT64_MAX, 2500, dtype=np.int64, endpoint=True))
    mapping = (live, rng.integers(0, num_rows, live.size).astype(np.int64), 1000)  # (listed ids, rows, hash_from)
    table = make_table(num_rows, kind, seed, values, mapping)
    model = MapModel(num_rows - 1)
    if kind == "managed":
        assert model.write(table, live)
    native.set_kernel_threads(2)  # a request of 20000 ids is split across both
    counted = 0
    for n in (0, 1, 100, 20000):
        keys, lengths = keyed_request(rng, live, n)
        rows = (hashed_rows(keys, num_rows, seed) if kind == "hashed" else model.read(keys) if kind == "managed"
                else mapped_rows(keys, mapping[0], mapping[1], num_rows, mapping[2], seed))
        missed = int(np.count_nonzero(rows == num_rows - 1)) if kind == "managed" else 0
        unknown = np.zeros(1, np.int64)
        out = np.empty((n, DIM), np.float32)
        table.gather(keys, out, by_key=True, unknown=unknown)
        assert np.array_equal(out, values[rows]) and unknown[0] == missed
        weights = rng.standard_normal(n, dtype=np.float32)
        for mode in native.POOL_MODES.values():
            pooled, want = (np.empty((lengths.size, DIM), np.float32) for _ in range(2))
            table.pool(keys, lengths, weights, mode, pooled, by_key=True, unknown=unknown)
            table.pool(rows, lengths, weights, mode, want)
            assert np.array_equal(pooled, want) and unknown[0] == missed
        order, part_lengths = np.empty(n, np.int64), np.empty(2 * lengths.size, np.int32)
        ordered_weights, part_rows = np.empty(n, np.float32), np.empty(2, np.int64)
        table.partition(keys, lengths, weights, order, part_lengths, ordered_weights, part_rows, by_key=True,
                        unknown=unknown)
        parts = (rows >> CHUNK_SHIFT) % 2
        bags = np.repeat(np.arange(lengths.size), lengths)
        stable = np.lexsort((bags, parts))
        assert np.array_equal(order, rows[stable]) and np.array_equal(ordered_weights, weights[stable])
        cells = np.bincount(parts * lengths.size + bags, minlength=2 * lengths.size)
        assert np.array_equal(part_lengths, cells) and np.array_equal(part_rows, np.bincount(parts, minlength=2))
        assert unknown[0] == missed
        counted += 5 * missed
    assert table.keys_stats()["unknown"] == counted


# ---- concurrency --------------------------------------------------------------------------------------


def test_concurrent_keyed_lookups_see_an_id_s_value_or_the_default_row(make_table):
    """Readers look ids up by key while a writer gives new ids rows (evicting others, advancing
    epochs).  Row r holds [id] * DIM of the id it was written for, the default row -1: a reader sees
    its id's value or -1, whatever it races with.  The writer follows the order that makes this
    hold: a row an evicted id leaves is set to the default value before the new id takes it, and
    written after (a lookup is atomic with each of the three steps; the two of the map and the rows
    are not atomic together)."""
    capacity, universe = 255, 1000
    default = np.full((1, DIM), -1, np.float32)
    table = make_table(capacity + 1, values=np.repeat(default, capacity + 1, axis=0))
    native.set_kernel_threads(2)
    stop = threading.Event()
    failures: list[str] = []

    def write() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            ids = rng.integers(0, universe, int(rng.integers(1, 16)), dtype=np.int64)
            if rng.random() < 0.3:
                table.keys_epoch()
            try:
                rows, fresh = table.plan_keys(ids)
            except KeyspaceFullError:
                continue
            taken = np.unique(rows[fresh & (rows < table.keys_stats()["live"])])
            table.write_rows(taken, np.repeat(default, taken.size, axis=0).view(np.uint8))
            table.apply_keys(ids, rows)
            table.write_rows(rows, np.repeat(ids.astype(np.float32)[:, None], DIM, axis=1).view(np.uint8))

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        unknown = np.zeros(1, np.int64)
        while not stop.is_set():
            ids = rng.integers(0, universe, int(rng.choice([1, 64, 20000])), dtype=np.int64)
            out = np.empty((ids.size, DIM), np.float32)
            table.gather(ids, out, by_key=True, unknown=unknown)
            wrong = ~((out == ids[:, None]) | (out == -1)).all(axis=1)
            if wrong.any() or unknown[0] > np.count_nonzero(out[:, 0] == -1):
                failures.append(f"ids {ids[wrong][:4]} read {out[wrong][:4]}; {unknown[0]} unknown")

    with ThreadPoolExecutor(4) as threads:
        running = [threads.submit(write), *(threads.submit(read, seed) for seed in range(3))]
        time.sleep(2.0)
        stop.set()
        for thread in running:
            thread.result()  # (raises what the thread raised)
    assert not failures, failures[:5]
    stats = table.keys_stats()
    assert stats["live"] == capacity and stats["evictions"] > 100
    keys = table.keys_of_rows.copy()
    out = np.empty((capacity, DIM), np.float32)
    table.gather(np.arange(capacity, dtype=np.int64), out)
    assert np.array_equal(out[:, 0], keys.astype(np.float32))  # every row holds its id's value


# ---- the store ----------------------------------------------------------------------------------------


def test_a_managed_store_table_serves_unknown_ids_its_default_value(store_factory):
    store = store_factory()
    store.create_table("m", 4, 3, keys=KeySpace("managed", default_value=0.5))
    ids = int64s(10**18, INT64_MIN, -7)
    values = np.arange(9, dtype=np.float32).reshape(3, 3)
    store.write_rows("m", ids, values)
    unknown = np.zeros(1, np.int64)
    out = store.lookup("m", int64s(INT64_MIN, 42, 10**18, 42), unknown=unknown)
    assert np.array_equal(out, [values[1], [0.5] * 3, values[0], [0.5] * 3]) and unknown[0] == 2
    lengths = np.array([1, 2], np.int32)
    pooled = store.lookup_pooled("m", int64s(42, -7, 10**18), lengths, unknown=unknown)
    assert np.array_equal(pooled, [[0.5] * 3, values[2] + values[0]]) and unknown[0] == 1
    _, partials = store.pool_partials("m", int64s(42, -7, 10**18), lengths, unknown=unknown)
    assert np.array_equal(partials.sum(axis=0), pooled) and unknown[0] == 1
    info = store.describe("m")
    assert (info.num_rows, info.live_ids, info.unknown_ids) == (4, 3, 4)


def test_a_full_managed_store_table_refuses_new_ids_while_all_are_protected(store_factory):
    store = store_factory()
    store.create_table("m", 4, 2, keys=KeySpace("managed"))
    ids = int64s(1, 2, 3, 4)
    values = np.arange(8, dtype=np.float32).reshape(4, 2)
    store.write_rows("m", ids, values)
    version = store.describe("m").version
    with pytest.raises(KeyspaceFullError, match=r"ids\[0\] = 5"):
        store.write_rows("m", int64s(5), np.ones((1, 2), np.float32))
    assert store.describe("m").version == version
    assert np.array_equal(store.lookup("m", int64s(1, 2, 3, 4, 5)), [*values, [0, 0]])


def test_a_hashed_store_table_reads_the_rows_its_ids_hash_to(store_factory):
    store = store_factory()
    store.create_table("h", 1000, 4, keys=KeySpace("hashed", seed=2**64 - 1))
    rng = np.random.default_rng(11)
    ids = rng.integers(INT64_MIN, INT64_MAX, 500, dtype=np.int64, endpoint=True)
    values = rng.standard_normal((500, 4), dtype=np.float32)
    store.write_rows("h", ids, values)
    rows = hashed_rows(ids, 1000, 2**64 - 1)
    table = np.zeros((1000, 4), np.float32)
    for row, value in zip(rows, values):  # (ids that hash to one row share it: the later write wins)
        table[row] = value
    assert np.array_equal(store.lookup("h", ids), table[rows])


def test_lookups_racing_a_store_writer_that_evicts_never_read_another_ids_row(store_factory):
    """Readers look up the very ids a writer is writing (new ids taking evicted ids' rows) and the
    ids it wrote before: each row read is the id's own value (it encodes the id) or the default row,
    never what an evicted id left in the row it gives up."""
    store = store_factory(dram="4M")
    capacity, default = 4000, -1.0
    store.create_table("race", capacity, DIM, keys=KeySpace("managed", default_value=default))
    table = store._tables["race"]

    def encode(ids: np.ndarray) -> np.ndarray:
        return np.repeat((ids % 1_000_003).astype(np.float32)[:, None], DIM, axis=1)

    current, stop, wrong = [np.zeros(1, np.int64)], threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            ids = np.concatenate(current[-2:])
            out = store.lookup("race", ids)
            bad = ~((out == encode(ids)).all(axis=1) | (out == default).all(axis=1))
            if bad.any():
                wrong.append(int(bad.sum()))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    rng = np.random.default_rng(3)
    try:
        for _ in range(300):
            ids = np.unique(rng.integers(INT64_MIN, INT64_MAX, 500, dtype=np.int64))
            current.append(ids)  # (the readers follow the writer: they look these up while it writes them)
            table.native.keys_epoch()
            table.native.keys_epoch()  # no id protected: every new id evicts one once the table is full
            store.write_rows("race", ids, encode(ids))
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert wrong == [] and store.describe("race").key_evictions > 50_000
