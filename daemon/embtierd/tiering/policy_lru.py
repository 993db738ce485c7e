"""The baseline: promote on access, evict the least recently used."""

from __future__ import annotations

import numpy as np


class LruPolicy:
    """A row counted in the last interval is promoted; the rows it displaces
    are those whose last counted access is oldest.

    Recency is kept per row as the number of the last interval in which the
    row was counted (4 bytes per row, this policy's own state); counters are
    cleared after each interval.  Its only hysteresis is that a row must
    have been seen more recently than the one it displaces.  This is the
    policy of a plain cache: cheap and quick to react, but one scan of cold
    rows flushes the hot ones out, which the LFU policy resists."""

    name = "lru"

    def __init__(self, num_rows: int):
        self.last_seen = np.zeros(num_rows, dtype=np.uint32)  # 0 = never; intervals count from 1
        self.interval = 1

    def scores(self, heat: np.ndarray) -> np.ndarray:
        self.last_seen[heat > 0] = self.interval
        return self.last_seen

    def min_score(self) -> int:
        return self.interval  # seen in this interval

    def worth_swapping(self, hot: np.ndarray, cold: np.ndarray) -> np.ndarray:
        return hot > cold

    def age(self, heat: np.ndarray) -> None:
        heat[:] = 0
        self.interval += 1
