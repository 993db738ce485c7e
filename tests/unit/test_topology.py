"""Tests for embtierd.topology against small fake sysfs trees built in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from embtierd.errors import ConfigError
from embtierd.topology import (
    NumaNode,
    Topology,
    TopologyError,
    discover,
    format_cpulist,
    nodemask_words,
    parse_cpulist,
    pick_cxl_nodes,
)

from tests.support import GIB, KIB, make_sysfs

# --- parse_cpulist / format_cpulist ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-3,8,10-11\n", (0, 1, 2, 3, 8, 10, 11)),
        ("0\n", (0,)),
        ("5", (5,)),
        ("2-2", (2,)),
        ("  0-1 , 4 \n", (0, 1, 4)),
        ("8,0-1", (0, 1, 8)),
        ("0-2,1-3", (0, 1, 2, 3)),
        ("", ()),
        ("\n", ()),
        ("   \n", ()),
    ],
)
def test_parse_cpulist_valid(text: str, expected: tuple[int, ...]) -> None:
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize("text", ["abc", "0-", "-1", "3-1", "0,,2", "1;2", "0-3,x", "1.5", "0 1"])
def test_parse_cpulist_garbage_raises_naming_text(text: str) -> None:
    with pytest.raises(TopologyError) as excinfo:
        parse_cpulist(text)
    assert repr(text) in str(excinfo.value)


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        ((), "-"),
        ((0,), "0"),
        ((0, 1), "0-1"),
        ((0, 1, 2, 3, 8, 10, 11), "0-3,8,10-11"),
        ([11, 3, 2, 3], "2-3,11"),
    ],
)
def test_format_cpulist(cpus: tuple[int, ...], expected: str) -> None:
    assert format_cpulist(cpus) == expected


def test_format_parse_roundtrip() -> None:
    cpus = (0, 2, 3, 4, 7, 64, 65, 127)
    assert parse_cpulist(format_cpulist(cpus)) == cpus


# --- nodemask_words ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "words", "maxnode"),
    [
        ({0}, [1], 65),
        ({2}, [4], 65),
        ({0, 65}, [1, 2], 129),
        ({63}, [1 << 63], 65),
        ({0, 2}, [5], 65),
    ],
)
def test_nodemask_words(nodes: set[int], words: list[int], maxnode: int) -> None:
    assert nodemask_words(nodes) == (words, maxnode)


def test_nodemask_words_kernel_reads_every_set_bit() -> None:
    # The kernel uses maxnode - 1 bits; the highest node must fall inside them.
    words, maxnode = nodemask_words([127])
    assert words == [0, 1 << 63]
    assert 127 < maxnode - 1


def test_nodemask_words_empty_and_negative() -> None:
    assert nodemask_words([]) == ([], 0)
    with pytest.raises(TopologyError, match="-1"):
        nodemask_words([0, -1])


# --- discover ---------------------------------------------------------------------------------------


def test_discover_single_node_with_cpus(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-1\n", 5466324)}, online="0\n")
    topo = discover(tmp_path)
    assert topo.nodes == (NumaNode(id=0, cpus=(0, 1), mem_total_bytes=5466324 * KIB),)
    assert topo.sysfs_root == str(tmp_path)
    assert topo.cpu_nodes == (0,)
    assert topo.cpuless_nodes == ()
    assert pick_cxl_nodes(topo, None) == ()
    assert topo.describe() == "1 NUMA node: node0 cpus=0-1 mem=5.2GiB"


def test_discover_two_nodes_with_cpus(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-3,8-11\n", 16 * GIB // KIB), 1: ("4-7,12-15\n", 16 * GIB // KIB)}, "0-1\n")
    topo = discover(tmp_path)
    assert [n.id for n in topo.nodes] == [0, 1]
    assert topo.node(0).cpus == (0, 1, 2, 3, 8, 9, 10, 11)
    assert topo.node(1).cpus == (4, 5, 6, 7, 12, 13, 14, 15)
    assert topo.node(1).mem_total_bytes == 16 * GIB
    assert topo.cpu_nodes == (0, 1)
    assert topo.cpuless_nodes == ()
    assert pick_cxl_nodes(topo, None) == ()


def test_discover_cpuless_cxl_node(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-1\n", 24536678), 2: ("\n", 64 * GIB // KIB)}, online="0,2\n")
    topo = discover(tmp_path)
    assert [n.id for n in topo.nodes] == [0, 2]
    assert topo.cpu_nodes == (0,)
    assert topo.cpuless_nodes == (2,)
    assert topo.node(2).has_cpus is False
    assert topo.node(2).mem_total_bytes == 64 * GIB
    assert pick_cxl_nodes(topo, None) == (2,)
    assert pick_cxl_nodes(topo, (2,)) == (2,)
    assert topo.describe() == (
        "2 NUMA nodes: node0 cpus=0-1 mem=23.4GiB, node2 cpus=- mem=64.0GiB (cpu-less)"
    )


def test_discover_without_online_file_lists_node_dirs(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {3: ("\n", 1024), 0: ("0\n", 2048)})
    (tmp_path / "devices" / "system" / "node" / "possible").write_text("0-3\n")
    topo = discover(tmp_path)
    assert [n.id for n in topo.nodes] == [0, 3]
    assert topo.cpuless_nodes == (3,)


def test_discover_only_reads_online_nodes(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-1\n", 2048), 1: ("2-3\n", 2048)}, online="0\n")
    assert [n.id for n in discover(tmp_path).nodes] == [0]


def test_missing_meminfo_gives_zero_memory(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0\n", 2048), 1: ("\n", None)}, online="0-1\n")
    topo = discover(tmp_path)
    assert topo.node(1).mem_total_bytes == 0
    # A CPU-less node without known memory is not auto-picked, but may still be configured.
    assert pick_cxl_nodes(topo, None) == ()
    assert pick_cxl_nodes(topo, (1,)) == (1,)
    assert "node1 cpus=- mem=unknown (cpu-less)" in topo.describe()


def test_pick_every_cpuless_node_with_memory(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0\n", 2048), 1: ("\n", None), 2: ("\n", 4096), 3: ("\n", 4096)}, "0-3")
    assert pick_cxl_nodes(discover(tmp_path), None) == (2, 3)


def _two_sockets_three_cxl(root: Path) -> Topology:
    """Nodes 0 and 1 with CPUs; 2, 3 and 4 CPU-less, of which 3 reports no memory."""
    make_sysfs(root, {0: ("0-3\n", 8 * GIB // KIB), 1: ("4-7\n", 8 * GIB // KIB), 2: ("\n", 64 * GIB // KIB),
                      3: ("\n", 0), 4: ("\n", 32 * GIB // KIB)}, online="0-4\n")
    return discover(root)


def test_pick_auto_takes_cpuless_nodes_with_memory_in_id_order(tmp_path: Path) -> None:
    topo = _two_sockets_three_cxl(tmp_path)
    assert topo.cpuless_nodes == (2, 3, 4)
    assert pick_cxl_nodes(topo, None) == (2, 4)


def test_pick_configured_nodes_keep_their_order(tmp_path: Path) -> None:
    topo = _two_sockets_three_cxl(tmp_path)
    assert pick_cxl_nodes(topo, (3, 2)) == (3, 2)
    assert pick_cxl_nodes(topo, (4, 2, 3)) == (4, 2, 3)


def test_pick_configured_list_with_cpu_node_names_it(tmp_path: Path) -> None:
    topo = _two_sockets_three_cxl(tmp_path)
    with pytest.raises(TopologyError) as excinfo:
        pick_cxl_nodes(topo, (2, 1))
    message = str(excinfo.value)
    assert message.startswith("tiers.cxl.node = [2, 1]: NUMA node 1 has CPUs (4-7)")
    assert "CPU-less nodes here: 2-4" in message


def test_pick_configured_duplicate_raises(tmp_path: Path) -> None:
    topo = _two_sockets_three_cxl(tmp_path)
    with pytest.raises(TopologyError, match=r"^tiers.cxl.node = \[2, 4, 2\]: CXL node 2 is listed twice"):
        pick_cxl_nodes(topo, (2, 4, 2))


def test_pick_configured_list_with_unknown_node_raises(tmp_path: Path) -> None:
    topo = _two_sockets_three_cxl(tmp_path)
    with pytest.raises(TopologyError, match=r"^tiers.cxl.node = \[2, 7\]: NUMA node 7 does not exist on this host "
                                            r"\(known nodes: 0-4\)$"):
        pick_cxl_nodes(topo, (2, 7))


def test_pick_configured_node_with_cpus_raises(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-1\n", 2048), 2: ("\n", 4096)}, online="0,2\n")
    topo = discover(tmp_path)
    with pytest.raises(TopologyError) as excinfo:
        pick_cxl_nodes(topo, (0,))
    message = str(excinfo.value)
    assert message.startswith("tiers.cxl.node = 0: NUMA node 0 has CPUs (0-1)")  # one id shown as written
    assert "(CPU-less nodes here: 2);" in message


def test_pick_configured_node_on_a_host_without_cpuless_nodes_says_so(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-1\n", 2048)}, online="0\n")
    with pytest.raises(ConfigError, match=r"^tiers.cxl.node = 0: .*\(CPU-less nodes here: none\); \"auto\""):
        pick_cxl_nodes(discover(tmp_path), (0,))


def test_pick_configured_node_missing_raises(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-1\n", 2048), 2: ("\n", 4096)}, online="0,2\n")
    topo = discover(tmp_path)
    with pytest.raises(TopologyError) as excinfo:
        pick_cxl_nodes(topo, (1,))
    assert str(excinfo.value).startswith("tiers.cxl.node = 1: NUMA node 1 does not exist")
    assert "known nodes: 0,2" in str(excinfo.value)


def test_node_lookup_unknown_id() -> None:
    topo = Topology(nodes=(NumaNode(0, (0,), 0),), sysfs_root="/nonexistent")
    with pytest.raises(TopologyError, match=r"NUMA node 7 .*known nodes: 0\)"):
        topo.node(7)


def test_no_numa_dir_falls_back_to_single_node(tmp_path: Path) -> None:
    cpu_dir = tmp_path / "devices" / "system" / "cpu"
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "online").write_text("0-5\n")
    topo = discover(tmp_path)
    assert len(topo.nodes) == 1
    node = topo.nodes[0]
    assert node.id == 0
    assert node.cpus == (0, 1, 2, 3, 4, 5)
    assert node.mem_total_bytes == psutil.virtual_memory().total
    assert pick_cxl_nodes(topo, None) == ()


def test_no_numa_dir_and_no_cpu_online_uses_cpu_count(tmp_path: Path) -> None:
    topo = discover(tmp_path)
    assert topo.nodes[0].cpus == tuple(range(os.cpu_count() or 1))


def test_garbage_online_names_path_and_content(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0\n", 2048)}, online="zero\n")
    with pytest.raises(TopologyError) as excinfo:
        discover(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "devices" / "system" / "node" / "online") in message
    assert "'zero\\n'" in message


def test_empty_online_raises(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0\n", 2048)}, online="\n")
    with pytest.raises(TopologyError, match="lists no online nodes"):
        discover(tmp_path)


def test_garbage_cpulist_names_path_and_content(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0-x\n", 2048)}, online="0\n")
    with pytest.raises(TopologyError) as excinfo:
        discover(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "devices" / "system" / "node" / "node0" / "cpulist") in message
    assert "'0-x\\n'" in message


def test_online_node_without_directory_raises(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0\n", 2048)}, online="0-1\n")
    with pytest.raises(TopologyError, match=r"node1[/\\]cpulist"):
        discover(tmp_path)


def test_malformed_meminfo_names_path_and_line(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {0: ("0\n", None)}, online="0\n")
    meminfo = tmp_path / "devices" / "system" / "node" / "node0" / "meminfo"
    meminfo.write_text("Node 0 MemTotal:  lots kB\n")
    with pytest.raises(TopologyError) as excinfo:
        discover(tmp_path)
    assert str(meminfo) in str(excinfo.value)
    assert "lots" in str(excinfo.value)


def test_real_sysfs_has_a_node_with_cpus() -> None:
    topo = discover()
    assert topo.sysfs_root == "/sys"
    assert len(topo.nodes) >= 1
    assert len(topo.cpu_nodes) >= 1
    all_cpus = {cpu for n in topo.nodes for cpu in n.cpus}
    assert len(all_cpus) >= 1
    assert [n.id for n in topo.nodes] == sorted(n.id for n in topo.nodes)
    assert any(n.mem_total_bytes > 0 for n in topo.nodes)
