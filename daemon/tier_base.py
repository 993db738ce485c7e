"""The tier interface.

A tier owns one arena (anonymous memory for DRAM and CXL, an O_DIRECT file
for SCM) and hands out extents of it; tables place their rows in extents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .extents import Extent, ExtentAllocator


@dataclass(frozen=True)
class TierInfo:
    name: str
    capacity_bytes: int
    used_bytes: int
    numa_node: int  # -1 when not bound to one node (emulated CXL, SCM)
    emulated: bool
    path: str       # SCM file, "" for memory tiers


class Tier(Protocol):
    name: str
    tier_id: int
    capacity_bytes: int

    def allocate(self, nbytes: int) -> Extent | None: ...
    def release(self, extent: Extent) -> None: ...
    def largest_free(self) -> int: ...
    def info(self) -> TierInfo: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class ArenaTier:
    """What every tier shares: the extents of its arena, handed out first-fit."""

    _alloc: ExtentAllocator

    def allocate(self, nbytes: int) -> Extent | None:
        return self._alloc.allocate(nbytes)

    def release(self, extent: Extent) -> None:
        self._alloc.release(extent)

    def largest_free(self) -> int:
        return self._alloc.largest_free()

    @property
    def used_bytes(self) -> int:
        return self._alloc.used
