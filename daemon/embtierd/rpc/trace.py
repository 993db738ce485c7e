"""Id traces recorded on request: the ids of the next lookups of a table, for
`embtier simulate` to replay against candidate tier sizes.

A recording keeps the bags the ids came in too (a LookupPooled feature's
bags, a Lookup's ids as one bag): co-access within bags is what a learned
mapping is built from (embtier mapping build).

The lookup path pays one dict probe per request while nothing records, and
one array copy per request while a recording runs.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from embtierd.errors import FailedPreconditionError, InvalidArgumentError


class Recording:
    def __init__(self, max_ids: int, max_bytes: int | None = None):
        self.max_ids = max_ids
        self.max_bytes = max_bytes  # of ids (8 each) and bag lengths (4 each) together: what one reply carries
        self.nbags = 0
        self.parts: list[np.ndarray] = []
        self.bags: list[np.ndarray] = []   # int32 lengths, summing to the ids of parts
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.full = threading.Event()
        self.lock = threading.Lock()

    def add(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """ids in bags of lengths (None: one bag), checked by the caller to sum to the ids."""
        with self.lock:
            take = min(ids.size, self.max_ids - self.count)
            bags = 1 if lengths is None else lengths.size
            if self.max_bytes is not None and 8 * (self.count + take) + 4 * (self.nbags + bags) > self.max_bytes:
                # the reply would not hold it all: as many ids as surely fit (a bag each at worst), then full
                take = min(take, (self.max_bytes - 8 * self.count - 4 * self.nbags) // 12)
                self.max_ids = self.count + max(take, 0)
            if take <= 0:
                self.full.set()
                return
            now = time.monotonic()
            self.first = self.first if self.first is not None else now
            self.last = now
            self.parts.append(ids[:take].astype(np.int64, copy=True))
            if lengths is None:
                self.bags.append(np.array([take], dtype=np.int32))
            else:  # the bags up to the cut, the last one cut short
                ends = np.cumsum(lengths, dtype=np.int64)
                kept = int(np.searchsorted(ends, take)) + 1 if take < ids.size else lengths.size
                bags = lengths[:kept].astype(np.int32, copy=True)
                if kept:
                    bags[-1] -= int(ends[kept - 1]) - take
                self.bags.append(bags)
            self.nbags += self.bags[-1].size
            self.count += take
            if self.count >= self.max_ids:
                self.full.set()

    def ids(self) -> np.ndarray:
        with self.lock:
            return np.concatenate(self.parts) if self.parts else np.empty(0, dtype=np.int64)

    def lengths(self) -> np.ndarray:
        """The bags of ids(), int32 lengths summing to its size."""
        with self.lock:
            return np.concatenate(self.bags) if self.bags else np.empty(0, dtype=np.int32)

    @property
    def seconds(self) -> float:
        return (self.last - self.first) if self.first is not None and self.last is not None else 0.0


class TraceRecorder:
    """At most one recording per table at a time."""

    def __init__(self):
        self._recordings: dict[str, Recording] = {}
        self._lock = threading.Lock()

    def observe(self, table: str, ids: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """Called by the lookup path with each request's ids, and the bags they came in (None: one)."""
        recording = self._recordings.get(table)
        if recording is not None:
            recording.add(ids, lengths)

    def record(self, table: str, max_ids: int, timeout_seconds: float, limit: int) -> Recording:
        """Records until max_ids ids arrived or timeout_seconds passed; returns the recording.
        limit: the most ids one reply can carry (8 bytes each), beside their bags' lengths (4 bytes a
        bag): a recording that would pass 8 x limit bytes in all ends sooner, with fewer ids."""
        if not 1 <= max_ids <= limit:
            raise InvalidArgumentError(f"max_ids = {max_ids} is outside [1, {limit}] (the most one reply can "
                                       f"carry under server.max_message_bytes)")
        if not 0 < timeout_seconds <= 86400:
            raise InvalidArgumentError(f"timeout_seconds must be in (0, 86400], got {timeout_seconds}")
        recording = Recording(max_ids, 8 * limit)
        with self._lock:
            if table in self._recordings:
                raise FailedPreconditionError(f"a trace of table {table!r} is already being recorded")
            self._recordings[table] = recording
        try:
            recording.full.wait(timeout_seconds)
        finally:
            with self._lock:
                del self._recordings[table]
        return recording
