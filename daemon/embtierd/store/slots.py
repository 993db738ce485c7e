"""The slots one table has in one tier.

Slots are numbered per tier and grouped in chunks of 2^chunk_shift; chunk c
holds slots [c << shift, (c + 1) << shift) and is backed by one extent of the
tier's arena, allocated when the first of its slots is handed out (the last
chunk of a tier may hold fewer rows, when the tier ran out of room).  Slots
given back by the mover are handed out again first.  Each chunk lies on one
port of the tier (a segment of its arena: see tier_base); take() can be
asked for slots on a given port.  Not thread-safe: the store calls it under
its lock.
"""

from __future__ import annotations

import math

import numpy as np

from embtierd import native
from embtierd.tiers.extents import Extent


class SlotSpace:
    def __init__(self, tier, table: native.NativeTable, stride: int, chunk_shift: int, first_part: int = 0):
        self.tier = tier
        self.first_part = first_part  # the fabric part of the tier's port 0 (the table's chunks are told theirs)
        self.table = table
        self.stride = stride
        self.shift = chunk_shift
        self.extents: list[Extent] = []
        self.held: list[int] = []     # rows chunk c can hold
        self.next = 0                 # first slot never handed out
        self.free = np.empty(0, dtype=np.uint32)
        self.limit_rows: int | None = None  # the table's own limit in this tier: no chunk grows past it
        self.chunk_port = np.zeros(table.max_chunks, dtype=np.uint8)  # the tier port each chunk lies on

    @property
    def chunk_rows(self) -> int:
        return 1 << self.shift

    def _bytes(self, rows: int) -> int:
        if self.tier.tier_id == native.TIER_SCM:
            return native.scm_chunk_bytes(self.stride, rows)
        return rows * self.stride

    def _rows_fitting(self, nbytes: int) -> int:
        if self.tier.tier_id != native.TIER_SCM:
            return nbytes // self.stride
        per_block = 4096 // self.stride
        return (nbytes // 4096) * per_block if per_block else nbytes // native.scm_chunk_bytes(self.stride, 1)

    def _grow(self, port: int | None = None) -> bool:
        """Backs the next chunk with an extent (a whole chunk, or what still fits) on the port (any
        when None); False when there is no room."""
        chunk = len(self.extents)
        if chunk >= self.table.max_chunks:
            return False
        rows = self.chunk_rows
        if self.limit_rows is not None:
            rows = min(rows, self.limit_rows - self.capacity)
            if rows <= 0:
                return False
        extent = self.tier.allocate(self._bytes(rows), port)
        if extent is None:
            rows = min(rows, self._rows_fitting(self.tier.largest_free(port)))
            extent = self.tier.allocate(self._bytes(rows), port) if rows else None
        if extent is None:
            return False
        self.chunk_port[chunk] = self.tier.port_of(extent.offset)
        self.table.set_chunk_part(self.tier.tier_id, chunk, self.first_part + int(self.chunk_port[chunk]))
        self._back(chunk, extent)
        self.extents.append(extent)
        self.held.append(rows)
        return True

    def _back(self, chunk: int, extent: Extent) -> None:
        """Tells the kernels what storage chunk has (its rows beyond the extent have none)."""
        if self.tier.tier_id == native.TIER_SCM:
            self.table.set_scm(self.tier.fd, self.tier.read_align_bytes)
            self.table.set_scm_chunk(chunk, extent.offset, extent.length)
        else:
            address = self.tier.address(extent) if extent.length else 0  # (a chunk cut down to nothing)
            self.table.set_chunk(self.tier.tier_id, chunk, address, extent.length)

    def take(self, count: int, port: int | None = None) -> np.ndarray:
        """Up to count free slots (uint32) on the port (any when None), fewer when it runs out of room."""
        if port is None:
            mine = np.arange(min(count, self.free.size))
        else:
            mine = np.flatnonzero(self.chunk_port[self.free >> self.shift] == port)[:count]
        parts = [self.free[mine]]
        self.free = np.delete(self.free, mine)
        need = count - parts[0].size
        while need > 0:
            chunk, offset = self.next >> self.shift, self.next & (self.chunk_rows - 1)
            if chunk < len(self.extents) and offset >= self.held[chunk]:
                self.next = (chunk + 1) << self.shift  # past the end of a partial chunk
                continue
            if chunk < len(self.extents) and port is not None and self.chunk_port[chunk] != port:
                # the chunk being handed out lies on another port: its untouched slots wait in the free list
                end = (chunk << self.shift) + self.held[chunk]
                self.free = np.concatenate([self.free, np.arange(self.next, end, dtype=np.uint32)])
                self.next = (chunk + 1) << self.shift
                continue
            if chunk >= len(self.extents) and not self._grow(port):
                break
            n = min(need, self.held[chunk] - offset)
            parts.append(np.arange(self.next, self.next + n, dtype=np.uint32))
            self.next += n
            need -= n
        return np.concatenate(parts)

    def room(self) -> int:
        """Slots take() could hand out now: the free ones, the rest of the current chunk, new chunks that fit."""
        chunk, offset = self.next >> self.shift, self.next & (self.chunk_rows - 1)
        in_chunk = self.held[chunk] - offset if chunk < len(self.extents) else 0
        new_chunks = self.table.max_chunks - len(self.extents)
        fitting = self._rows_fitting(self.tier.largest_free())  # (a lower bound: other free extents may fit more)
        return int(self.free.size + max(0, in_chunk) + min(fitting, max(0, new_chunks) << self.shift))

    @property
    def capacity(self) -> int:
        """Rows the chunks allocated so far hold."""
        return sum(self.held)

    def kept(self, slots: np.ndarray, rows: int) -> np.ndarray:
        """Mask of slots that stay when the space is cut down to hold rows (see cut)."""
        chunk, keep = self._cut_point(rows)
        return (slots >> self.shift < chunk) | ((slots >> self.shift == chunk) & ((slots & (self.chunk_rows - 1)) < keep))

    def _cut_point(self, rows: int) -> tuple[int, int]:
        """(chunk, rows it keeps): the first chunks hold rows, the last kept one rounded up to whole
        64-byte lines of the arena (the allocator's alignment)."""
        unit = 64 // math.gcd(self.stride, 64)
        left = rows
        for chunk, held in enumerate(self.held):
            if left <= held:
                return chunk, min(held, -(-left // unit) * unit)
            left -= held
        return len(self.held) - 1, self.held[-1] if self.held else 0

    def spare(self, rows: int) -> np.ndarray:
        """Free slots that stay when the space is cut down to hold rows: given back ones, then
        never handed out ones."""
        chunk, keep = self._cut_point(rows)
        end = (chunk << self.shift) + keep
        fresh = np.arange(self.next, end, dtype=np.uint32) if self.next < end else np.empty(0, dtype=np.uint32)
        return np.concatenate([self.free[self.kept(self.free, rows)], fresh])

    def cut(self, rows: int, taken: np.ndarray) -> int:
        """Gives the tier back every slot beyond the first rows ones (whole chunks, and the tail of the
        last kept chunk); no row may live there any more.  taken: spare slots the caller filled
        meanwhile.  Returns the bytes released."""
        chunk, keep = self._cut_point(rows)
        released = 0
        while len(self.extents) > chunk + 1:
            last = len(self.extents) - 1
            extent = self.extents.pop()
            self.tier.release(extent)
            released += extent.length
            self.held.pop()
            self.table.set_chunk(self.tier.tier_id, last, 0, 0)
        if self.extents and keep < self.held[chunk]:
            extent = self.extents[chunk]
            kept_bytes = self._bytes(keep)
            self.tier.release(Extent(extent.offset + kept_bytes, extent.length - kept_bytes))
            released += extent.length - kept_bytes
            self.extents[chunk] = Extent(extent.offset, kept_bytes)
            self.held[chunk] = keep
            self._back(chunk, self.extents[chunk])
        self.free = np.setdiff1d(self.free[self.kept(self.free, rows)], taken).astype(np.uint32)
        self.next = min(self.next, (chunk << self.shift) + keep)
        if self.next < (chunk << self.shift) + keep and taken.size:  # fresh slots handed out by the caller
            self.next = max(self.next, int(taken.max()) + 1)
        return released

    def give_back(self, slots: np.ndarray) -> None:
        self.free = np.concatenate([self.free, slots.astype(np.uint32)])

    def release(self) -> None:
        for extent in self.extents:
            self.tier.release(extent)
        self.extents, self.held, self.next = [], [], 0
        self.free = np.empty(0, dtype=np.uint32)

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self.extents)
