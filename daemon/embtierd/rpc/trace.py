"""Id traces recorded on request: the ids of the next lookups of a table, for
`embtier simulate` to replay against candidate tier sizes.

The lookup path pays one dict probe per request while nothing records, and
one array copy per request while a recording runs.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from embtierd.errors import FailedPreconditionError, InvalidArgumentError


class Recording:
    def __init__(self, max_ids: int):
        self.max_ids = max_ids
        self.parts: list[np.ndarray] = []
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.full = threading.Event()
        self.lock = threading.Lock()

    def add(self, ids: np.ndarray) -> None:
        with self.lock:
            take = min(ids.size, self.max_ids - self.count)
            if take <= 0:
                return
            now = time.monotonic()
            self.first = self.first if self.first is not None else now
            self.last = now
            self.parts.append(ids[:take].astype(np.int64, copy=True))
            self.count += take
            if self.count >= self.max_ids:
                self.full.set()

    def ids(self) -> np.ndarray:
        with self.lock:
            return np.concatenate(self.parts) if self.parts else np.empty(0, dtype=np.int64)

    @property
    def seconds(self) -> float:
        return (self.last - self.first) if self.first is not None and self.last is not None else 0.0


class TraceRecorder:
    """At most one recording per table at a time."""

    def __init__(self):
        self._recordings: dict[str, Recording] = {}
        self._lock = threading.Lock()

    def observe(self, table: str, ids: np.ndarray) -> None:
        """Called by the lookup path with each request's ids."""
        recording = self._recordings.get(table)
        if recording is not None:
            recording.add(ids)

    def record(self, table: str, max_ids: int, timeout_seconds: float, limit: int) -> Recording:
        """Records until max_ids ids arrived or timeout_seconds passed; returns the recording.
        limit: the most ids one reply can carry."""
        if not 1 <= max_ids <= limit:
            raise InvalidArgumentError(f"max_ids = {max_ids} is outside [1, {limit}] (the most one reply can "
                                       f"carry under server.max_message_bytes)")
        if not 0 < timeout_seconds <= 86400:
            raise InvalidArgumentError(f"timeout_seconds must be in (0, 86400], got {timeout_seconds}")
        recording = Recording(max_ids)
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
