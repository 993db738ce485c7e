"""The sharding planner: its cost model on hand-computed cases, and its plans on a skewed mix of
tables over three nodes (balance, memory, stability across re-plans, the errors it raises)."""

from __future__ import annotations

import numpy as np
import pytest
from embtier.cluster.coord import NodeInfo
from embtier.cluster.plan import Plan, Replica, TablePlan, make_layout, with_layout
from embtier_tools.planner import CALL_SECONDS, TableSpec, greedy_table_wise, plan, predict, shard_bytes

G = 1 << 30


def make_node(name: str, dram: int = 8 * G, cxl: int = 16 * G, scm: int = 64 * G, incarnation: str = "a") -> NodeInfo:
    return NodeInfo(name, f"{name}:50051", incarnation, {"dram": dram, "cxl": cxl, "scm": scm}, {},
                    {"dram": 20e9, "cxl": 10e9, "scm": 2e9})


def make_nodes(n: int = 3, **kwargs) -> dict[str, NodeInfo]:
    return {f"n{i}": make_node(f"n{i}", **kwargs) for i in range(n)}


def skewed_mix() -> list[TableSpec]:
    """20 tables: a few huge and hot, one wide, one keyed, one with a recorded skewed trace, many small."""
    rng = np.random.default_rng(7)
    tables = [TableSpec("huge0", 40_000_000, 64, requests_per_second=2000, pooling_factor=60),
              TableSpec("huge1", 30_000_000, 128, dtype="float16", requests_per_second=1500, pooling_factor=40),
              TableSpec("huge2", 20_000_000, 96, dtype="int8", requests_per_second=1500, pooling_factor=50),
              TableSpec("wide", 200_000, 256, requests_per_second=2000, pooling_factor=20),
              TableSpec("zipf", 5_000_000, 32, requests_per_second=1000, pooling_factor=20,
                        trace=np.minimum(rng.zipf(1.3, 100_000) - 1, 4_999_999)),
              TableSpec("keyed", 1_000_000, 32, key_space="managed", requests_per_second=500, pooling_factor=5,
                        replicas=2)]
    tables += [TableSpec(f"small{i:02d}", 10_000 * (i + 1), 16 * (1 + i % 4), requests_per_second=100 + 20 * i,
                         pooling_factor=3) for i in range(14)]
    return tables


def node_bytes(report) -> dict[str, int]:
    return {n: x.bytes for n, x in report.nodes.items()}


def test_the_planner_beats_table_wise_greedy_on_a_skewed_mix():
    tables, nodes = skewed_mix(), make_nodes()
    planned, report = plan(tables, nodes, None, "c")
    _, baseline = greedy_table_wise(tables, nodes, "c")
    assert report.slowest_load < baseline.slowest_load
    rescored = predict(planned, tables, nodes)
    assert rescored.slowest_load == pytest.approx(report.slowest_load)
    assert planned.version == 1 and set(planned.tables) == {t.name for t in tables}
    Plan.from_json(planned.to_json())  # checks it on the way in
    assert set(planned.predicted) == set(nodes)


def test_memory_never_exceeds_a_nodes_capacity():
    tables, nodes = skewed_mix(), make_nodes(dram=2 * G, cxl=4 * G, scm=16 * G)
    planned, report = plan(tables, nodes, None, "c")
    recount = dict.fromkeys(nodes, 0)
    for spec in tables:
        t = planned.tables[spec.name]
        for s in t.layout.shards:
            for r in s.replicas:
                recount[r.node] += shard_bytes(t, s)
    for n, info in nodes.items():
        assert recount[n] == report.nodes[n].bytes <= sum(info.capacity_bytes.values())
        for tier in ("dram", "cxl"):
            assert report.nodes[n].bytes_by_tier[tier] <= info.capacity_bytes[tier]


def test_a_table_bigger_than_any_node_is_row_wise():
    big = TableSpec("big", 500_000_000, 12, requests_per_second=100, pooling_factor=10)  # 22 GiB, no column split
    planned, _ = plan([big], make_nodes(dram=2 * G, cxl=4 * G, scm=12 * G), None, "c")
    t = planned.tables["big"]
    assert t.layout.sharding == "row" and t.layout.split == "mod" and len(t.layout.shards) >= 2
    assert "exceeds any node's free" in t.reason


def test_a_skewed_trace_gets_range_bounds_that_balance_its_accesses():
    rng = np.random.default_rng(1)
    ids = 6 * rng.integers(0, 1000, 50_000)  # every id a multiple of 6: "mod" over 2 or 3 gets one shard all
    spec = TableSpec("skewed", 300_000_000, 12, requests_per_second=1000, pooling_factor=50, trace=ids)
    planned, _ = plan([spec], make_nodes(dram=2 * G, cxl=4 * G, scm=12 * G), None, "c", call_seconds=0.0)
    lay = planned.tables["skewed"].layout
    assert lay.sharding == "row" and lay.split == "range"
    shares = [np.mean((ids >= s.rows[0]) & (ids < s.rows[1])) for s in lay.shards]
    assert max(shares) - min(shares) < 0.05
    assert "balancing the trace's accesses" in planned.tables["skewed"].reason


def test_managed_and_mapped_tables_are_table_wise():
    tables = [TableSpec(f"{kind}", 50_000_000, 64, key_space=kind, requests_per_second=3000, pooling_factor=50)
              for kind in ("managed", "mapped")]
    planned, _ = plan(tables, make_nodes(), None, "c")
    for t in planned.tables.values():
        assert t.layout.sharding == "table" and "ids stay on one shard" in t.reason


def test_replicas_land_on_distinct_nodes_and_fewer_nodes_than_replicas_is_said():
    tables = [TableSpec("r3", 1_000_000, 64, requests_per_second=3000, pooling_factor=50, replicas=3),
              TableSpec("r2", 1000, 16, requests_per_second=10, pooling_factor=1, replicas=2)]
    planned, _ = plan(tables, make_nodes(3), None, "c")
    for t in planned.tables.values():
        for s in t.layout.shards:
            assert len({r.node for r in s.replicas}) == len(s.replicas) == {"r3": 3, "r2": 2}[t.name]
    planned, _ = plan(tables, make_nodes(2), None, "c")
    assert all(len(s.replicas) == 2 for s in planned.tables["r3"].layout.shards)
    assert "2 replicas, not 3: only 2 nodes" in planned.tables["r3"].reason


def test_replanning_an_unchanged_cluster_moves_nothing():
    tables, nodes = skewed_mix(), make_nodes()
    first, _ = plan(tables, nodes, None, "c")
    second, report = plan(tables, nodes, first, "c")
    assert second.version == 2 and second.parent == 1
    assert report.moves == [] and report.added == [] and report.dropped == []
    assert all(second.tables[n].layout == first.tables[n].layout for n in first.tables)


def test_a_restarted_node_moves_its_shards():
    tables, nodes = skewed_mix(), make_nodes()
    first, _ = plan(tables, nodes, None, "c")
    nodes["n1"] = make_node("n1", incarnation="b")
    second, report = plan(tables, nodes, first, "c")
    on_n1 = {n for n, t in first.tables.items() if "n1" in t.layout.nodes()}
    assert on_n1 <= set(report.moves)
    assert all(r.incarnation == "b" for t in second.tables.values() for s in t.layout.shards for r in s.replicas
               if r.node == "n1")


def test_removing_a_node_moves_its_shards_and_what_the_report_names():
    tables, nodes = skewed_mix(), make_nodes()
    first, _ = plan(tables, nodes, None, "c")
    del nodes["n2"]
    second, report = plan(tables, nodes, first, "c")
    on_n2 = {n for n, t in first.tables.items() if "n2" in t.layout.nodes()}
    changed = {n for n in first.tables if second.tables[n].layout != first.tables[n].layout}
    assert on_n2 and on_n2 <= changed == set(report.moves)
    assert "n2" not in second.nodes()
    for n, t in second.tables.items():
        if n in report.moves:
            assert all(".v2." in s.name for s in t.layout.shards)


def test_a_table_that_fits_nowhere_is_named():
    tables = [TableSpec("small", 1000, 16), TableSpec("enormous", 4_000_000_000, 64)]
    with pytest.raises(ValueError, match="'enormous'.*free memory per node n0 "):
        plan(tables, make_nodes(), None, "c")
    with pytest.raises(ValueError, match="'enormous'"):
        greedy_table_wise(tables, make_nodes(), "c")


def test_the_report_text_names_every_node_and_table():
    tables, nodes = skewed_mix(), make_nodes()
    _, report = plan(tables, nodes, None, "c")
    text = report.text()
    for name in [*nodes, *(t.name for t in tables)]:
        assert name in text
    assert f"slowest node {report.slowest_node}" in text


def one_table_plan(spec: TableSpec, sharding: str, nodes: list[str]) -> Plan:
    t = TablePlan(spec.name, spec.num_rows, spec.dim, spec.dtype)
    lay = make_layout(t, 1, sharding, [[Replica(n, "a")] for n in nodes])
    return Plan("c", 1, tables={spec.name: with_layout(t, lay)})


def tiny_node(name: str, dram: int) -> NodeInfo:
    return NodeInfo(name, "", "a", {"dram": dram, "cxl": 0, "scm": 1 << 20}, {},
                    {"dram": 1000.0, "scm": 100.0})


def test_the_compute_of_a_shard_follows_the_formula():
    # 100 rows x 4 float32 (16 B a row), 10 requests/s x 2 bags x 5 ids: 100 ids/s, 1600 B/s read.
    # DRAM holds 1000 of its 1600 B: 5/8 of the reads (1000 B/s) at 1000 B/s, 3/8 (600 B/s) at 100 B/s;
    # and each of the 10 requests a second is a call on the node (CALL_SECONDS of fixed work).
    spec = TableSpec("t", 100, 4, requests_per_second=10, bags_per_request=2, pooling_factor=5)
    nodes = {"n0": tiny_node("n0", 1000)}
    report = predict(one_table_plan(spec, "table", ["n0"]), [spec], nodes, link_bytes_per_second=320.0)
    x = report.nodes["n0"]
    assert x.compute_seconds_per_second == pytest.approx(1000 / 1000 + 600 / 100 + 10 * CALL_SECONDS)
    assert x.communication_seconds_per_second == pytest.approx(20 * 4 * 4 / 320)  # bags/s x dim x 4 B
    assert x.bytes_by_tier == {"dram": 1000, "cxl": 0, "scm": 600}
    # row-wise over two nodes: 50 rows and 50 ids/s each (800 B/s, all in DRAM); each sends whole bags
    nodes["n1"] = tiny_node("n1", 1000)
    report = predict(one_table_plan(spec, "row", ["n0", "n1"]), [spec], nodes, link_bytes_per_second=320.0)
    for x in report.nodes.values():  # (every request reaches both shards: a call on each node)
        assert x.compute_seconds_per_second == pytest.approx(800 / 1000 + 10 * CALL_SECONDS)
        assert x.communication_seconds_per_second == pytest.approx(1.0)
    # replicated: its reads are shared, its memory is not
    report = predict(Plan("c", 1, tables={"t": with_layout(
        TablePlan("t", 100, 4), make_layout(TablePlan("t", 100, 4), 1, "table",
                                            [[Replica("n0", "a"), Replica("n1", "a")]]))}), [spec], nodes,
        link_bytes_per_second=320.0)
    for x in report.nodes.values():
        assert x.compute_seconds_per_second == pytest.approx((1000 / 1000 + 600 / 100 + 10 * CALL_SECONDS) / 2)
        assert x.bytes == 1600


def test_a_trace_puts_the_hot_rows_in_dram():
    # every recorded read hits rows 0..9 (160 B): they fit DRAM, so all the compute is at DRAM's rate
    spec = TableSpec("t", 100, 4, requests_per_second=10, bags_per_request=2, pooling_factor=5,
                     trace=np.arange(1000) % 10)
    report = predict(one_table_plan(spec, "table", ["n0"]), [spec], {"n0": tiny_node("n0", 1000)}, call_seconds=0)
    assert report.nodes["n0"].compute_seconds_per_second == pytest.approx(1600 / 1000)
