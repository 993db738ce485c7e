"""The shard plan's arithmetic (embtier.cluster.plan), the daemon's plan fence and a receiving
table's fill writes, against numpy models."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from embtier.cluster.coord import parse_cluster
from embtier.cluster.plan import (
    Plan,
    PlanError,
    Replica,
    TablePlan,
    bag_lengths,
    make_layout,
    merge_pooled,
    split_ids,
    with_layout,
)
from embtier.keys import hashed_rows
from embtierd.cluster.fence import PlanFence, StalePlanError
from embtierd.errors import FailedPreconditionError, InvalidArgumentError

REPS = [[Replica(f"n{k}", "i")] for k in range(3)]


def layouts(t: TablePlan):
    yield make_layout(t, 1, "table", REPS[:1])
    yield make_layout(t, 1, "row", REPS, split="mod")
    yield make_layout(t, 1, "row", REPS, split="range", bounds=[0, 7, 50, t.num_rows])
    yield make_layout(t, 1, "column", REPS[:2])
    yield make_layout(t, 1, "column", REPS, column_edges=[0, 8, 9, t.dim])


def shard_tables(t: TablePlan, lay, table: np.ndarray) -> dict[str, np.ndarray]:
    """Each shard's local table, cut from the whole one by the layout's own rules."""
    out = {}
    rows = np.arange(t.num_rows)
    for s in lay.shards:
        if lay.sharding == "row":
            part = split_ids(TablePlan(t.name, t.num_rows, t.dim, layout=lay), lay, rows)
            mine = next(p for p in part if p.shard.name == s.name)
            local = np.zeros((s.num_rows, s.dim), np.float32)
            local[mine.local] = table[mine.picked]
            out[s.name] = local
        else:
            out[s.name] = table[:, s.columns[0]:s.columns[1]]
    return out


def pool(table, ids, lengths, weights, mode):
    out = np.zeros((lengths.size, table.shape[1]), np.float64)
    at = 0
    for b, n in enumerate(lengths):
        rows = table[ids[at:at + n]].astype(np.float64)
        if weights is not None:
            rows *= weights[at:at + n, None]
        if n:
            out[b] = rows.max(0) if mode == "max" else rows.sum(0) / (n if mode == "mean" else 1)
        at += n
    return out


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("weighted", [False, True])
def test_split_and_merge_equal_pooling_the_whole_table(mode, weighted):
    t = TablePlan("t", 101, 16)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((101, 16)).astype(np.float32)
    lengths = rng.integers(0, 9, 40).astype(np.int32)
    lengths[:2] = 0
    ids = rng.integers(0, 101, int(lengths.sum()))
    weights = rng.random(ids.size).astype(np.float32) if weighted else None
    for lay in layouts(t):
        local = shard_tables(t, lay, table)
        parts = split_ids(t, lay, ids)
        bag_of = np.repeat(np.arange(lengths.size), lengths)
        pooled, plens = [], []
        part_mode = mode if lay.sharding != "row" else ("max" if mode == "max" else "sum")
        for p in parts:
            plen = lengths if p.picked is None else bag_lengths(p.picked, bag_of, lengths.size)
            w = weights if p.picked is None or weights is None else weights[p.picked]
            pooled.append((p, pool(local[p.shard.name], p.local, plen, w, part_mode).astype(np.float32)))
            plens.append(plen)
        got = merge_pooled(pooled, lay, lengths, plens, mode, t.dim)
        np.testing.assert_allclose(got, pool(table, ids, lengths, weights, mode), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{lay.sharding} {lay.split}")


def test_hashed_ids_route_by_their_rows():
    t = TablePlan("h", 1000, 8, key_space="hashed", key_seed=3)
    lay = make_layout(t, 1, "row", REPS)
    keys = np.random.default_rng(1).integers(-2**63, 2**63 - 1, 500, dtype=np.int64)
    rows = hashed_rows(keys, 1000, 3)
    seen = np.zeros(500, bool)
    for p in split_ids(t, lay, keys):
        np.testing.assert_array_equal(rows[p.picked] % 3, p.shard.index)
        np.testing.assert_array_equal(p.local, rows[p.picked] // 3)
        assert (p.local < p.shard.num_rows).all()
        seen[p.picked] = True
    assert seen.all()


def test_out_of_range_ids_name_the_id():
    t = TablePlan("d", 10, 4)
    with pytest.raises(ValueError, match=r"ids: 10 is out of range \[0, 10\) for table 'd'"):
        split_ids(t, make_layout(t, 1, "row", REPS), np.array([1, 10]))


def test_plans_round_trip_and_bad_layouts_are_refused():
    t = TablePlan("t", 10, 16)
    plan = Plan("c", 1, 0, 5.0, {"t": with_layout(t, make_layout(t, 1, "row", REPS),
                                                  next=make_layout(t, 1, "column", REPS[:2]))})
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match="column shards must cover"):
        make_layout(t, 1, "column", REPS, column_edges=[0, 4, 4, 16])
    with pytest.raises(PlanError, match="range shards must cover"):
        make_layout(t, 1, "row", REPS, split="range", bounds=[0, 5, 4, 10])
    with pytest.raises(PlanError, match="managed table is placed table-wise"):
        make_layout(TablePlan("m", 10, 4, key_space="managed"), 1, "row", REPS)
    with pytest.raises(PlanError, match="names a node twice"):
        make_layout(t, 1, "table", [[Replica("n0", "a"), Replica("n0", "a")]])
    with pytest.raises(PlanError, match="not a shard plan"):
        Plan.from_json('{"version": 1}')


def test_cluster_specs_are_checked():
    assert parse_cluster("prod@10.0.0.1:2379,10.0.0.2:2379") == ("prod", ["10.0.0.1:2379", "10.0.0.2:2379"])
    for bad in ("prod", "@h:1", "prod@", "pr od@h:1", "prod@host"):
        with pytest.raises(ValueError):
            parse_cluster(bad)


def test_the_fence_refuses_older_plans_and_waits_for_their_requests():
    fence = PlanFence()
    token = fence.enter(3)  # admitted under fence version 0
    done = threading.Event()

    def advance():
        fence.advance(4)
        done.set()

    th = threading.Thread(target=advance)
    th.start()
    time.sleep(0.1)
    assert not done.is_set()  # a request routed before version 4 still runs
    with pytest.raises(StalePlanError, match="routed by plan version 3; this daemon serves version 4"):
        fence.enter(3)
    fence.exit(token)
    th.join(timeout=5)
    assert done.is_set() and fence.version == 4
    fence.exit(fence.enter(5))
    assert fence.advance(4)  # an older version changes nothing
    assert PlanFence.requested([("embtier-plan-version", "7")]) == 7 and PlanFence.requested([]) is None
    with pytest.raises(InvalidArgumentError, match="is not a plan version"):
        PlanFence.requested([("embtier-plan-version", "x")])


def test_fill_writes_only_rows_no_plain_write_set(store_factory):
    s = store_factory()
    s.create_table("r", 100, 4, receiving=True)
    s.write_rows("r", np.array([3, 5]), np.full((2, 4), 7.0, np.float32))
    version, written = s.fill_rows("r", np.arange(10), np.ones((10, 4), np.float32))
    assert written == 8 and version == s.describe("r").version == 2
    want = np.zeros((100, 4), np.float32)
    want[:10] = 1.0
    want[[3, 5]] = 7.0
    np.testing.assert_array_equal(s.lookup("r", np.arange(100)), want)
    s.write_rows("r", np.array([0]), np.full((1, 4), 9.0, np.float32))  # a plain write after the fill wins
    assert s.fill_rows("r", np.array([0]), np.ones((1, 4), np.float32))[1] == 0
    s.create_table("plain", 10, 4)
    with pytest.raises(FailedPreconditionError, match="not receiving a move"):
        s.fill_rows("plain", np.arange(2), np.ones((2, 4), np.float32))
    with pytest.raises(InvalidArgumentError, match="receiving applies to dense tables"):
        from embtierd.keys.space import KeySpace
        s.create_table("h", 10, 4, keys=KeySpace("hashed"), receiving=True)
