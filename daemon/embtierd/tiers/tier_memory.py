"""DRAM and CXL tiers: one anonymous arena each, its segments bound to NUMA nodes.

DRAM binds to the nodes that have CPUs.  CXL is one segment (port) per
CPU-less node it uses, the way Linux shows CXL Type-3 memory, each bound to
its node and sized in proportion to the node's memory; on a host without
one the CXL tier is an emulated tier in DRAM, cut into fabric.cxl_ports
equal segments, and says so (emulated=True).  The arena is mapped with
MAP_NORESERVE: memory is committed as rows are written.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from embtier.wire import PortInfo, TierInfo

from embtierd import native
from embtierd.native import TIER_CXL, TIER_DRAM
from embtierd.tiers.extents import Extent, ExtentAllocator
from embtierd.tiers.tier_base import ArenaTier

log = logging.getLogger(__name__)

ROW_ALIGN = 64
HUGE_PAGE = 2 << 20
PAGE = 4096


@dataclass(frozen=True)
class PortSpec:
    """One segment of a memory tier: the nodes it is bound to, its share of the capacity."""

    nodes: list[int]
    weight: int = 1
    numa_node: int = -1  # the node it stands for (a real CXL port), -1 when emulated or DRAM


def segment_sizes(capacity: int, weights: list[int]) -> list[int]:
    """Capacity cut in proportion to weights, each share a whole number of 2 MiB huge pages
    (4 KiB pages when a share is smaller), the last one taking what the rounding left."""
    total = sum(weights)
    shares = [capacity * w // total for w in weights]
    unit = HUGE_PAGE if min(shares) >= HUGE_PAGE else PAGE
    sizes = [s - s % unit for s in shares[:-1]]
    return [*sizes, capacity - sum(sizes)]


class MemoryTier(ArenaTier):
    def __init__(self, name: str, capacity_bytes: int, ports: list[PortSpec], huge_pages: bool, emulated: bool):
        self.name = name
        self.tier_id = TIER_DRAM if name == "dram" else TIER_CXL
        self.capacity_bytes = capacity_bytes
        self.port_specs = ports
        self.nodes = sorted({n for p in ports for n in p.nodes})
        self.emulated = emulated
        self.huge_pages = huge_pages
        self.bind_errors = [""] * len(ports)
        self.base = 0
        sizes = segment_sizes(capacity_bytes, [p.weight for p in ports])
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._allocs = [ExtentAllocator(size, ROW_ALIGN, start) for start, size in zip(starts, sizes)]
        if capacity_bytes:
            self.base, huge_err = native.mem_map(capacity_bytes, huge_pages)
            if huge_err:
                log.warning("tier %s: transparent huge pages refused (%s)", name,
                            errno.errorcode.get(huge_err, str(huge_err)))
            for i, (spec, start, size) in enumerate(zip(ports, starts, sizes)):
                err = native.mem_bind(self.base + start, size, spec.nodes) if size else 0
                if err:
                    self.bind_errors[i] = errno.errorcode.get(err, str(err))
                    log.warning("tier %s: mbind of %s to node(s) %s refused (%s); that memory is not bound",
                                name, self.port_name(i), ",".join(map(str, spec.nodes)), self.bind_errors[i])

    def port_name(self, port: int) -> str:
        return f"cxl{port}" if self.tier_id == TIER_CXL else self.name

    @property
    def bind_error(self) -> str:
        return ", ".join(sorted({e for e in self.bind_errors if e}))

    def address(self, extent: Extent) -> int:
        return self.base + extent.offset

    def info(self) -> TierInfo:
        return TierInfo(self.name, self.capacity_bytes, self.used_bytes,
                        -1 if self.emulated or len(self.nodes) != 1 else self.nodes[0], self.emulated, "",
                        tuple(self.port_infos()) if self.tier_id == TIER_CXL else ())

    def port_infos(self) -> list[PortInfo]:
        return [PortInfo(self.port_name(i), spec.numa_node, alloc.capacity, alloc.used)
                for i, (spec, alloc) in enumerate(zip(self.port_specs, self._allocs))]

    def describe(self) -> str:
        where = "emulated in DRAM" if self.emulated else f"NUMA node(s) {','.join(map(str, self.nodes))}"
        ports = ""
        if self.tier_id == TIER_CXL:
            ports = ", ports " + ", ".join(
                f"{p.name} {p.capacity_bytes / 2**30:.2f} GiB" + (f" on node {p.numa_node}" if p.numa_node >= 0 else "")
                for p in self.port_infos())
        return (f"{self.name}: {self.capacity_bytes / 2**30:.2f} GiB, {where}{ports}"
                f"{', huge pages' if self.huge_pages else ''}{', unbound: ' + self.bind_error if self.bind_error else ''}")

    def close(self) -> None:
        if self.base:
            native.mem_unmap(self.base, self.capacity_bytes)
            self.base = 0
