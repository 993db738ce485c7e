"""Tiering policies: the interface, the registry, and the interval plan they share.

A policy turns a table's heat counters into a score per row (higher = wanted
in a faster tier), says which scores are worth a move at all and when a hot
row is worth more than a cold one (its hysteresis), and ages the counters
after each interval.  It holds no memory and moves nothing: `run_interval`
plans the moves from the scores and hands each batch to a mover callback,
which reports how many of the rows it actually moved (a tier may turn out
fuller than planned).  The daemon's callback is Store.move_rows; the sizing
simulator's updates an array.  Both therefore follow the same plan.

Pure numpy, no native code: the `embtier simulate` command imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

DRAM, CXL, SCM = 0, 1, 2
UNLIMITED = 1 << 62


class Policy(Protocol):
    name: str

    def scores(self, heat: np.ndarray) -> np.ndarray:
        """Per row, how much it wants a fast tier (an integer array, higher = hotter); called once per interval."""

    def min_score(self) -> int:
        """Rows scoring below this are never promoted."""

    def worth_swapping(self, hot: np.ndarray, cold: np.ndarray) -> np.ndarray:
        """Per pair, whether a row scoring hot should replace one scoring cold (hysteresis)."""

    def age(self, heat: np.ndarray) -> None:
        """Ages the counters in place at the end of an interval."""


Mover = Callable[[np.ndarray, int], int]  # (rows, to tier) -> how many of the first rows moved


@dataclass
class IntervalResult:
    moved: dict[tuple[int, int], int] = field(default_factory=dict)  # (from tier, to tier) -> rows
    backlog_rows: int = 0  # moves the plan wanted but the bandwidth budget left for later

    @property
    def rows_moved(self) -> int:
        return sum(self.moved.values())


def _smallest(rows: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """The (up to) k of rows with the smallest keys[row], in increasing key order (ties stay in row order)."""
    if k <= 0:
        return rows[:0].astype(np.int64)
    if rows.size > k:
        rows = rows[np.argpartition(keys[rows], k - 1)[:k]]
    return rows[np.argsort(keys[rows], kind="stable")].astype(np.int64)


def hottest_below(scores: np.ndarray, placement: np.ndarray, fast: int, k: int, min_score: int) -> np.ndarray:
    """Up to k rows homed in tiers slower than fast scoring >= min_score, hottest first."""
    below = np.flatnonzero((placement > fast) & (scores >= min_score))
    return _smallest(below, -scores.astype(np.int64), k)  # (negating unsigned counters themselves would wrap)


def coldest_in(scores: np.ndarray, placement: np.ndarray, tier: int, k: int) -> np.ndarray:
    """Up to k rows homed in tier, coldest first."""
    return _smallest(np.flatnonzero(placement == tier), scores, k)


def plan_swaps(policy: Policy, scores: np.ndarray, placement: np.ndarray, fast: int,
               limit: int = UNLIMITED) -> tuple[np.ndarray, np.ndarray]:
    """(rows to move up into tier fast, rows to move down out of it), as many of each, at most limit.

    The hottest rows homed below fast are paired, hottest first, with the
    coldest rows in fast; the leading run of pairs the policy finds worth a
    swap is kept."""
    inside = int(np.count_nonzero(placement == fast))
    hot = hottest_below(scores, placement, fast, min(limit, inside), policy.min_score())
    cold = coldest_in(scores, placement, fast, hot.size)
    if not hot.size:
        return hot, cold
    keep = policy.worth_swapping(scores[hot], scores[cold])
    n = int(np.argmin(keep)) if not keep.all() else hot.size  # pairs are sorted: keep the leading run
    return hot[:n], cold[:n]


class _Plan:
    """The bookkeeping of one interval: the placement as moves land, room per tier, budget left."""

    def __init__(self, placement: np.ndarray, room: list[int], budget_rows: int, move: Mover):
        self.placement = placement.copy()
        self.room = list(room)
        self.budget = budget_rows
        self.move = move
        self.result = IntervalResult()

    def apply(self, rows: np.ndarray, tier: int) -> int:
        rows = np.ascontiguousarray(rows[:max(0, min(self.budget, self.room[tier]))])
        if not rows.size:
            return 0
        n = self.move(rows, tier)
        origins = self.placement[rows[:n]]
        for origin in np.unique(origins):
            count = int(np.count_nonzero(origins == origin))
            key = (int(origin), tier)
            self.result.moved[key] = self.result.moved.get(key, 0) + count
            self.room[int(origin)] += count
        self.placement[rows[:n]] = tier
        self.room[tier] -= n
        self.budget -= n
        return n

    def defer(self, wanted: int, done: int) -> None:
        self.result.backlog_rows += max(0, wanted - done)


def _cascade(scores: np.ndarray, plan: _Plan, up: np.ndarray, down: np.ndarray) -> int:
    """DRAM's side of its swaps when there is a CXL tier: the cold rows leaving DRAM go down to CXL
    (into free room, or displacing CXL's coldest rows to SCM, when at least as hot as those; ties
    go to the row just out of DRAM, the more recently hot), the rest to SCM.  Three moves a swap
    at most, budgeted as three, plus one for refilling the hole a hot row taken from CXL leaves
    there (without that budget kept for the refill, DRAM's swaps under a tight budget would drain
    CXL interval after interval).  Returns how many left DRAM."""
    pairs = int(np.searchsorted(np.cumsum(3 + (plan.placement[up] == CXL)), plan.budget, side="right"))
    leaving = down[:pairs][::-1]  # the warmest of DRAM's cold rows first
    free = max(0, min(plan.room[CXL], pairs))
    staying = plan.placement.copy()
    staying[up[:pairs]] = SCM  # CXL rows on their way up to DRAM are not pushed down
    push = coldest_in(scores, staying, CXL, pairs - free)
    worth = scores[leaving[free:free + push.size]] >= scores[push]
    pushed = plan.apply(push[:int(np.argmin(worth)) if not worth.all() else push.size], SCM)
    to_cxl = plan.apply(leaving[:free + pushed], CXL)
    return to_cxl + plan.apply(leaving[to_cxl:], SCM)


def run_interval(policy: Policy, heat: np.ndarray, placement: np.ndarray, room: list[int], budget_rows: int,
                 move: Mover, pin: int | None = None) -> IntervalResult:
    """Plans and carries out one interval of moves for one table.

    placement: home tier per row (0 dram, 1 cxl, 2 scm); room: rows each tier
    can still take for this table (its own limit and the tier's space);
    budget_rows: most rows moved in all.  Without a pin, for DRAM then CXL:
    rows over the table's limit go down to SCM (coldest first); the hottest
    rows below take the free room; then hot rows below swap with cold rows
    inside, cold ones down first, which frees the slots the hot ones take:
    DRAM's cold rows cascade into CXL (see _cascade), CXL's go to SCM (a hot
    row taken from CXL is budgeted with the move that refills its slot).
    With a pin, every row moves to the pinned tier, hottest first.  Ages the
    heat at the end."""
    scores = policy.scores(heat)
    plan = _Plan(placement, room, budget_rows, move)
    if pin is not None:
        wanted = np.flatnonzero(plan.placement != pin)
        wanted = _smallest(wanted, -scores.astype(np.int64), wanted.size)  # hottest first
        plan.defer(wanted.size, plan.apply(wanted, pin))
    else:
        for fast in (DRAM, CXL):
            if plan.room[fast] < 0:  # over the table's limit
                excess = coldest_in(scores, plan.placement, fast, -plan.room[fast])
                plan.defer(excess.size, plan.apply(excess, SCM))
            if plan.room[fast] > 0:
                up = hottest_below(scores, plan.placement, fast, plan.room[fast], policy.min_score())
                plan.defer(up.size, plan.apply(up, fast))
            up, down = plan_swaps(policy, scores, plan.placement, fast)
            if fast == DRAM and (plan.room[CXL] > 0 or np.any(plan.placement == CXL)):
                demoted = _cascade(scores, plan, up, down)
            else:  # CXL's swaps, or DRAM's without a CXL tier: two moves a swap, the cold row to SCM
                demoted = plan.apply(down[:min(up.size, plan.budget // 2)], SCM)
            plan.defer(2 * up.size, demoted + plan.apply(up[:demoted], fast))
    policy.age(heat)
    return plan.result
