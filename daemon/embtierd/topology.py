"""NUMA topology discovery for embtierd.

This module owns reading the host's NUMA layout from sysfs (which nodes exist,
which CPUs and how much memory each holds), the Linux cpulist text format, the
nodemask encoding that mbind(2) expects, and the choice of which NUMA nodes back
the CXL tier (each one a port of the CXL fabric). CXL Type-3 memory expanders
show up in Linux as CPU-less NUMA nodes, so "CPU-less node with memory" is what
makes a node a CXL candidate.

It only reads files; it never changes memory policy itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from embtierd.errors import ConfigError

__all__ = [
    "NumaNode",
    "Topology",
    "TopologyError",
    "discover",
    "format_cpulist",
    "nodemask_words",
    "parse_cpulist",
    "pick_cxl_nodes",
]

_WORD_BITS = 64
_GIB = 1024**3
_RANGE_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_NODE_DIR_RE = re.compile(r"node([0-9]+)")


class TopologyError(ConfigError):
    """The NUMA topology is unreadable, inconsistent, or does not allow what the configuration asks
    (tiers.cxl.node): met while the daemon starts, it stops it with one line, like any ConfigError."""


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node as the kernel reports it."""

    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int

    @property
    def has_cpus(self) -> bool:
        return bool(self.cpus)


@dataclass(frozen=True)
class Topology:
    """The host's online NUMA nodes, sorted by id, and the sysfs root they were read from."""

    nodes: tuple[NumaNode, ...]
    sysfs_root: str

    @property
    def cpu_nodes(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes if n.has_cpus)

    @property
    def cpuless_nodes(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes if not n.has_cpus)

    def node(self, node_id: int) -> NumaNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        known = format_cpulist(n.id for n in self.nodes)
        raise TopologyError(f"NUMA node {node_id} does not exist on this host (known nodes: {known})")

    def describe(self) -> str:
        count = len(self.nodes)
        noun = "NUMA node" if count == 1 else "NUMA nodes"
        return f"{count} {noun}: " + ", ".join(_describe_node(n) for n in self.nodes)


def _describe_node(node: NumaNode) -> str:
    mem = f"{node.mem_total_bytes / _GIB:.1f}GiB" if node.mem_total_bytes else "unknown"
    suffix = "" if node.has_cpus else " (cpu-less)"
    return f"node{node.id} cpus={format_cpulist(node.cpus)} mem={mem}{suffix}"


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse the Linux list format ("0-3,8,10-11\\n") into sorted, unique ids.

    Empty or whitespace-only text is the empty list. Anything else that is not a
    comma-separated list of ids and ascending ranges raises TopologyError.
    """
    body = text.strip()
    if not body:
        return ()
    ids: set[int] = set()
    for part in body.split(","):
        match = _RANGE_RE.fullmatch(part.strip())
        if match is None:
            raise TopologyError(f"malformed list {text!r}: bad element {part!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise TopologyError(f"malformed list {text!r}: descending range {part!r}")
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format ids in the compact Linux list format ("0-3,8"); an empty set is "-"."""
    ordered = sorted(set(cpus))
    if not ordered:
        return "-"
    runs: list[list[int]] = []
    for cpu in ordered:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise TopologyError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse_list_file(path: Path, text: str) -> tuple[int, ...]:
    try:
        return parse_cpulist(text)
    except TopologyError as exc:
        raise TopologyError(f"{path}: {exc}") from exc


def _read_list(path: Path) -> tuple[int, ...]:
    return _parse_list_file(path, _read_text(path))


def _online_node_ids(node_dir: Path) -> tuple[int, ...]:
    online = node_dir / "online"
    if online.exists():
        text = _read_text(online)
        ids = _parse_list_file(online, text)
        if not ids:
            raise TopologyError(f"{online} lists no online nodes (content {text!r})")
        return ids
    ids = tuple(sorted(int(m.group(1)) for p in node_dir.iterdir() if (m := _NODE_DIR_RE.fullmatch(p.name))))
    if not ids:
        raise TopologyError(f"{node_dir} has no 'online' file and no nodeN directories")
    return ids


def _mem_total_bytes(path: Path, node_id: int) -> int:
    """Read "Node N MemTotal: X kB" from a node meminfo file; 0 if the file or line is absent."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[2] != "MemTotal:":
            continue
        well_formed = (
            len(fields) == 5
            and fields[:2] == ["Node", str(node_id)]
            and fields[3].isascii()
            and fields[3].isdigit()
            and fields[4] == "kB"
        )
        if not well_formed:
            raise TopologyError(f"{path}: malformed MemTotal line {line!r}")
        return int(fields[3]) * 1024
    return 0


def _read_node(node_dir: Path, node_id: int) -> NumaNode:
    base = node_dir / f"node{node_id}"
    # A missing cpulist is an error, not "no CPUs": guessing CPU-less would wrongly
    # make the node a CXL candidate.
    return NumaNode(
        id=node_id,
        cpus=_read_list(base / "cpulist"),
        mem_total_bytes=_mem_total_bytes(base / "meminfo", node_id),
    )


def _single_node(root: Path) -> NumaNode:
    """The whole machine as node 0, for kernels built without NUMA support."""
    cpu_online = root / "devices" / "system" / "cpu" / "online"
    if cpu_online.exists():
        cpus = _read_list(cpu_online)
    else:
        cpus = tuple(range(os.cpu_count() or 1))
    return NumaNode(id=0, cpus=cpus, mem_total_bytes=psutil.virtual_memory().total)


def discover(sysfs_root: str | os.PathLike[str] = "/sys") -> Topology:
    """Read the online NUMA nodes under ``<sysfs_root>/devices/system/node``.

    Without that directory (a kernel without NUMA) the host is reported as a
    single node 0 holding every online CPU and all of physical memory.
    """
    root = Path(sysfs_root)
    node_dir = root / "devices" / "system" / "node"
    if not node_dir.is_dir():
        nodes: tuple[NumaNode, ...] = (_single_node(root),)
    else:
        nodes = tuple(_read_node(node_dir, i) for i in _online_node_ids(node_dir))
    return Topology(nodes=nodes, sysfs_root=os.fspath(sysfs_root))


def nodemask_words(nodes: Iterable[int]) -> tuple[list[int], int]:
    """Encode node ids as the ``(nodemask, maxnode)`` arguments of mbind(2)/set_mempolicy(2).

    ``nodemask`` is a list of 64-bit ``unsigned long`` words (LP64 Linux), bit
    ``i % 64`` of word ``i // 64`` set for node ``i``, just long enough for the
    highest id.

    ``maxnode`` is ``64 * len(words) + 1``. The man page says the mask holds "up
    to maxnode bits", but the kernel (``get_nodes()`` in mm/mempolicy.c) starts
    with ``--maxnode`` and reads only ``maxnode - 1`` bits; libnuma passes
    ``size + 1`` for the same reason. Passing ``64 * len(words)`` would silently
    drop the top bit, i.e. node 63, 127, ...

    An empty set gives ``([], 0)``: maxnode 0 tells the kernel the set is empty
    and the mask pointer is ignored (what MPOL_DEFAULT/MPOL_LOCAL require).
    """
    ids = set(nodes)
    if not ids:
        return [], 0
    negative = sorted(i for i in ids if i < 0)
    if negative:
        raise TopologyError(f"NUMA node ids must be >= 0, got {negative}")
    words = [0] * (max(ids) // _WORD_BITS + 1)
    for i in ids:
        words[i // _WORD_BITS] |= 1 << (i % _WORD_BITS)
    return words, _WORD_BITS * len(words) + 1


def pick_cxl_nodes(topo: Topology, configured: tuple[int, ...] | None) -> tuple[int, ...]:
    """Choose the NUMA nodes that back the CXL tier, one fabric port each.

    Configured ids are kept in the order given; each must exist and be CPU-less
    (CXL Type-3 memory is a CPU-less node) and appear once, else TopologyError
    names the key (tiers.cxl.node), its value and the offending id. Without
    configuration, every CPU-less node that reports memory is used, in id order;
    an empty tuple when the host has none (the caller then emulates the CXL tier
    in DRAM).
    """
    if configured is None:
        return tuple(n.id for n in topo.nodes if not n.has_cpus and n.mem_total_bytes > 0)
    setting = f"tiers.cxl.node = {configured[0] if len(configured) == 1 else list(configured)}"
    seen: set[int] = set()
    for node_id in configured:
        if node_id in seen:
            raise TopologyError(f"{setting}: CXL node {node_id} is listed twice; "
                                "each CPU-less node is one port of the CXL fabric")
        seen.add(node_id)
        try:
            node = topo.node(node_id)
        except TopologyError as exc:
            raise TopologyError(f"{setting}: {exc}") from None
        if node.has_cpus:
            cpuless = format_cpulist(topo.cpuless_nodes) if topo.cpuless_nodes else "none"
            raise TopologyError(
                f"{setting}: NUMA node {node_id} has CPUs ({format_cpulist(node.cpus)}); CXL Type-3 memory "
                f"appears as a CPU-less node (CPU-less nodes here: {cpuless}); "
                '"auto" uses those, or emulates CXL in DRAM on a host without one'
            )
    return tuple(configured)
