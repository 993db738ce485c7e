"""Memory shares of table groups (a tenant's tables): each interval, a group's share of DRAM and of
CXL becomes a row limit for each of its tables, so that together they hold at most the share and it
goes to the group's hottest rows, whichever table they are in.

The rows of the group's tables are ranked by heat together (a histogram of each table's counters:
no sort); DRAM's share takes the hottest rows' bytes, a heat level that does not fit whole split over
the tables in proportion to their rows at that level; DRAM's and CXL's shares together take the next,
and a table's CXL limit is what it got of both less its DRAM limit.  The engine then treats a
table's limit as it treats its own (the smaller of the two holds): a table over it demotes its coldest
rows, one under it may promote.  So another tenant's hot set, however it shifts, never takes a row of
the group's share, and a group's own hot set moving between its tables moves its share with it.
"""

from __future__ import annotations

import numpy as np
from embtier.wire import MEMORY_TIERS

from embtierd.store.table import Table
from embtierd.tiering.config import TableGroup

LEVELS = 256  # the heat counters' values


def group_limits(groups: tuple[TableGroup, ...], tables: list[Table]) -> dict[str, list[int | None]]:
    """Table name -> its row limit in DRAM and in CXL this interval from its group's shares (None: no
    share there), for every table of a group that exists."""
    by_name = {t.name: t for t in tables}
    limits: dict[str, list[int | None]] = {}
    for group in groups:
        members = [by_name[name] for name in group.tables if name in by_name]
        if not members:
            continue
        counts = np.stack([np.bincount(t.native.heat, minlength=LEVELS)[::-1] for t in members])  # hottest first
        strides = np.array([t.stride for t in members], dtype=np.float64)
        dram, cxl = (group.capacity_bytes.get(tier) for tier in MEMORY_TIERS)
        fast = _hottest(counts, strides, dram) if dram is not None else None
        both = _hottest(counts, strides, dram + cxl) if dram is not None and cxl is not None else \
            _hottest(counts, strides, cxl) if cxl is not None else None
        for i, t in enumerate(members):
            dram_rows = None if fast is None else int(fast[i])
            if both is None:
                cxl_rows = None
            else:
                cxl_rows = int(both[i]) - (dram_rows or 0) if dram is not None else int(both[i])
            limits[t.name] = [dram_rows, None if cxl_rows is None else max(0, cxl_rows)]
    return limits


def _hottest(counts: np.ndarray, strides: np.ndarray, capacity: int) -> np.ndarray:
    """Rows per table (counts: [tables, levels], hottest level first) of the hottest rows whose bytes
    fit in capacity together."""
    level_bytes = (counts * strides[:, None]).sum(axis=0)
    before = np.concatenate([[0.0], np.cumsum(level_bytes)[:-1]])  # bytes of the hotter levels
    whole = before + level_bytes <= capacity
    rows = (counts * whole).sum(axis=1).astype(np.float64)
    partial = np.flatnonzero(~whole)
    if partial.size:  # the first level that does not fit whole: shared in proportion to its rows
        level = partial[0]
        left = max(0.0, capacity - before[level])
        if level_bytes[level] > 0:
            rows += np.floor(counts[:, level] * left / level_bytes[level])
    return rows.astype(np.int64)
