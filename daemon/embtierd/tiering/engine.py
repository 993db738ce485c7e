"""The tiering engine: tracker -> policy -> mover, once per interval.

- tracker: the heat counters the lookup kernels bump (1 in 2^heat_sample_shift
  accesses, saturating at 255); the policy ages them after each interval;
- policy: per table, as its settings name it (policy_lfu: LFU with aging,
  the default; policy_lru: promote on access, the baseline); the plan they
  share (policy_base.run_interval) promotes the hottest rows below into free
  room, then swaps them against the coldest rows above when the policy finds
  the swap worth it (hysteresis), demotes rows over a table's own limit, and
  moves a pinned table's rows to its tier;
- mover: store.mover (store/mover.py), the only code that changes a row's
  home; after the plan's moves it trims memory over a table's own limit
  and levels the heat of the CXL rows over the fabric's ports (rows trade
  places between ports, within what is left of the budget).

The engine holds the store's table handles for an interval (Store.handles),
never names: a table dropped or re-created meanwhile has a retired handle,
every change through which fails, so it is never mixed with its successor.

The migration budget (bandwidth x interval, in bytes) is shared by all
tables; the table served first rotates each interval so that none starves.
What the budget left undone is the migration backlog.

Moves run in batches of MOVE_BATCH_ROWS (WriteRows to a table waits for
at most one batch: a batch of rows all on SCM, paced, about 1/8 s) and
none starts after the interval's time is up: what is
left joins the backlog, and serving is never starved by a long interval.
The batches are paced (Pacer): the bytes moved at the bandwidth, and the
rows read off SCM, which cost the device's IOPS rather than bytes, at
SCM_READ_ROWS_PER_SECOND, so that an interval's promotions read SCM at a
steady rate beside the lookups' instead of in a burst at its start.  A
batch reads its SCM rows in runs with pauses between them (Mover._read),
each run with as few reads in flight as keep the rate: from SCM_READ_DEPTH
(the lookups keep kernels.scm_queue_depth), doubled after a run that fell
behind the rate and halved after one that was ahead, so that a slow or busy
device gets the reads in flight it needs and the interval's moves are not
cut short.  The engine's thread runs at a lower CPU priority (nice 10) than
the serving threads, and the next interval starts one interval after the
last one started.

SCM and promotions: a row has one home, which lookups and WriteRows use.
A row promoted out of SCM (read with the lookup path's batched O_DIRECT
reads) keeps its SCM slot as a copy, clean until WriteRows changes the row
(the mover marks it dirty).  Demoting it again writes nothing when the copy
is clean (the placement entry points back at it) and rewrites it in place
when dirty; only rows that never lived on SCM take a new SCM slot.  So rows
that bounce between a hot and a warm phase cost SCM no write bandwidth, at
the price of SCM space held by the copies of promoted rows (SCM is the
capacity tier) and 5 bytes per row of copy bookkeeping, made the first time
one of the table's rows leaves SCM (Mover._move).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
from embtier.wire import TIERS

from embtierd.errors import NotFoundError, StorageError
from embtierd.store.catalog import Store
from embtierd.store.table import Table
from embtierd.tiering.config import TieringConfig
from embtierd.tiering.groups import group_limits
from embtierd.tiering.policies import make_policy
from embtierd.tiering.policy_base import UNLIMITED, Policy, run_interval

log = logging.getLogger(__name__)

MOVE_BATCH_ROWS = 8192  # rows per move_rows call: WriteRows to the table waits at most one batch
SCM_READ_ROWS_PER_SECOND = 65536  # rows an interval's moves read off SCM per second, at most (the lookups keep the rest)
SCM_READ_DEPTH = 32     # a run's reads of rows off SCM in flight at first and at least (Pacer.read_depth)
ENGINE_NICE = 10        # the engine thread's CPU priority below the serving threads' (Linux: per thread)


def lower_priority() -> None:
    """Lowers the calling thread's CPU priority to ENGINE_NICE (the engine's thread, and whatever does its
    work the same way)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENGINE_NICE)
    except OSError as e:  # (a sandbox may refuse it: the engine then runs at the serving threads' priority)
        log.info("tiering: could not lower the engine thread's priority: %s", e)


class Pacer:
    """Spends an interval's moves at bytes_per_second (moved, after each batch) and their reads of rows
    off SCM at scm_rows_per_second (read, after each run of reads: Mover._read): waits until what was
    spent so far is due, never past the deadline.  And how many rows on SCM a run reads at once
    (read_depth, its reads in flight): from min_read_depth, twice as many after a run that fell behind
    the rate, half as many after one that was ahead, so that the moves read SCM with the fewest reads
    in flight that keep the rate; at max_read_depth or more, None (the lookups' own depth)."""

    def __init__(self, bytes_per_second: float, deadline: float,
                 scm_rows_per_second: float = SCM_READ_ROWS_PER_SECOND,
                 min_read_depth: int | None = None, max_read_depth: int = 1 << 30):
        self.rate = bytes_per_second
        self.scm_rate = scm_rows_per_second
        self.deadline = deadline
        self.start = time.monotonic()
        self.spent = 0
        self.scm_rows = 0
        self.min_depth, self.max_depth = min_read_depth, max_read_depth
        self.depth = min_read_depth

    @property
    def read_depth(self) -> int | None:
        """Rows on SCM the next run reads at once (None: all that are left, as many in flight as the lookups')."""
        return None if self.depth is None or self.depth >= self.max_depth else self.depth

    def moved(self, nbytes: int) -> None:
        self.spent += nbytes
        self._wait(self.spent / self.rate)

    def read(self, scm_rows: int) -> None:
        self.scm_rows += scm_rows
        ahead = self._wait(self.scm_rows / self.scm_rate)
        if scm_rows and self.depth is not None:
            self.depth = max(self.min_depth, self.depth // 2) if ahead else min(self.max_depth, 2 * self.depth)

    def _wait(self, seconds_due: float) -> bool:
        """Sleeps until seconds_due after the start (at most until the deadline); whether it had to."""
        wait = min(self.start + seconds_due, self.deadline) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return wait > 0


@dataclass
class TableState:
    """What the engine keeps per table between intervals."""

    policy_name: str
    serial: int        # the store's table serial: a re-created table starts afresh
    policy: Policy
    backlog_rows: int = 0
    moved_rows: int = 0


class TieringEngine:
    def __init__(self, store: Store, config: TieringConfig, metrics=None):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.intervals = 0
        self._state: dict[str, TableState] = {}
        self._lock = threading.Lock()  # one interval at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scm_rows_per_second: float = SCM_READ_ROWS_PER_SECOND  # the Pacer's SCM read rate
        self.scm_read_depth: int | None = SCM_READ_DEPTH

    def state(self, table: str) -> TableState | None:
        """The table's engine state as of the last interval (None before its first)."""
        return self._state.get(table)

    def run_once(self) -> dict[tuple[str, str], int]:
        """One interval over every table; returns rows moved per (from, to) tier."""
        with self._lock:
            return self._interval()

    def settle(self) -> dict[tuple[str, str], int]:
        """One interval without the bandwidth budget or deadline (at start, before serving: rows
        follow the heat a checkpoint brought back at once)."""
        with self._lock:
            start = time.perf_counter()
            moved = self._interval(unlimited=True)
        if moved:
            log.info("tiering: placed rows by their restored heat in %.2f s: %s", time.perf_counter() - start,
                     ", ".join(f"{src}->{dst} {n}" for (src, dst), n in moved.items()))
        return moved

    def _interval(self, unlimited: bool = False) -> dict[tuple[str, str], int]:
        moved: dict[tuple[str, str], int] = {}
        start = time.perf_counter()
        budget_bytes = UNLIMITED if unlimited else int(self.config.bandwidth_bytes_per_second *
                                                        self.config.interval_seconds)
        tables = self.store.handles()  # held for the interval: a table re-created meanwhile is another handle
        self._state = {name: s for name, s in self._state.items() if name in {t.name for t in tables}}
        if tables:
            first = self.intervals % len(tables)
            tables = tables[first:] + tables[:first]
        # moves past the deadline wait for the next interval
        deadline = math.inf if unlimited else time.monotonic() + self.config.interval_seconds
        mover = self.store.mover
        pacer = None if unlimited else Pacer(self.config.bandwidth_bytes_per_second, deadline,
                                             self.scm_rows_per_second, self.scm_read_depth,
                                             self.store.config.kernels.scm_queue_depth)
        shares = group_limits(self.config.groups, tables) if self.config.groups else {}
        for table in tables:
            name, stride, pin = table.name, table.stride, table.settings.pin
            try:
                state = self._table_state(table)
                room = [mover.room_rows(table, 0), mover.room_rows(table, 1), UNLIMITED]
                for tier, limit in enumerate(shares.get(name, ())):  # its group's share (a tenant's)
                    if limit is not None:
                        room[tier] = min(room[tier], limit - table.rows_by_tier[tier])
                result = run_interval(state.policy, table.native.heat, table.placement(), room,
                                      max(0, budget_bytes) // stride, self._mover(table, deadline, pacer),
                                      TIERS.index(pin) if pin else None)
                for tier in (0, 1):  # memory over the table's own limit (or share) goes back to the tier
                    mover.trim(table, tier, shares[name][tier] if name in shares else None)
                left = max(0, budget_bytes) // stride - result.rows_moved
                traded = mover.spread_ports(table, left) if time.monotonic() < deadline else 0
            except NotFoundError:  # dropped or replaced meanwhile: its handle is retired
                self._state.pop(name, None)
                continue
            except StorageError as e:  # (a row its device cannot read): the other tables still get their turn
                log.warning("tiering: table %s skipped this interval: %s", name, e)
                continue
            state.backlog_rows, state.moved_rows = result.backlog_rows, result.rows_moved
            budget_bytes -= (result.rows_moved + traded) * stride
            table_moves = {(TIERS[src], TIERS[dst]): n for (src, dst), n in result.moved.items()}
            for key, n in table_moves.items():
                moved[key] = moved.get(key, 0) + n
            if self.metrics is not None:
                self.metrics.migrated(table_moves, (result.rows_moved + traded) * stride)
                self.metrics.ports_balanced(name, traded, table.port_balance())
        self.intervals += 1
        if self.metrics is not None:
            self.metrics.tiering_interval(time.perf_counter() - start,
                                          {name: s.backlog_rows for name, s in self._state.items()})
        return moved

    def _mover(self, table: Table, deadline: float, pacer: Pacer | None = None):
        """The plan's mover for one table: Mover.move in batches, paced, none started after deadline."""
        def move(rows: np.ndarray, tier: int) -> int:
            done = 0
            for first in range(0, rows.size, MOVE_BATCH_ROWS):
                if time.monotonic() > deadline:
                    break
                batch = np.ascontiguousarray(rows[first:first + MOVE_BATCH_ROWS], dtype=np.int64)
                n = self.store.mover.move(table, batch, tier, pacer)
                done += n
                if pacer is not None:
                    pacer.moved(n * table.stride)
                if n < batch.size:
                    break
            return done
        return move

    def _table_state(self, table: Table) -> TableState:
        """The table's policy instance, made afresh when the table or its policy changed."""
        policy_name, serial = table.settings.policy, table.serial
        state = self._state.get(table.name)
        if state is None or (state.policy_name, state.serial) != (policy_name, serial):
            state = TableState(policy_name, serial, make_policy(policy_name, table.num_rows, self.config.hysteresis,
                                                                self.config.aging_intervals))
            self._state[table.name] = state
        return state

    def start(self) -> None:
        if not self.config.enabled:
            return

        def loop():
            lower_priority()
            started = time.monotonic()
            while not self._stop.wait(max(0.0, started + self.config.interval_seconds - time.monotonic())):
                started = time.monotonic()
                try:
                    self.run_once()
                except Exception:
                    log.exception("tiering interval failed")

        self._thread = threading.Thread(target=loop, name="tiering", daemon=True)
        self._thread.start()
        log.info("tiering: every %.1f s, %d bytes/s, default policy %s (hysteresis %.2f, aging every %d intervals)",
                 self.config.interval_seconds, self.config.bandwidth_bytes_per_second, self.config.policy,
                 self.config.hysteresis, self.config.aging_intervals)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
