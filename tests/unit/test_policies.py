"""The tiering policies (LRU, LFU with aging and hysteresis), their registry, and the interval plan they
share (policy_base.run_interval), driven with a mover that updates an array."""

from __future__ import annotations

import numpy as np
import pytest
from embtier_tools.loadgen import ZipfIds
from embtierd.tiering.policies import make_policy
from embtierd.tiering.policy_base import CXL, DRAM, SCM, UNLIMITED, coldest_in, hottest_below, run_interval
from embtierd.tiering.policy_lfu import LfuPolicy
from embtierd.tiering.policy_lru import LruPolicy


class ArrayMover:
    """The mover callback over an array placement; records every move and checks that no memory tier
    ever holds more rows than it held at the start plus its room.  fits: rows a tier accepts in all
    (a tier fuller than the plan was told)."""

    def __init__(self, placement: np.ndarray, room: list[int], fits: dict[int, int] | None = None):
        self.placement = placement
        self.capacity = [int(np.count_nonzero(placement == t)) + room[t] for t in (DRAM, CXL)]
        self.fits = dict(fits or {})
        self.calls: list[tuple[list[int], int]] = []
        self.moved: dict[tuple[int, int], int] = {}

    def __call__(self, rows: np.ndarray, tier: int) -> int:
        assert not np.any(self.placement[rows] == tier), "asked to move rows already in the tier"
        n = min(rows.size, self.fits.get(tier, rows.size))
        self.fits[tier] = self.fits.get(tier, UNLIMITED) - n
        for origin in self.placement[rows[:n]]:
            self.moved[(int(origin), tier)] = self.moved.get((int(origin), tier), 0) + 1
        self.placement[rows[:n]] = tier
        self.calls.append((rows[:n].tolist(), tier))
        if tier != SCM:
            assert np.count_nonzero(self.placement == tier) <= self.capacity[tier], "room exceeded"
        return n


def interval(policy, heat, placement, room, budget=UNLIMITED, pin=None, fits=None):
    """One run_interval over placement (updated in place by the mover); (result, mover)."""
    mover = ArrayMover(placement, room, fits)
    result = run_interval(policy, heat, placement, list(room), budget, mover, pin)
    assert result.moved == mover.moved  # the plan's account of the moves is what the mover did
    return result, mover


def u8(*values) -> np.ndarray:
    return np.array(values, dtype=np.uint8)


# ---- helpers ------------------------------------------------------------------


def test_hottest_below_and_coldest_in():
    scores = u8(0, 200, 3, 9, 40, 1, 2, 60)
    placement = u8(0, 2, 0, 0, 1, 0, 2, 2)
    assert hottest_below(scores, placement, DRAM, 10, 1).tolist() == [1, 7, 4, 6]  # 200 sorts first (no wrap)
    assert hottest_below(scores, placement, DRAM, 2, 1).tolist() == [1, 7]
    assert hottest_below(scores, placement, CXL, 10, 1).tolist() == [1, 7, 6]
    assert hottest_below(scores, placement, DRAM, 10, 50).tolist() == [1, 7]  # min_score
    assert hottest_below(scores, placement, DRAM, 0, 1).size == 0
    assert coldest_in(scores, placement, DRAM, 3).tolist() == [0, 5, 2]
    assert coldest_in(scores, placement, DRAM, 10).tolist() == [0, 5, 2, 3]
    assert coldest_in(scores, placement, CXL, 0).size == 0


def test_make_policy():
    assert isinstance(make_policy("lfu", 10, 0.5, 3), LfuPolicy)
    assert make_policy("lfu", 10, 0.5, 3).aging_intervals == 3
    lru = make_policy("lru", 10, 0.5, 3)
    assert isinstance(lru, LruPolicy) and lru.last_seen.size == 10
    with pytest.raises(ValueError, match="policy must be one of lfu, lru; got 'mru'"):
        make_policy("mru", 10, 0.5, 3)


# ---- LRU ------------------------------------------------------------------------


def lru_interval(lru, placement, accessed, room=(0, 0, UNLIMITED)):
    heat = np.zeros(placement.size, dtype=np.uint8)
    heat[accessed] = 1
    result, mover = interval(lru, heat, placement, list(room))
    assert not heat.any()  # counters are cleared after each interval
    return result, mover


def test_lru_promotes_on_access_and_evicts_the_least_recently_seen():
    lru = LruPolicy(8)
    placement = u8(0, 0, 0, 0, 2, 2, 2, 2)  # DRAM: rows 0-3
    for accessed in ([0], [1], [2, 3]):     # rows 0, 1, 2-3 last seen in intervals 1, 2, 3
        result, _ = lru_interval(lru, placement, accessed)
        assert result.rows_moved == 0       # all of them already in DRAM
    result, mover = lru_interval(lru, placement, [5, 2])
    assert mover.calls == [([0], SCM), ([5], DRAM)]  # row 0, seen longest ago, makes room for row 5
    result, mover = lru_interval(lru, placement, [7])
    assert mover.calls == [([1], SCM), ([7], DRAM)]  # then row 1
    assert placement.tolist() == [2, 2, 0, 0, 2, 0, 2, 0]
    assert result.moved == {(DRAM, SCM): 1, (SCM, DRAM): 1}


def test_lru_does_not_evict_rows_seen_in_the_same_interval():
    lru = LruPolicy(6)
    placement = u8(0, 0, 2, 2, 2, 2)
    result, _ = lru_interval(lru, placement, [0, 1, 2, 3])  # rows 2 and 3 are no more recent than 0 and 1
    assert result.rows_moved == 0 and placement.tolist() == [0, 0, 2, 2, 2, 2]


def test_lru_promotes_only_rows_seen_in_this_interval():
    lru = LruPolicy(6)
    placement = u8(0, 2, 2, 2, 2, 2)
    room = (1, 0, UNLIMITED)                        # DRAM has room for one more row
    result, _ = lru_interval(lru, placement, [], room)
    assert result.rows_moved == 0                   # never seen: not promoted, even into free room
    result, _ = lru_interval(lru, placement, [0, 3], (0, 0, UNLIMITED))
    assert result.rows_moved == 0                   # row 3 seen, but row 0 as recently
    result, mover = lru_interval(lru, placement, [4], room)
    assert mover.calls == [([4], DRAM)]             # row 3 was seen an interval ago: not promoted now
    assert placement.tolist() == [0, 2, 2, 2, 0, 2]


# ---- LFU ------------------------------------------------------------------------


def test_lfu_ages_every_aging_intervals():
    lfu = LfuPolicy(0.25, aging_intervals=3)
    heat = u8(8, 100, 255)
    seen = []
    for _ in range(6):
        lfu.age(heat)
        seen.append(heat.tolist())
    assert seen == [[8, 100, 255], [8, 100, 255], [4, 50, 127], [4, 50, 127], [4, 50, 127], [2, 25, 63]]


def test_lfu_aging_through_run_interval():
    lfu = LfuPolicy(0.25, aging_intervals=2)
    heat = u8(40, 40)
    placement = u8(0, 2)
    interval(lfu, heat, placement, [0, 0, UNLIMITED])
    assert heat.tolist() == [40, 40]
    interval(lfu, heat, placement, [0, 0, UNLIMITED])
    assert heat.tolist() == [20, 20]


def test_lfu_hysteresis():
    lfu = LfuPolicy(hysteresis=0.25)
    assert lfu.worth_swapping(u8(13, 12, 1, 0, 255), u8(10, 10, 0, 0, 255)).tolist() == [True, False, True, False,
                                                                                          False]


def test_lfu_rows_of_equal_heat_do_not_ping_pong():
    """DRAM and SCM hold rows of the same heat; interval after interval, nothing moves."""
    lfu = LfuPolicy(hysteresis=0.25, aging_intervals=2)
    placement = u8(0, 0, 0, 2, 2, 2)
    heat = np.zeros(6, dtype=np.uint8)
    for _ in range(8):
        heat += u8(10, 11, 12, 12, 11, 10)  # each row below is within 25 % of each row above
        result, _ = interval(lfu, heat, placement, [0, 0, UNLIMITED])
        assert result.rows_moved == 0 and result.backlog_rows == 0
    assert placement.tolist() == [0, 0, 0, 2, 2, 2]
    heat[:] = u8(10, 10, 10, 14, 0, 0)      # 14 > 1.25 x 10: worth a swap
    result, mover = interval(lfu, heat, placement, [0, 0, UNLIMITED])
    assert mover.calls == [([0], SCM), ([3], DRAM)]


# ---- the interval plan ----------------------------------------------------------


def test_moves_by_tier_hand_checked():
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(DRAM, DRAM, CXL, CXL, SCM, SCM)
    heat = u8(1, 9, 0, 8, 7, 30)
    result, mover = interval(lfu, heat, placement, [0, 0, UNLIMITED])
    # DRAM: 30 (row 5) beats 1 (row 0); 8 (row 3) is not worth 9 (row 1).  Row 0 cascades into CXL,
    # displacing CXL's coldest (row 2, heat 0 <= 1) to SCM.
    # CXL: 7 (row 4) beats 1 (row 0, just cascaded); 0 (row 2) is not worth 8 (row 3).
    assert mover.calls == [([2], SCM), ([0], CXL), ([5], DRAM), ([0], SCM), ([4], CXL)]
    assert result.moved == {(CXL, SCM): 2, (DRAM, CXL): 1, (SCM, DRAM): 1, (SCM, CXL): 1}
    assert result.rows_moved == 5 and result.backlog_rows == 0
    assert placement.tolist() == [SCM, DRAM, SCM, CXL, CXL, DRAM]


def test_budget_respected_and_the_rest_is_backlog():
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2)
    heat = u8(0, 0, 0, 0, 20, 19, 18, 17, 16, 15, 14, 13)
    result, mover = interval(lfu, heat, placement, [2, 0, UNLIMITED], budget=5)
    # the free room takes rows 4 and 5; of the four swaps worth making (18..15 against the four
    # untouched rows; 14 is not worth 19) the one budget left for makes one
    assert mover.calls == [([4, 5], DRAM), ([0], SCM), ([6], DRAM)]
    assert result.rows_moved == 4  # of 5: an odd row left cannot make a swap
    assert result.backlog_rows == 2 * 4 - 2
    result, _ = interval(lfu, heat, placement, [0, 0, UNLIMITED], budget=0)
    assert result.rows_moved == 0 and result.backlog_rows > 0


def test_tight_budget_keeps_cxl_filled():
    """A swap whose hot row leaves CXL is paid for with the move that refills CXL."""
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(DRAM, DRAM, CXL, CXL, SCM, SCM)
    heat = u8(0, 0, 50, 40, 30, 20)
    result, mover = interval(lfu, heat, placement, [0, 0, UNLIMITED], budget=4)
    assert mover.calls == [([0], SCM), ([2], DRAM), ([4], CXL)]
    assert np.bincount(placement, minlength=3).tolist() == [2, 2, 2]
    assert result.backlog_rows == 2


def test_tight_budget_lru_over_many_intervals_keeps_cxl_filled():
    rows = 2000
    lru = LruPolicy(rows)
    placement = np.repeat(u8(DRAM, CXL, SCM), [128, 128, rows - 256])
    zipf = ZipfIds(rows, 1.05, 1)
    rng = np.random.default_rng(0)
    for _ in range(30):
        heat = np.bincount(zipf.draw(rng, 2048), minlength=rows).clip(0, 255).astype(np.uint8)
        result, _ = interval(lru, heat, placement, [0, 0, UNLIMITED], budget=100)
        assert result.rows_moved <= 100
    assert np.bincount(placement, minlength=3).tolist() == [128, 128, rows - 256]


def test_table_over_its_limit_is_demoted_coldest_first():
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(0, 0, 0, 0, 0, 2)
    heat = u8(5, 1, 3, 9, 7, 0)
    result, mover = interval(lfu, heat, placement, [-2, 0, UNLIMITED])
    assert mover.calls == [([1, 2], SCM)]  # heat 1 and 3; row 5 (heat 0) is not worth promoting
    assert result.moved == {(DRAM, SCM): 2}
    placement = u8(0, 0, 0, 0, 0, 2)
    result, mover = interval(lfu, heat, placement, [-2, 0, UNLIMITED], budget=1)
    assert mover.calls == [([1], SCM)] and result.backlog_rows == 1


def test_over_the_cxl_limit_goes_to_scm():
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(0, 1, 1, 1)
    heat = u8(9, 4, 2, 6)
    _, mover = interval(lfu, heat, placement, [0, -1, UNLIMITED])
    assert mover.calls == [([2], SCM)] and placement.tolist() == [0, 1, 2, 1]


def test_pinned_table_moves_to_the_pin_tier_hottest_first_within_budget():
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(DRAM, DRAM, CXL, CXL, SCM)
    heat = u8(1, 9, 5, 7, 3)
    result, mover = interval(lfu, heat, placement, [0, 0, UNLIMITED], budget=3, pin=SCM)
    assert mover.calls == [([1, 3, 2], SCM)]
    assert result.moved == {(DRAM, SCM): 1, (CXL, SCM): 2} and result.backlog_rows == 1
    result, mover = interval(lfu, heat, placement, [3, 2, UNLIMITED], budget=3, pin=SCM)
    assert mover.calls == [([0], SCM)] and result.backlog_rows == 0
    assert placement.tolist() == [SCM] * 5
    result, mover = interval(lfu, heat, placement, [0, 2, UNLIMITED], pin=SCM)
    assert result.rows_moved == 0  # pinned and there: the policy does not run


def test_pin_to_dram_stays_within_room():
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(SCM, SCM, CXL, SCM, DRAM)
    heat = u8(1, 9, 5, 0, 3)
    result, mover = interval(lfu, heat, placement, [2, 0, UNLIMITED], pin=DRAM)
    assert mover.calls == [([1, 2], DRAM)] and result.backlog_rows == 2
    assert result.moved == {(SCM, DRAM): 1, (CXL, DRAM): 1}


def test_short_mover_keeps_the_plan_consistent():
    """The mover moves fewer rows than asked (a tier fuller than the plan knew): the plan counts the
    moves that happened, promotes no more rows than it demoted, and leaves the rest as backlog."""
    lfu = LfuPolicy(hysteresis=0.25)
    placement = u8(0, 0, 0, 0, 2, 2, 2, 2)
    heat = u8(0, 1, 2, 3, 40, 30, 20, 10)
    result, mover = interval(lfu, heat, placement, [0, 0, UNLIMITED], fits={SCM: 2})
    assert mover.calls == [([0, 1], SCM), ([4, 5], DRAM)]
    assert result.moved == {(DRAM, SCM): 2, (SCM, DRAM): 2} and result.backlog_rows == 2 * 4 - 4
    assert np.count_nonzero(placement == DRAM) == 4

    placement = u8(0, 2, 2, 2, 2)
    heat = u8(50, 1, 9, 3, 5)
    result, mover = interval(lfu, heat, placement, [3, 0, UNLIMITED], fits={DRAM: 1})
    # of the three rows the free room was to take only row 2 lands; rows 4 and 3 stay below, and
    # are not worth a swap with rows 2 (heat 9) and 0 (heat 50)
    assert mover.calls == [([2], DRAM)]
    assert result.moved == {(SCM, DRAM): 1} and result.backlog_rows == 2
    assert placement.tolist() == [0, 2, 0, 2, 2]


def test_room_is_never_exceeded_and_the_account_matches():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        placement = rng.integers(0, 3, size=n).astype(np.uint8)
        heat = rng.integers(0, 6, size=n).astype(np.uint8) * rng.integers(0, 2, size=n).astype(np.uint8)
        room = [int(rng.integers(-3, 6)), int(rng.integers(-3, 6)), UNLIMITED]
        budget = int(rng.integers(0, 12))
        policy = LfuPolicy(float(rng.choice([0.0, 0.25, 1.0]))) if rng.random() < 0.5 else LruPolicy(n)
        pin = [None, None, DRAM, CXL, SCM][int(rng.integers(5))]
        result, _ = interval(policy, heat, placement, room, budget, pin)  # the mover checks the room
        assert result.rows_moved <= budget
