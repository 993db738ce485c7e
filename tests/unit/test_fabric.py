"""The emulated fabric: ports spread by heat keep Zipf traffic even across the CXL ports, and the
link accounting and modelled time follow their closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from embtier_tools.loadgen import ZipfIds
from embtierd import fabric
from embtierd.config import FabricConfig
from embtierd.errors import InvalidArgumentError
from embtierd.store.catalog import Store
from embtierd.tiering.config import TieringConfig
from embtierd.tiering.engine import TieringEngine
from embtierd.topology import discover

from tests.support import GIB, MPOL_BIND, assert_parts_match_addresses, get_mempolicy, make_config, make_sysfs


def test_spreading_by_heat_balances_zipf_accesses_across_ports_and_fails_without_it(store_factory):
    """Zipf(1.05) traffic the heat has not seen stays within 1.2x of the mean port load; the levelling
    really moves rows (their slots change port, their bytes stay) and is what keeps the load even:
    switched off (tolerance 100) the same run leaves the busiest port far above the mean."""
    loads, balance = {}, {}
    for tolerance in (0.1, 100.0):
        store = store_factory(dram="256K", cxl="1M", fabric={"rebalance_tolerance": tolerance})
        store.create_table("t", 100_000, 16, initializer="uniform", seed=1)  # 64-byte rows: 16384 in CXL
        # hot rows whose ids are all multiples of 4 (round robin by id would put them all on one port)
        zipf = ZipfIds(25_000, 1.05, seed=3)
        rng = np.random.default_rng(0)
        for _ in range(20):
            store.lookup("t", 4 * zipf.draw(rng, 20_000))   # heat, sampled 1 in 8 as in the daemon
        before = store.read_encoded("t", np.arange(100_000))
        TieringEngine(store, TieringConfig(True, 1.0, 1 << 30, 0.25, aging_intervals=8)).run_once()
        assert np.array_equal(store.read_encoded("t", np.arange(100_000)), before)  # every row intact
        assert_parts_match_addresses(store, "t")
        info = store.describe("t")
        assert info.rows_by_tier["cxl"] == 16384 and sum(info.rows_by_port.values()) == 16384
        ids = 4 * zipf.draw(np.random.default_rng(1), 1_000_000)  # traffic the heat has not seen
        load = np.bincount(store.parts_of("t", ids), minlength=len(store.part_names))[1:1 + store.cxl_ports]
        assert load.min() > 0
        loads[tolerance], balance[tolerance] = load.max() / load.mean(), store.port_balance("t")
    assert loads[0.1] <= 1.2 and loads[100.0] >= 2, loads
    assert balance[0.1] <= 1.1 and balance[100.0] >= 2, balance  # the heat the levelling saw, before and after





def test_deal_pours_heat_into_the_least_loaded_ports():
    load = np.array([10.0, 0.0, 4.0])
    heat = np.array([4, 0, 3, 3, 0, 2], dtype=np.uint8)
    # 12 units of heat level ports 1 and 2 at 8 (port 1 takes 8, port 2 takes 4, port 0 none); the rows,
    # hottest first (0, 3, 2, 5), go where the middle of their share falls: 2 and 5.5 -> port 1,
    # 8.5 and 11 -> port 2; the cold rows (1, 4) go round robin
    assert fabric.deal(heat, load).tolist() == [1, 0, 2, 1, 1, 2]
    assert fabric.deal(np.zeros(4, dtype=np.uint8), load).tolist() == [0, 1, 2, 0]


def test_rebalance_trades_hot_rows_of_busy_ports_for_cold_rows_of_idle_ones():
    #               port 0: 8 + 6 + 1 = 15      port 1: 1 + 0    port 2: 2 + 0
    heat = np.array([8, 6, 1, 1, 0, 2, 0], dtype=np.uint8)
    port = np.array([0, 0, 0, 1, 1, 2, 2])
    # mean 6, port 0 is 9 over: its hottest rows that fit in 9 are 8 (then 6: 14 > 9); ports 1 and 2 lack
    # 5 and 4; the middle of 8 falls in port 1's share, so row 0 trades places with port 1's coldest, row 4
    hot, cold = fabric.rebalance(heat, port, 3, 0.1, 10)
    assert list(zip(hot.tolist(), cold.tolist())) == [(0, 4)]
    port[hot], port[cold] = port[cold], port[hot]
    assert fabric.port_loads(heat, port, 3).tolist() == [7, 9, 2]  # busiest 2.5x the mean before, 1.5x after
    assert fabric.rebalance(heat, port, 3, 2.0, 10)[0].size == 0       # within the tolerance
    assert fabric.rebalance(heat, np.array([0, 0, 0, 1, 1, 2, 2]), 3, 0.1, 0)[0].size == 0  # no budget
    big = np.random.default_rng(0).zipf(1.3, 50_000).clip(0, 255).astype(np.uint8)
    where = np.zeros(big.size, dtype=np.int64)
    where[25_000:] = np.arange(25_000) % 3 + 1   # half of the rows, and of the heat, on port 0
    counts = np.bincount(where).tolist()
    hot, cold = fabric.rebalance(big, where, 4, 0.1, 1 << 30)
    assert np.intersect1d(hot, cold).size == 0 and np.unique(hot).size == hot.size
    where[hot], where[cold] = where[cold], where[hot]
    load = fabric.port_loads(big, where, 4)
    assert load.max() / load.mean() <= 1.05 and np.bincount(where).tolist() == counts
    first = fabric.rebalance(big, np.r_[np.zeros(25_000, np.int64), np.arange(25_000) % 3 + 1], 4, 0.1, 100)
    assert first[0].size == 100 and big[first[0]].tolist() == sorted(big[first[0]].tolist(), reverse=True)
    even = fabric.rebalance(np.array([3, 3, 3], dtype=np.uint8), np.array([0, 1, 2]), 3, 0.0, 10)
    assert even[0].size == 0


@pytest.mark.parametrize("offload, device, host", [
    ("host", {"dram": 4 * 256, "cxl1": 2 * 256}, 6 * 64 * 2),
    ("device", {"dram": 10 * 64 * 4, "cxl1": 10 * 64 * 4}, 2 * 10 * 64 * 2),
    ("switch", {"dram": 10 * 64 * 4, "cxl1": 10 * 64 * 4}, 10 * 64 * 2),
])
def test_traffic_follows_the_closed_form(offload, device, host):
    names = fabric.part_names(2)
    traffic = fabric.Traffic(offload)
    # 10 bags of dim 64, 256-byte stored rows, float16 on the wire: 4 rows in DRAM, 2 on port cxl1
    traffic.add_table(names, np.array([4, 0, 2, 0]), 10, 64, 256, 2)
    assert traffic.device_link_bytes == device and traffic.host_link_bytes == host
    config = FabricConfig(device_link_bytes_per_second=1e9, host_link_bytes_per_second=2e9, hop_latency_ns=100)
    slowest = max(device.values())
    assert traffic.modelled_seconds(config) == pytest.approx(200e-9 + slowest / 1e9 + host / 2e9)


def test_a_rows_part_follows_its_moves(store_factory):
    store = store_factory(dram="64K", cxl="64K")   # 1024 rows of 64 bytes in each, CXL in 4 ports of 256
    store.create_table("t", 5000, 16)
    scm = 1 + store.cxl_ports
    # placed in id order: rows 0-1023 in DRAM, 1024-2047 in CXL (a chunk of 256 rows on each port), the rest on SCM
    assert store.describe("t").rows_by_port == {"cxl0": 256, "cxl1": 256, "cxl2": 256, "cxl3": 256}
    assert_parts_match_addresses(store, "t")
    assert store.parts_of("t", np.array([0, 4000])).tolist() == [0, scm]
    ids = np.array([4000, 4001, 4002, 4003, 4004])
    store.move_rows("t", np.arange(0, 5), "scm")     # room in DRAM
    store.move_rows("t", ids, "dram")
    assert store.parts_of("t", ids).tolist() == [0] * 5
    store.move_rows("t", np.arange(1024, 2048, 200), "scm")  # room in CXL on every port
    store.move_rows("t", ids, "cxl")
    assert all(1 <= p <= store.cxl_ports for p in store.parts_of("t", ids).tolist())
    assert_parts_match_addresses(store, "t")
    store.move_rows("t", ids, "scm")
    assert store.parts_of("t", ids).tolist() == [scm] * 5
    with pytest.raises(InvalidArgumentError, match=r"ids\[0\] = 5000 is out of range"):
        store.parts_of("t", np.array([5000]))


def test_each_cpu_less_node_is_a_port_bound_to_its_node(tmp_path):
    """On a (fake) host with CPU-less nodes 0 and 2 (3 and 1 GiB) and CPUs on node 1, the CXL tier has two
    ports sized 3:1; the segment of node 0, which exists here, is bound to it (the kernel says so);
    node 2's bind is refused on this machine and reported, and the tier still serves."""
    sysfs = make_sysfs(tmp_path / "sys", {0: ("", 3 * GIB // 1024), 1: ("0-1", 8 * GIB // 1024),
                                          2: ("", GIB // 1024)})
    store = Store(make_config(tmp_path / "state", dram="64K", cxl="64M"), discover(sysfs))
    try:
        cxl = store.tiers.cxl
        assert not cxl.emulated and store.cxl_ports == 2 and store.part_names == ["dram", "cxl0", "cxl1", "scm"]
        ports = store.port_infos()
        assert [(p.name, p.numa_node) for p in ports] == [("cxl0", 0), ("cxl1", 2)]
        assert [p.capacity_bytes for p in ports] == [48 << 20, 16 << 20]
        assert cxl.bind_errors == ["", "EINVAL"] and "unbound: EINVAL" in cxl.describe()
        assert get_mempolicy(cxl.base + (1 << 20)) == (MPOL_BIND, {0})
        assert get_mempolicy(cxl.base + (48 << 20) - 1) == (MPOL_BIND, {0})
        assert get_mempolicy(cxl.base + (48 << 20))[0] != MPOL_BIND or get_mempolicy(cxl.base + (48 << 20))[1] != {0}
        store.create_table("t", 200_000, 64, initializer="uniform", seed=2)
        info = store.describe("t")
        assert sum(info.rows_by_port.values()) == info.rows_by_tier["cxl"] > 0
        assert min(info.rows_by_port.values()) > 0
        assert_parts_match_addresses(store, "t")
        ids = np.ascontiguousarray(np.flatnonzero(store.parts_of("t", np.arange(200_000)) == 2)[::50])  # on node 2
        values = np.random.default_rng(5).standard_normal((ids.size, 64), dtype=np.float32)
        store.write_rows("t", ids, values)
        assert np.array_equal(store.lookup("t", ids), values)
    finally:
        store.close()


def test_kernels_count_rows_per_part_and_partition_by_part(store_factory):
    """part_rows of gather and pool, and et_partition's order, against numpy on a table spread over
    DRAM, the four CXL ports and SCM."""
    store = store_factory(dram="64K", cxl="256K", scm="16M")   # 64-byte rows: 1024 in DRAM, 4096 in CXL
    store.create_table("t", 8000, 16, initializer="uniform", seed=4)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 8000, 3000)
    lengths = rng.multinomial(3000, np.ones(100) / 100).astype(np.int32)
    lengths[[3, 50]] = 0  # empty bags
    ids = ids[:lengths.sum()]
    weights = rng.random(ids.size, dtype=np.float32)
    parts = store.parts_of("t", ids).astype(np.int64)
    nparts = len(store.part_names)
    assert np.all(np.bincount(parts, minlength=nparts) > 0)
    counts = np.zeros(nparts, dtype=np.int64)
    rows = store.lookup("t", ids, part_rows=counts)
    assert counts.tolist() == np.bincount(parts, minlength=nparts).tolist()
    counts[:] = 0
    store.lookup_pooled("t", ids, lengths, weights, "sum", part_rows=counts)
    assert counts.tolist() == np.bincount(parts, minlength=nparts).tolist()
    bag = np.repeat(np.arange(lengths.size), lengths)
    for mode in ("sum", "mean", "max"):
        counts[:] = 0
        present, partials = store.pool_partials("t", ids, lengths, weights, mode, part_rows=counts)
        assert present.tolist() == list(range(nparts)) and counts.tolist() == np.bincount(parts).tolist()
        weighted = rows * weights[:, None]
        for i, part in enumerate(present):
            mine = parts == part
            expected = np.full((lengths.size, 16), -np.inf if mode == "max" else 0.0, dtype=np.float32)
            (np.maximum if mode == "max" else np.add).at(expected, bag[mine], weighted[mine])
            np.testing.assert_allclose(partials[i], expected, rtol=1e-5, atol=1e-6)
    # ids all on one part: only that part comes back
    dram_ids = np.ascontiguousarray(np.flatnonzero(store.parts_of("t", np.arange(8000)) == 0)[:10])
    present, partials = store.pool_partials("t", dram_ids, np.array([10], dtype=np.int32))
    assert present.tolist() == [0] and partials.shape == (1, 1, 16)


def test_partition_and_part_counts_refuse_bad_input(store_factory):
    store = store_factory()
    store.create_table("t", 100, 8)
    with pytest.raises(InvalidArgumentError, match=r"ids\[1\] = 100 is out of range"):
        store.pool_partials("t", np.array([1, 100]), np.array([2], dtype=np.int32))
    with pytest.raises(InvalidArgumentError, match="lengths"):
        store.pool_partials("t", np.array([1, 2]), np.array([3, -1], dtype=np.int32))
    with pytest.raises(InvalidArgumentError, match="lengths"):
        store.pool_partials("t", np.array([1, 2]), np.array([1], dtype=np.int32))
    with pytest.raises(InvalidArgumentError, match="part_rows must be an int64 array"):
        store.lookup("t", np.array([1]), part_rows=np.zeros(2, dtype=np.int64))
    table = store._tables["t"].native
    with pytest.raises(InvalidArgumentError, match=r"rejected its arguments \(chunk part,"):
        table.set_chunk_part(0, 0, len(store.part_names))   # a part the table does not have
    with pytest.raises(InvalidArgumentError, match=r"\(parts"):
        table.set_parts(3)                                   # once only
    assert store.lookup("t", np.array([5])).shape == (1, 8)  # still serving
