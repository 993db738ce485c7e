"""The emulated fabric: ports spread by heat keep Zipf traffic even across the CXL ports, and the
link accounting and modelled time follow their closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from embtier.loadgen import ZipfIds
from embtierd import fabric
from embtierd.config import FabricConfig
from embtierd.tiering import TieringEngine
from embtierd.tiering_config import TieringConfig


def test_spreading_by_heat_balances_zipf_accesses_across_ports(store_factory):
    store = store_factory(dram="256K", cxl="1M")   # 64-byte rows: 4096 in DRAM, 16384 in CXL
    store.create_table("t", 100_000, 16, initializer="uniform", seed=1)
    # hot rows whose ids are all multiples of 4: placing them round robin by id (what rows get before
    # the engine deals them by heat) would put every one of them on the same port
    zipf = ZipfIds(25_000, 1.05, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        store.lookup("t", 4 * zipf.draw(rng, 20_000))   # heat, sampled 1 in 8 as in the daemon
    TieringEngine(store, TieringConfig(True, 1.0, 1 << 30, 0.25, aging_intervals=8)).run_once()
    info = store.describe("t")
    assert info.rows_by_tier["cxl"] == 16384 and sum(info.rows_by_port.values()) == 16384
    ids = 4 * zipf.draw(np.random.default_rng(1), 1_000_000)  # traffic the heat has not seen
    load = np.bincount(store.parts_of("t", ids), minlength=len(store.part_names))[1:1 + store.cxl_ports]
    assert load.min() > 0
    assert load.max() / load.mean() <= 1.2, load


def test_snake_order_deals_hottest_first():
    heat = np.array([9, 1, 8, 7, 0, 6, 5, 4, 3], dtype=np.uint8)
    in_cxl = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1], dtype=bool)
    out = np.full(9, 99, dtype=np.uint8)
    fabric.spread(heat, in_cxl, 3, out)
    # by heat: row 0 (9), 2 (8), 3 (7), 5 (6), 6 (5), 7 (4), 8 (3), 4 (0) -> ports 0 1 2 2 1 0 0 1
    assert out.tolist() == [0, 99, 1, 2, 1, 2, 1, 0, 0]


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
    store = store_factory(dram="64K", cxl="64K")   # 1024 rows of 64 bytes in each
    store.create_table("t", 5000, 16)
    scm = 1 + store.cxl_ports
    # placed in id order: rows 0-1023 in DRAM, 1024-2047 in CXL (round robin over the ports), the rest on SCM
    assert store.parts_of("t", np.array([0, 1500, 1501, 4000])).tolist() == \
        [0, 1 + 1500 % store.cxl_ports, 1 + 1501 % store.cxl_ports, scm]
    ids = np.array([4000, 4001, 4002, 4003, 4004])
    store.move_rows("t", np.arange(0, 5), "scm")     # room in DRAM
    store.move_rows("t", ids, "dram")
    assert store.parts_of("t", ids).tolist() == [0] * 5
    store.move_rows("t", np.arange(1024, 1029), "scm")  # room in CXL
    store.move_rows("t", ids, "cxl")
    assert all(1 <= p <= store.cxl_ports for p in store.parts_of("t", ids).tolist())
    store.move_rows("t", ids, "scm")
    assert store.parts_of("t", ids).tolist() == [scm] * 5
    with pytest.raises(Exception, match=r"ids\[0\] = 5000 is out of range"):
        store.parts_of("t", np.array([5000]))
