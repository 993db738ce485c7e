"""DRAM and CXL tiers: one anonymous arena each, bound to NUMA nodes.

DRAM binds to the nodes that have CPUs.  CXL binds to a CPU-less node, the
way Linux shows CXL Type-3 memory; on a host without one the CXL tier is an
emulated tier in DRAM and says so (emulated=True).  The arena is mapped
with MAP_NORESERVE: memory is committed as rows are written.
"""

from __future__ import annotations

import errno
import logging

from . import native
from .extents import Extent, ExtentAllocator
from .native import TIER_CXL, TIER_DRAM
from .tier_base import ArenaTier, TierInfo

log = logging.getLogger(__name__)

ROW_ALIGN = 64


class MemoryTier(ArenaTier):
    def __init__(self, name: str, capacity_bytes: int, nodes: list[int], huge_pages: bool, emulated: bool):
        self.name = name
        self.tier_id = TIER_DRAM if name == "dram" else TIER_CXL
        self.capacity_bytes = capacity_bytes
        self.nodes = nodes
        self.emulated = emulated
        self.huge_pages = huge_pages
        self.bind_error = ""
        self.base = 0
        self._alloc = ExtentAllocator(capacity_bytes, ROW_ALIGN)
        if capacity_bytes:
            self.base, bind_err, huge_err = native.mem_map(capacity_bytes, nodes, huge_pages)
            if bind_err:
                self.bind_error = errno.errorcode.get(bind_err, str(bind_err))
                log.warning("tier %s: mbind to nodes %s refused (%s); memory is not bound",
                            name, nodes, self.bind_error)
            if huge_err:
                log.warning("tier %s: transparent huge pages refused (%s)", name,
                            errno.errorcode.get(huge_err, str(huge_err)))

    def address(self, extent: Extent) -> int:
        return self.base + extent.offset

    def info(self) -> TierInfo:
        return TierInfo(self.name, self.capacity_bytes, self.used_bytes,
                        -1 if self.emulated or len(self.nodes) != 1 else self.nodes[0], self.emulated, "")

    def describe(self) -> str:
        where = "emulated in DRAM" if self.emulated else f"NUMA node(s) {','.join(map(str, self.nodes))}"
        return (f"{self.name}: {self.capacity_bytes / 2**30:.2f} GiB, {where}"
                f"{', huge pages' if self.huge_pages else ''}{', unbound: ' + self.bind_error if self.bind_error else ''}")

    def close(self) -> None:
        if self.base:
            native.mem_unmap(self.base, self.capacity_bytes)
            self.base = 0
