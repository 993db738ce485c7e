"""The tiering engine: tracker -> policy -> mover, once per interval.

- tracker: the heat counters the lookup kernels bump (1 in 2^heat_sample_shift
  accesses, saturating at 255), halved every interval so that heat follows
  recent popularity;
- policy (LFU with aging): for each pair of neighbouring tiers, the hottest
  rows below the faster tier against the coldest rows in it; a pair swaps
  only when the hotter row is clearly hotter (hysteresis), and no more rows
  move per interval than the migration bandwidth budget allows;
- mover: Store.move_rows, the only code that changes a row's home (cold row
  down first, which frees the slot the hot row then takes).

Policies never touch memory; the mover never decides.

SCM and promotions: every row has exactly one home.  A row promoted out of
SCM is read from the file (the lookup path's batched O_DIRECT reads), copied
into its memory slot and published there; its SCM slot is then free for
reuse, so no second copy exists that could go stale, and WriteRows always
writes the one home (memory, or the SCM file for rows that live there).  The
price is that a demoted row is written back to SCM even when unchanged
since its promotion; a clean-copy or dirty-bit scheme would save those
writes and is left for when SCM write bandwidth matters.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .store import Store
from .tiering_config import TieringConfig

log = logging.getLogger(__name__)

TIERS = ("dram", "cxl", "scm")


def hottest_below(heat: np.ndarray, placement: np.ndarray, fast: int, k: int, min_heat: int = 2) -> np.ndarray:
    """Up to k rows homed in tiers slower than fast with heat >= min_heat, hottest first."""
    below = np.flatnonzero((placement > fast) & (heat >= min_heat))
    if k <= 0:
        return below[:0].astype(np.int64)
    wanted = -heat.astype(np.int32)  # (negating the uint8 counters themselves would wrap)
    if below.size > k:
        below = below[np.argpartition(wanted[below], k - 1)[:k]]
    return below[np.argsort(wanted[below], kind="stable")].astype(np.int64)


def plan_swaps(heat: np.ndarray, placement: np.ndarray, fast: int, budget_rows: int,
               hysteresis: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows to move up into tier fast, rows to move down out of it), as many of each.

    The hottest rows homed below fast are paired, hottest first, with the
    coldest rows in fast; a pair is kept when the hot row's heat exceeds the
    cold row's by the hysteresis factor and by at least one count (so a hot
    row has heat >= 2)."""
    inside = np.flatnonzero(placement == fast)
    hot = hottest_below(heat, placement, fast, min(budget_rows, inside.size))
    k = hot.size
    if k == 0:
        return hot, hot
    cold = inside[np.argpartition(heat[inside], k - 1)[:k]]
    cold = cold[np.argsort(heat[cold], kind="stable")]
    keep = heat[hot].astype(np.float64) > heat[cold] * (1 + hysteresis) + 1
    n = int(np.argmin(keep)) if not keep.all() else k  # pairs are sorted: keep the leading run
    return hot[:n], cold[:n].astype(np.int64)


class TieringEngine:
    def __init__(self, store: Store, config: TieringConfig, metrics=None):
        self.store = store
        self.config = config
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[tuple[str, str], int]:
        """One interval over every table; returns rows moved per (from, to) tier."""
        moved: dict[tuple[str, str], int] = {}
        moved_bytes = 0
        start = time.perf_counter()
        for info in self.store.tables():
            stride = self.store.geometry(info.name)[2]
            budget = max(1, int(self.config.bandwidth_bytes_per_second * self.config.interval_seconds)
                         // (2 * stride))
            heat = self.store.heat(info.name)
            for fast in (0, 1):
                # hot rows first take whatever room the faster tier has, then displace cold rows
                placement = self.store.placement(info.name)
                up = hottest_below(heat, placement, fast, budget)
                n = self._promote(info.name, up, placement, fast, moved) if up.size else 0
                budget -= n
                moved_bytes += n * stride
                placement = self.store.placement(info.name)
                up, down = plan_swaps(heat, placement, fast, budget, self.config.hysteresis)
                if not up.size:
                    continue
                demoted = self.store.move_rows(info.name, down, "scm")
                self._count(moved, TIERS[fast], "scm", demoted)
                n = self._promote(info.name, up, placement, fast, moved)
                budget -= n
                moved_bytes += (demoted + n) * stride
            self.store.decay_heat(info.name)
        if self.metrics is not None:
            self.metrics.tiering_interval(time.perf_counter() - start, moved, moved_bytes)
        return moved

    def _promote(self, table: str, up: np.ndarray, placement: np.ndarray, fast: int, moved: dict) -> int:
        """Moves up (hottest first) into tier fast as far as it has room; counts the moves by origin."""
        n = self.store.move_rows(table, up, TIERS[fast])
        origins = placement[up[:n]]
        for origin in np.unique(origins):
            self._count(moved, TIERS[origin], TIERS[fast], int((origins == origin).sum()))
        return n

    @staticmethod
    def _count(moved: dict, src: str, dst: str, n: int) -> None:
        if n:
            moved[(src, dst)] = moved.get((src, dst), 0) + n

    def start(self) -> None:
        if not self.config.enabled:
            return

        def loop():
            while not self._stop.wait(self.config.interval_seconds):
                try:
                    self.run_once()
                except Exception:
                    log.exception("tiering interval failed")

        self._thread = threading.Thread(target=loop, name="tiering", daemon=True)
        self._thread.start()
        log.info("tiering: LFU with aging every %.1f s, %d bytes/s, hysteresis %.2f",
                 self.config.interval_seconds, self.config.bandwidth_bytes_per_second, self.config.hysteresis)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
