"""Tier set-up on hosts with and without CXL memory, from fake sysfs trees.

This host has one NUMA node, so binding to a fake CPU-less node 2 is
refused by the kernel (EINVAL); the tier must still pick that node, say it
is not emulated, record the refusal, and keep working."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from embtierd.store.catalog import Store
from embtierd.topology import discover

from tests.support import GIB, KIB, make_config, make_sysfs


def test_cpuless_node_backs_the_cxl_tier(tmp_path):
    root = make_sysfs(tmp_path / "sys", {0: ("0-1", 24 * GIB // KIB), 2: ("\n", 64 * GIB // KIB)}, online="0,2")
    store = Store(make_config(tmp_path / "state", dram="1M", cxl="1M"), discover(root))
    try:
        infos = {t.name: t for t in store.tier_infos()}
        assert infos["cxl"].numa_node == 2 and infos["cxl"].emulated is False
        assert infos["dram"].numa_node == 0 and infos["dram"].emulated is False
        assert store.tiers.cxl.nodes == [2] and store.tiers.dram.nodes == [0]
        assert "NUMA node(s) 2" in store.tiers.cxl.describe()
        if not Path("/sys/devices/system/node/node2").exists():
            assert store.tiers.cxl.bind_error == "EINVAL"  # reported, and the tier still serves
        store.create_table("t", 10_000, 16)  # spills from DRAM into CXL
        assert store.describe("t").emulated_by_tier["cxl"] is False
        ids = np.arange(10_000, dtype=np.int64)
        values = np.random.default_rng(0).standard_normal((10_000, 16), dtype=np.float32)
        store.write_rows("t", ids, values)
        np.testing.assert_array_equal(store.lookup("t", ids), values)
    finally:
        store.close()


def test_without_cpuless_node_cxl_is_emulated(tmp_path):
    root = make_sysfs(tmp_path / "sys", {0: ("0", 8 * GIB // KIB), 1: ("1", 8 * GIB // KIB)}, online="0-1")
    store = Store(make_config(tmp_path / "state", dram="1M", cxl="1M"), discover(root))
    try:
        infos = {t.name: t for t in store.tier_infos()}
        assert infos["cxl"].emulated is True and infos["cxl"].numa_node == -1
        assert store.tiers.dram.nodes == [0, 1] and store.tiers.cxl.nodes == [0, 1]
        assert infos["dram"].numa_node == -1  # bound to two nodes, not one
        assert "emulated in DRAM" in store.tiers.cxl.describe()
        assert infos["scm"].path.endswith("scm.dat")
    finally:
        store.close()


def test_this_host(tmp_path):
    store = Store(make_config(tmp_path / "state"))
    try:
        assert store.tiers.dram.bind_error == ""  # binding DRAM to the real CPU nodes works
        assert {t.name for t in store.tier_infos()} == {"dram", "cxl", "scm"}
    finally:
        store.close()
