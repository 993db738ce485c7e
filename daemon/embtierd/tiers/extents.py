"""First-fit allocator of byte extents inside one tier's arena.

Tiers hand out extents (a table's chunks of rows) rather than pages, so the
allocator only keeps sorted free ranges and coalesces neighbours on release.
Allocations are rare (table creation, chunk growth), so a list is enough.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int


class ExtentAllocator:
    def __init__(self, capacity: int, align: int, base: int = 0):
        """Extents of [base, base + capacity) (capacity rounded down to the alignment)."""
        capacity -= capacity % align  # every free range stays a multiple of align
        self.capacity = capacity
        self.align = align
        self.base = base
        self._free: list[tuple[int, int]] = [(base, capacity)] if capacity else []  # (offset, length)
        self.used = 0

    def _round(self, nbytes: int) -> int:
        return -(-nbytes // self.align) * self.align

    def allocate(self, nbytes: int) -> Extent | None:
        """An extent of at least nbytes (rounded up to the alignment), or None if none fits."""
        need = self._round(nbytes)
        for i, (off, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, length - need)
                self.used += need
                return Extent(off, need)
        return None

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def release(self, extent: Extent) -> None:
        i = bisect.bisect_left(self._free, (extent.offset, 0))
        off, length = extent.offset, extent.length
        if i < len(self._free) and self._free[i][0] == off + length:
            length += self._free[i][1]
            del self._free[i]
        if i > 0 and sum(self._free[i - 1]) == off:
            off, length = self._free[i - 1][0], self._free[i - 1][1] + length
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (off, length))
        self.used -= extent.length
