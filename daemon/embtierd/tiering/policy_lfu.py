"""LFU with aging: a row's score is its sampled access count, halved every aging_intervals intervals."""

from __future__ import annotations

import numpy as np


class LfuPolicy:
    """Hot rows are those accessed most over the last few aging periods.

    Counts are halved every aging_intervals intervals: a longer period ranks
    the warm tail of a Zipf workload better (its rows are seen a few times
    per period at most), a shorter one follows a moving hot set faster.
    A row below replaces a row above only when its count exceeds the
    other's by the hysteresis factor, so rows of nearly equal heat do not
    ping-pong; a row counted at least once beats a row never counted."""

    name = "lfu"

    def __init__(self, hysteresis: float, aging_intervals: int = 1):
        self.hysteresis = hysteresis
        self.aging_intervals = aging_intervals
        self.intervals = 0

    def scores(self, heat: np.ndarray) -> np.ndarray:
        return heat

    def min_score(self) -> int:
        return 1

    def worth_swapping(self, hot: np.ndarray, cold: np.ndarray) -> np.ndarray:
        return hot.astype(np.float64) > cold.astype(np.float64) * (1 + self.hysteresis)

    def age(self, heat: np.ndarray) -> None:
        self.intervals += 1
        if self.intervals % self.aging_intervals == 0:
            np.right_shift(heat, 1, out=heat)
