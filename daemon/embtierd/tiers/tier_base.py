"""The tier interface.

A tier owns one arena (anonymous memory for DRAM and CXL, an O_DIRECT file
for SCM) and hands out extents of it; tables place their rows in extents.
The arena is cut into one or more segments, the tier's ports: the CXL tier
has one per CPU-less NUMA node it uses (each segment bound to its node), or
fabric.cxl_ports of them when emulated; DRAM and SCM have one.  An extent
never crosses a segment, so every row lives on exactly one port.
"""

from __future__ import annotations

import bisect
from typing import Protocol

from embtier.wire import TierInfo

from embtierd.tiers.extents import Extent, ExtentAllocator


class Tier(Protocol):
    name: str
    tier_id: int
    capacity_bytes: int

    def allocate(self, nbytes: int, port: int | None = None) -> Extent | None: ...
    def release(self, extent: Extent) -> None: ...
    def largest_free(self, port: int | None = None) -> int: ...
    def port_of(self, offset: int) -> int: ...
    def info(self) -> TierInfo: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class ArenaTier:
    """What every tier shares: the extents of its arena's segments (ports), each handed out first-fit."""

    _allocs: list[ExtentAllocator]  # one per port, in address order

    @property
    def ports(self) -> int:
        return len(self._allocs)

    def allocate(self, nbytes: int, port: int | None = None) -> Extent | None:
        """An extent on the given port, else on the port with the most free bytes that has one."""
        if port is not None:
            return self._allocs[port].allocate(nbytes)
        for alloc in sorted(self._allocs, key=lambda a: -a.free):
            extent = alloc.allocate(nbytes)
            if extent is not None:
                return extent
        return None

    def release(self, extent: Extent) -> None:
        self._allocs[self.port_of(extent.offset)].release(extent)

    def largest_free(self, port: int | None = None) -> int:
        allocs = self._allocs if port is None else [self._allocs[port]]
        return max((a.largest_free() for a in allocs), default=0)

    def port_of(self, offset: int) -> int:
        """The port whose segment holds an arena offset."""
        return max(0, bisect.bisect_right([a.base for a in self._allocs], offset) - 1)

    @property
    def used_bytes(self) -> int:
        return sum(a.used for a in self._allocs)
