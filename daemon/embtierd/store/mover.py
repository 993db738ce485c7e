"""The mover: the only code that changes where a row lives.

Creation and restore (place), migration between tiers (move), trims of a
table's memory beyond its own limit (trim) and trades of rows between CXL
ports (spread_ports) all ask the mover, and it keeps, in the same step,
everything that goes with a row's location: the placement entry (published
through the kernels, which hold lookups off the entry while it changes), the
table's rows per tier, the SCM copies of promoted rows and whether they are
dirty, the heat on each CXL port, and the slots each tier hands out and gets
back.  A test (tests/unit/test_mover.py) checks that nothing else writes a
placement entry.

Rows move under the table's write lock (writes wait; lookups go on and see
each row whole, in its old home or its new one: the new copy is written
first, then published, and only then is the old slot given back); slots
are handed out and given back under the store's catalog lock, which guards
the tiers' extent allocators.

SCM copies: a row promoted out of SCM keeps its SCM slot as a copy
(scm_copy), clean until a write changes the row (written() marks it
dirty).  Demoting it again costs no write when the copy is clean (the
placement entry is pointed back at it) and one write into its own slot when
dirty; only rows that never lived on SCM take a new slot.  The copy is
dropped when the row is back home on SCM; moves between DRAM and CXL carry
it along.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np
from embtier.wire import TIERS

from embtierd import fabric, native
from embtierd.errors import TierFullError
from embtierd.store.slots import SlotSpace
from embtierd.store.table import NO_SCM_COPY, Table

PLACE_BATCH_ROWS = 1 << 20  # placement entries published per call when a table gets its homes


class ReadPacer(Protocol):
    """How a move reads its rows off SCM (the tiering engine's Pacer)."""

    @property
    def read_depth(self) -> int | None:
        """Rows on SCM the next read may ask for at once (its reads in flight); None: all that are left."""

    def read(self, scm_rows: int) -> None:
        """Called after each read with the rows it took off SCM (it may wait before the next)."""


class Mover:
    """Moves the rows of every table of one store over its tiers (see the module docstring)."""

    def __init__(self, tiers, lock: threading.Lock, cxl_ports: int, rebalance_tolerance: float):
        self.tiers = tiers
        self.tiers_by_id = {tier.tier_id: tier for tier in tiers}
        self.lock = lock  # the store's catalog lock: guards the tiers' extent allocators and every SlotSpace
        self.cxl_ports = cxl_ports
        self.nparts = len(fabric.part_names(cxl_ports))
        self.rebalance_tolerance = rebalance_tolerance

    # ---- homes for a new table, and giving them back ---------------------------------------

    def place(self, table: Table) -> None:
        """Homes for every row of a table no one else sees yet: DRAM first, then CXL, then SCM (only
        the pinned tier, for a pinned table; no more rows in a memory tier than the table's own
        limit there); all or nothing (TierFullError).  Call under the catalog lock."""
        first, pin = 0, table.settings.pin
        try:
            for tier in self.tiers:
                if first < table.num_rows and pin in ("", tier.name):
                    want = table.num_rows - first
                    limit = table.limit_rows(tier.tier_id)
                    first += self._fill(table, tier.tier_id, first, want if limit is None else min(want, limit))
        except BaseException:
            self.release(table)
            raise
        if first < table.num_rows:
            self.release(table)
            free = ", ".join(f"{t.name} {t.largest_free()}" for t in self.tiers)
            where = f"tier {pin} (the table is pinned there)" if pin else "the tiers"
            raise TierFullError(f"table {table.name!r} needs about {table.num_rows * table.stride} bytes and {where} "
                                f"cannot hold it (largest free extent in bytes: {free})")
        self.count_ports(table)

    def _fill(self, table: Table, tier_id: int, first: int, want: int) -> int:
        """Homes rows [first, first + want) in a tier, as far as it has room; how many it homed."""
        slots = self.space(table, tier_id).take(want)
        shift = table.native.tier_shift
        for start in range(0, slots.size, PLACE_BATCH_ROWS):
            part = slots[start:start + PLACE_BATCH_ROWS]
            ids = np.arange(first + start, first + start + part.size, dtype=np.int64)
            table.native.publish(ids, ((tier_id << shift) | part).astype(np.uint32))
        table.rows_by_tier[tier_id] += slots.size
        return slots.size

    def release(self, table: Table) -> None:
        """Gives every slot of a table that is gone back to its tier (call under the catalog lock)."""
        for space in table.slots.values():
            space.release()
        table.slots.clear()
        table.rows_by_tier = [0, 0, 0]

    # ---- slots ---------------------------------------------------------------------------------

    def space(self, table: Table, tier_id: int) -> SlotSpace:
        """The table's slots in a tier (made on first use); call under the catalog lock."""
        if tier_id not in table.slots:
            space = SlotSpace(self.tiers_by_id[tier_id], table.native, table.stride, table.chunk_shift,
                              first_part=(0, 1, 1 + self.cxl_ports)[tier_id])
            space.limit_rows = table.limit_rows(tier_id)
            table.slots[tier_id] = space
        return table.slots[tier_id]

    def settings_changed(self, table: Table) -> None:
        """Takes a table's new limits into its slot spaces (call under the catalog lock)."""
        for tier_id, space in table.slots.items():
            space.limit_rows = table.limit_rows(tier_id)

    def room_rows(self, table: Table, tier_id: int) -> int:
        """How many more rows of the table a tier could take now: the table's own limit there, the
        free slots it holds, and the tier's free space (negative when the table is over its limit)."""
        limit = table.limit_rows(tier_id)
        with self.lock:
            room = self.space(table, tier_id).room()
            if limit is not None:
                room = min(room, limit - table.rows_by_tier[tier_id])
        return room

    # ---- rows changing home --------------------------------------------------------------------

    def move(self, table: Table, ids: np.ndarray, target: int, pacer: ReadPacer | None = None) -> int:
        """Moves rows (int64, no duplicates) to new homes in tier target; rows already there stay.
        When the tier has room for only some, the first ones in the order given move.  pacer: how the
        move reads its rows off SCM (see _read; None: all at once, kernels.scm_queue_depth in flight).
        Returns how many moved; NotFoundError for a table that is gone."""
        with table.write_lock:
            table.check_live()
            return self._move(table, ids, target, pacer)

    def _move(self, table: Table, ids: np.ndarray, target: int, pacer: ReadPacer | None = None) -> int:
        """move() under the write lock: copy, publish, then give the old slots back."""
        shift = table.native.tier_shift
        mask = (1 << shift) - 1
        ids = ids[(table.native.loc[ids] >> shift) != target]
        has_copy = np.zeros(ids.size, dtype=bool)
        if target == native.TIER_SCM and table.scm_copy is not None:
            has_copy = table.scm_copy[ids] != NO_SCM_COPY  # these need no room: their slot is there
        need = int(ids.size - np.count_nonzero(has_copy))
        with self.lock:
            space = self.space(table, target)
            slots = self._cxl_slots(table, space, ids) if target == native.TIER_CXL else space.take(need)
        if slots.size < need:  # the tier is full: the rows before the first one without a slot move
            cut = int(np.flatnonzero(~has_copy)[slots.size])
            ids, has_copy = ids[:cut], has_copy[:cut]
        ids = np.ascontiguousarray(ids)
        if not ids.size:
            return 0
        old = table.native.loc[ids].copy()
        slot = np.empty(ids.size, dtype=np.uint32)
        slot[~has_copy] = slots
        write = ~has_copy
        if has_copy.any():
            slot[has_copy] = table.scm_copy[ids[has_copy]]
            write |= table.scm_dirty[ids]  # a dirty copy is rewritten in place; a clean one is reused as is
        new = ((target << shift) | slot).astype(np.uint32)
        if write.any():
            moving = np.ascontiguousarray(ids[write])
            rows = np.empty((moving.size, table.stride), dtype=np.uint8)
            try:
                self._read(table, moving, (old[write] >> shift) == native.TIER_SCM, rows, pacer)
                table.native.write_slots(np.ascontiguousarray(new[write]), rows)
            except BaseException:  # (an SCM row that cannot be read): nothing points at the new slots yet
                with self.lock:
                    space.give_back(slots)
                raise
        table.native.publish(ids, new)  # from here on no lookup holds an old slot
        self._account_ports(table, ids, old, new)
        from_scm = (old >> shift) == native.TIER_SCM
        if target != native.TIER_SCM and from_scm.any():
            if table.scm_copy is None:
                table.scm_copy = np.full(table.num_rows, NO_SCM_COPY, dtype=np.uint32)
                table.scm_dirty = np.zeros(table.num_rows, dtype=bool)
            table.scm_copy[ids[from_scm]] = old[from_scm] & mask
            table.scm_dirty[ids[from_scm]] = False
        elif target == native.TIER_SCM and table.scm_copy is not None:
            table.scm_copy[ids] = NO_SCM_COPY
        with self.lock:
            for tid, space in table.slots.items():
                leaving = old[(old >> shift) == tid]
                if tid != native.TIER_SCM:  # (an SCM slot left behind stays the row's copy)
                    space.give_back(leaving & mask)
                table.rows_by_tier[tid] -= leaving.size
            table.rows_by_tier[target] += ids.size
        return int(ids.size)

    @staticmethod
    def _read(table: Table, ids: np.ndarray, on_scm: np.ndarray, out: np.ndarray, pacer: ReadPacer | None) -> None:
        """out = the encoded rows of ids (on_scm: which live on SCM).  With a pacer, in runs of ids with at
        most pacer.read_depth rows on SCM each (None: the rest at once), pacer.read(rows on SCM) after each
        run: the pacer spaces the runs out, and a move has no more reads in flight beside the lookups'."""
        if pacer is None or not on_scm.any():
            table.native.read_rows(ids, out)
            return
        before = np.concatenate([[0], np.cumsum(on_scm)])  # rows on SCM before each position
        first = 0
        while first < ids.size:
            depth = pacer.read_depth
            end = ids.size if depth is None else int(np.searchsorted(before, before[first] + depth, "right")) - 1
            table.native.read_rows(ids[first:end], out[first:end])
            pacer.read(int(before[end] - before[first]))
            first = end

    def written(self, table: Table, ids: np.ndarray) -> None:
        """Rows a write just changed (under the table's write lock): their SCM copies are dirty now."""
        if table.scm_copy is not None:
            table.scm_dirty[ids[table.scm_copy[ids] != NO_SCM_COPY]] = True

    def _relocate(self, table: Table, ids: np.ndarray, tier: int, slots: np.ndarray) -> None:
        """Copies rows into the given free slots of a tier and points them there (under the write
        lock; the old slots are the caller's to reuse or release: no lookup holds them once this
        returns); the ports' heat follows rows that change port.  Rows relocated stay in their tier
        or come back to it within the caller's step, so the per-tier counts and SCM copies hold."""
        new = ((tier << table.native.tier_shift) | slots).astype(np.uint32)
        old = table.native.loc[ids]
        rows = np.empty((ids.size, table.stride), dtype=np.uint8)
        table.native.read_rows(ids, rows)
        table.native.write_slots(new, rows)
        table.native.publish(ids, new)
        self._account_ports(table, ids, old, new)

    def trim(self, table: Table, tier: int, share: int | None = None) -> int:
        """Gives the memory a table holds in a memory tier beyond its own limit there (or share, its
        group's row limit this interval, when smaller) back to the tier (so that a table whose limit
        was lowered leaves the room to others): the rows living beyond the limit's worth of slots
        move into free slots below it, then whole chunks and the tail of the last kept one are
        released.  Does nothing while the rows do not fit below the limit (the policy demotes
        first).  Returns the bytes released."""
        limit = table.limit_rows(tier)
        if share is not None:
            limit = share if limit is None else min(limit, share)
        space = table.slots.get(tier)
        if limit is None or space is None:
            return 0
        shift = table.native.tier_shift
        with table.write_lock:
            table.check_live()
            with self.lock:
                if space.capacity <= limit or table.rows_by_tier[tier] > limit:
                    return 0
                spare = space.spare(limit)
            loc = table.native.loc
            inside = np.flatnonzero((loc >> shift) == tier)
            ids = inside[~space.kept(loc[inside] & ((1 << shift) - 1), limit)].astype(np.int64)
            slots = spare[:ids.size]
            if ids.size:
                self._relocate(table, ids, tier, slots)  # from here on no lookup holds a slot beyond the cut
            with self.lock:
                return space.cut(limit, slots)

    # ---- CXL ports -----------------------------------------------------------------------------

    def spread_ports(self, table: Table, max_rows: int = 1 << 62, batch_rows: int = 8192) -> int:
        """Levels the heat of the table's CXL rows over the fabric ports (fabric.rebalance): hot rows
        of busy ports trade places with cold rows of idle ones, each trade three copies (the hot row
        to a spare slot, the cold row into its old slot, the hot row into the cold one's), at most
        max_rows copies, in batches during which the table's writes wait.  The spare slots are free
        slots of the table in CXL, else DRAM, else SCM (rows bounced there are served from SCM for
        the moment).  Returns the rows copied."""
        copied = 0
        if self.cxl_ports > 1:
            parts = table.native.parts_of_locs(table.native.loc)
            rows = np.flatnonzero((parts >= 1) & (parts <= self.cxl_ports))
            heat, port = table.native.heat[rows], parts[rows].astype(np.int64) - 1
            hot, cold = fabric.rebalance(heat, port, self.cxl_ports, self.rebalance_tolerance, max_rows // 3)
            table.port_load = fabric.port_loads(heat, port, self.cxl_ports)
            hot, cold = rows[hot], rows[cold]
            first = 0
            while first < hot.size:
                with table.write_lock:
                    table.check_live()
                    done, traded = self._trade(table, hot[first:first + batch_rows], cold[first:first + batch_rows])
                if not done:
                    break
                first += done
                copied += 3 * traded
        self.count_ports(table)
        return copied

    def _trade(self, table: Table, hot: np.ndarray, cold: np.ndarray) -> tuple[int, int]:
        """Swaps the homes of CXL rows hot[i] and cold[i] through spare slots (under the write lock),
        the first pairs as far as the spare slots go; pairs no longer both in CXL are skipped.
        Returns (pairs done or skipped, pairs traded)."""
        shift, batch = table.native.tier_shift, hot.size
        mask = (1 << shift) - 1
        valid = np.flatnonzero(((table.native.loc[hot] >> shift) == native.TIER_CXL) &
                               ((table.native.loc[cold] >> shift) == native.TIER_CXL))
        with self.lock:
            for spare_tier in (native.TIER_CXL, native.TIER_DRAM, native.TIER_SCM):  # the fastest with room
                spare = self.space(table, spare_tier).take(valid.size)
                if spare.size:
                    break
        pairs = valid[:spare.size]
        hot, cold = np.ascontiguousarray(hot[pairs]), np.ascontiguousarray(cold[pairs])
        if pairs.size:
            hot_slots, cold_slots = table.native.loc[hot] & mask, table.native.loc[cold] & mask
            self._relocate(table, hot, spare_tier, spare)
            self._relocate(table, cold, native.TIER_CXL, hot_slots)
            self._relocate(table, hot, native.TIER_CXL, cold_slots)
        with self.lock:
            self.space(table, spare_tier).give_back(spare)  # (the hot rows have left them)
        done = batch if pairs.size == valid.size else int(valid[pairs.size])
        return done, int(pairs.size)

    def _cxl_slots(self, table: Table, space: SlotSpace, ids: np.ndarray) -> np.ndarray:
        """Slots for rows arriving in the CXL tier, each on the port fabric.deal picks for its heat
        (another when that port is full); fewer when the tier is short (then the rows before the
        first one left without a slot take them).  Call under the catalog lock."""
        if self.cxl_ports == 1:
            return space.take(ids.size)
        want = fabric.deal(table.native.heat[ids], table.port_load)
        slots = np.empty(ids.size, dtype=np.uint32)
        got = np.zeros(ids.size, dtype=bool)
        for port in range(self.cxl_ports):
            mine = np.flatnonzero(want == port)
            taken = space.take(mine.size, port)
            slots[mine[:taken.size]], got[mine[:taken.size]] = taken, True
        missing = np.flatnonzero(~got)
        taken = space.take(missing.size)
        slots[missing[:taken.size]], got[missing[:taken.size]] = taken, True
        return slots if got.all() else slots[got]

    def _account_ports(self, table: Table, ids: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """Keeps the ports' heat up to date as rows move from placement entries old to new."""
        heat = table.native.heat[ids].astype(np.float64)
        change = (np.bincount(table.native.parts_of_locs(new), weights=heat, minlength=self.nparts) -
                  np.bincount(table.native.parts_of_locs(old), weights=heat, minlength=self.nparts))
        table.port_load += change[1:1 + self.cxl_ports]

    def count_ports(self, table: Table) -> None:
        """CXL rows per port, as shown by describe (counted when ports are assigned, not per call)."""
        counts = np.bincount(table.native.parts_of_locs(table.native.loc), minlength=self.nparts)
        table.rows_by_port = {f"{TIERS[1]}{p}": int(counts[1 + p]) for p in range(self.cxl_ports)}
