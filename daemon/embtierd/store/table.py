"""One table of the store: its shape, its native handle (placement map, heat
counters, dirty bits, over chunks of 2^k rows in the tiers), its slots in
each tier, and what the mover keeps about its rows.

A Table object is also the handle the tiering engine holds for an interval:
once the table is dropped or replaced by a restore (retired), every change
through it fails with NotFoundError, so a table re-created under the same
name is never mixed with its predecessor.  Only the mover (mover.py) writes
a row's location and the bookkeeping that goes with it; everything here
reads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
from embtier.wire import MEMORY_TIERS, POLICIES, TIERS

from embtierd.errors import InvalidArgumentError, NotFoundError
from embtierd.keys.space import KeySpace
from embtierd.native import NativeTable
from embtierd.store.slots import SlotSpace
from embtierd.tiering.config import TableSettings

MAX_ROWS = 1 << 30          # slots per tier are 30 bits in the placement map
MAX_DIM = 16384
CHUNK_TARGET_BYTES = 2 << 20
NO_SCM_COPY = np.uint32(0xFFFFFFFF)  # scm_copy entry of a row without an SCM copy


@dataclass
class Table:
    name: str
    num_rows: int
    dim: int
    dtype: str
    stride: int
    chunk_shift: int
    native: NativeTable
    settings: TableSettings = field(default_factory=TableSettings)
    keys: KeySpace = field(default_factory=KeySpace)  # num_rows counts a managed table's default row
    version: int = 0
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    serial: int = 0      # unique per table created: a dropped and re-created name gets a new one
    generation: int = 0  # durable: the LSN of the record that made it (CREATE or RESTORE), 0 without a log
    retired: str = ""    # "dropped" or "restored" once it left the catalog (under its write lock)
    # the mover's book of the table's rows:
    slots: dict[int, SlotSpace] = field(default_factory=dict)  # tier id -> the table's slots there
    rows_by_tier: list[int] = field(default_factory=lambda: [0, 0, 0])
    scm_copy: np.ndarray | None = None   # per row: SCM slot of a clean or dirty copy (see Mover), made on demand
    scm_dirty: np.ndarray | None = None  # per row: written since its SCM copy was made
    rows_by_port: dict[str, int] = field(default_factory=dict)  # CXL rows per port, as of the last count
    port_load: np.ndarray | None = None  # heat on each CXL port: counted each interval, kept up by moves
    # a managed table's writes: when each row was last written (monotonic minutes mod 2^16), and how
    # many evictions took the row of an id written within the last hour
    written_minute: np.ndarray | None = None
    recent_evictions: int = 0
    # a receiving table's rows set by plain writes (not fills), a bit per row (row r: bit r & 7 of byte r >> 3):
    # in memory only (catalog.fill_rows)
    plain_written: np.ndarray | None = None

    def check_live(self) -> None:
        """NotFoundError once the table left the catalog (call under its write lock)."""
        if self.retired:
            raise NotFoundError(f"table {self.name!r} was {self.retired}")

    @property
    def user_rows(self) -> int:
        """The rows a user sees: a managed table's default row is not one of them."""
        return self.num_rows - 1 if self.keys.managed else self.num_rows

    def placement(self) -> np.ndarray:
        """Home tier of every row (0 dram, 1 cxl, 2 scm), uint8."""
        return (self.native.loc >> self.native.tier_shift).astype(np.uint8)

    def port_balance(self) -> float:
        """Busiest CXL port's heat / the mean port's, as of the last interval (1.0 without heat)."""
        load = self.port_load
        return float(load.max() / load.mean()) if load is not None and load.mean() > 0 else 1.0

    def limit_rows(self, tier_id: int) -> int | None:
        """The table's own row limit in a tier (None: none of its own, and always for SCM)."""
        tier = TIERS[tier_id]
        return self.settings.limit_rows(tier, self.stride) if tier in MEMORY_TIERS else None


def check_settings(settings: TableSettings) -> None:
    """InvalidArgumentError naming the field of a setting the store cannot honour."""
    if settings.policy not in POLICIES:
        raise InvalidArgumentError(f"policy must be one of {', '.join(POLICIES)}; got {settings.policy!r}")
    if settings.pin not in ("", *TIERS):
        raise InvalidArgumentError(f"pin_tier must be \"\" or one of {', '.join(TIERS)}; got {settings.pin!r}")
    for tier, limit in settings.capacity_bytes.items():
        if tier not in MEMORY_TIERS or (limit is not None and limit < 0):
            raise InvalidArgumentError(f"{tier}_capacity_bytes must be >= 0 (or unset: no limit), got {limit}")


def chunk_shift_for(stride: int, num_rows: int) -> int:
    """log2 of rows per chunk: about CHUNK_TARGET_BYTES a chunk, never more rows than the table has."""
    by_bytes = max(0, int(math.log2(max(1, CHUNK_TARGET_BYTES // stride))))
    by_rows = max(0, math.ceil(math.log2(num_rows))) if num_rows > 1 else 0
    return min(by_bytes, by_rows)
