"""The queue of lookups in front of the kernels: priority classes, then earliest deadline first.

Lookup and LookupPooled calls (the service validates them first, on their gRPC threads) hand their
work to Scheduler.run.  At most scheduler.kernel_workers lookups run at once, each on its own gRPC
thread while it holds one of that many kernel slots: a lookup that finds a slot free and nobody
waiting runs at once (no thread hand-off); the others wait in the queue, and each slot freed goes
to the queued lookup of the highest tenant priority, earliest deadline first.  Writes and admin
calls never enter the queue: they run on their gRPC threads as before, so lookups cannot starve them.

Admission: a lookup is refused at once (DEADLINE_EXCEEDED, naming the prediction and the time
left) when the work queued before it plus its own would end past its deadline; a worker refuses
(sheds) queued work that can no longer end in time before running it.  The prediction is a cost
model of the daemon's own measurements: service time = base + cost per row of each tier x the
rows the lookup reads from it, fitted by least squares over the lookups the workers last ran, the
rows per tier of a lookup estimated from the share each tier served of its tables' recent
lookups.  Lower priorities wait behind higher ones, so under overload they are the ones whose
deadlines pass: they are shed first.  A tenant with max_in_flight lookups queued or running gets
RESOURCE_EXHAUSTED for one more, as does any lookup once max_queued wait; a call its client cancels
(or whose gRPC deadline passes) leaves the queue.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embtierd.config import SchedulerConfig, TenantConfig
from embtierd.errors import DeadlineExceededError, OverloadedError, UnavailableError

log = logging.getLogger(__name__)

NUM_TIERS = 3
WINDOW = 512          # lookups the cost model is fitted on
REFIT_EVERY = 32      # lookups between fits
MIX_WEIGHT = 0.05     # weight of a lookup's tier shares in its table's running shares
# A start the measurements soon replace: seconds per lookup, then per DRAM, CXL and SCM row.  Low on
# purpose: until the daemon has measured itself it refuses nothing it could not have served.
START_COSTS = (20e-6, 5e-9, 10e-9, 1e-6)


class CostModel:
    """Predicted service time of a lookup from the rows it reads per tier, fitted to measurements.
    (Plain floats per call: a few microseconds; numpy only in the fit.)"""

    def __init__(self):
        self.coef = np.array(START_COSTS)
        self._window: deque[tuple[float, float, float, float]] = deque(maxlen=WINDOW)  # rows per tier, seconds
        self._seen = 0
        self._mix: dict[str, tuple[float, float, float]] = {}  # table -> share of its rows each tier served lately
        self._lock = threading.Lock()

    @property
    def coef(self) -> np.ndarray:
        """Seconds per lookup, then per DRAM, CXL and SCM row."""
        return self._coef

    @coef.setter
    def coef(self, value) -> None:
        self._coef = np.array(value, dtype=np.float64)
        self._c = tuple(float(v) for v in self._coef)  # the same, as floats for predict

    def rows(self, work: list[tuple[str, int]]) -> tuple[float, float, float]:
        """Rows per tier a lookup of (table, ids) pairs is expected to read."""
        d = c = s = 0.0
        for table, n in work:
            md, mc, ms = self._mix.get(table, ALL_DRAM)
            d, c, s = d + n * md, c + n * mc, s + n * ms
        return d, c, s

    def predict(self, rows) -> float:
        c0, c1, c2, c3 = self._c
        return c0 + c1 * rows[0] + c2 * rows[1] + c3 * rows[2]

    def observe(self, tables: dict[str, np.ndarray], seconds: float) -> None:
        """A lookup that ran: rows per tier it read from each table, and its service time."""
        d = c = s = 0.0
        w = MIX_WEIGHT
        with self._lock:
            for table, tier_rows in tables.items():
                td, tc, ts = tier_rows.tolist()
                n = td + tc + ts
                if n:
                    old = self._mix.get(table)
                    if old is None:
                        self._mix[table] = (td / n, tc / n, ts / n)
                    else:
                        self._mix[table] = ((1 - w) * old[0] + w * td / n, (1 - w) * old[1] + w * tc / n,
                                            (1 - w) * old[2] + w * ts / n)
                d, c, s = d + td, c + tc, s + ts
            self._window.append((d, c, s, seconds))
            self._seen += 1
            if self._seen % REFIT_EVERY == 0:
                self._fit()

    def _fit(self) -> None:
        seen = np.array(self._window)
        x, y = np.column_stack([np.ones(len(seen)), seen[:, :NUM_TIERS]]), seen[:, NUM_TIERS]
        used = np.flatnonzero(x.any(axis=0))  # (a tier no lookup read keeps its cost)
        coef, *_ = np.linalg.lstsq(x[:, used], y, rcond=None)
        fitted = self.coef.copy()
        fitted[used] = np.maximum(coef, 0.0)
        self.coef = fitted


ALL_DRAM = (1.0, 0.0, 0.0)  # the tier shares of a table no lookup read yet


@dataclass(eq=False)
class Job:
    """One lookup: its tenant, deadline (monotonic), predicted service time and the work itself."""

    tenant: TenantConfig
    deadline: float
    predicted: float
    run: Callable[[], tuple[Any, dict[str, np.ndarray]]]  # -> (result, rows per tier read, by table)
    order: tuple = ()
    enqueued: float = 0.0
    started: float = 0.0
    state: str = "queued"        # queued, running (holds a slot), done, shed, cancelled
    error: BaseException | None = None
    turn: threading.Event | None = None  # a queued lookup's: set when it gets a slot, or is refused


class Scheduler:
    """The queue and its kernel slots.  outcome(tenant, outcome, queue_s, service_s) is told how every
    lookup ended (rpc/metrics.py counts them)."""

    def __init__(self, config: SchedulerConfig, outcome: Callable[[str, str, float, float], None]):
        self.config = config
        self.cost = CostModel()
        self._outcome = outcome
        self._slots = config.kernel_workers  # free ones
        self._heap: list[tuple[tuple, Job]] = []
        self._running: set[Job] = set()
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._stopping = False

    def stop(self) -> None:
        """Refuses new lookups (UNAVAILABLE); those queued still get their turn."""
        with self._lock:
            self._stopping = True

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._heap)

    def run(self, tenant: TenantConfig, remaining: float, work: list[tuple[str, int]],
            run: Callable[[], tuple[Any, dict[str, np.ndarray]]], context) -> Any:
        """Runs run (a lookup of work: (table, ids) pairs) for tenant, with remaining seconds to its
        deadline, once it holds one of the scheduler.kernel_workers slots, on the calling (gRPC)
        thread, and returns its result; queues it while no slot is free (or others wait), refuses it
        as the module says.  With scheduler.enabled false, runs it at once (and only counts whether
        it met its deadline)."""
        now = time.monotonic()
        if not self.config.enabled:
            result, _ = run()
            end = time.monotonic()
            self._outcome(tenant.name, "met" if end - now <= remaining else "missed", 0.0, end - now)
            return result
        job = Job(tenant, now + remaining, self.cost.predict(self.cost.rows(work)), run)
        job.order = (-tenant.priority, job.deadline, next(self._seq))
        with self._lock:
            if self._stopping:
                raise UnavailableError("the daemon is shutting down")
            self._admit(job, now, remaining)
            self._in_flight[tenant.name] = self._in_flight.get(tenant.name, 0) + 1
            job.enqueued = now
            queued = not self._slots or bool(self._heap)  # else a free slot and nobody waiting: run now
            if queued:
                job.turn = threading.Event()
                heapq.heappush(self._heap, (job.order, job))
            else:
                self._slots -= 1
                self._start(job, now)
        if queued:  # (its state may change as soon as the lock is released: a slot, or shed)
            if not context.add_callback(lambda: self._cancel(job)):  # (the call already ended)
                self._cancel(job)
            job.turn.wait()
            if job.error is not None:  # shed or cancelled while queued
                raise job.error
        return self._execute(job)

    def _admit(self, job: Job, now: float, remaining: float) -> None:
        """Refuses job (under the lock) when its tenant or the queue is full, or when what runs before
        it and itself would end past its deadline."""
        tenant = job.tenant
        if self._in_flight.get(tenant.name, 0) >= tenant.max_in_flight:
            self._outcome(tenant.name, "refused_in_flight", 0.0, 0.0)
            raise OverloadedError(f"tenant {tenant.name!r} has {tenant.max_in_flight} lookups queued or running, "
                                  f"its max_in_flight: wait for one to end")
        if len(self._heap) >= self.config.max_queued:
            self._outcome(tenant.name, "refused_queue_full", 0.0, 0.0)
            raise OverloadedError(f"{len(self._heap)} lookups are queued, scheduler.max_queued: try again later")
        wait = 0.0
        if not self._slots or self._heap:
            before = sum(other.predicted for order, other in self._heap if order < job.order)
            busy = sum(max(0.0, other.predicted - (now - other.started)) for other in self._running)
            wait = (before + busy) / self.config.kernel_workers
        if wait + job.predicted > remaining:
            self._outcome(tenant.name, "refused_deadline", 0.0, 0.0)
            raise DeadlineExceededError(
                f"tenant {tenant.name!r}: predicted {1e3 * (wait + job.predicted):.2f} ms (queue {1e3 * wait:.2f} ms "
                f"+ service {1e3 * job.predicted:.2f} ms) vs {1e3 * remaining:.2f} ms left to the deadline: refused "
                f"before it ran")

    def _start(self, job: Job, now: float) -> None:
        """job takes the slot it was given (under the lock)."""
        job.state, job.started = "running", now
        self._running.add(job)

    def _execute(self, job: Job) -> Any:
        """Runs job (which holds a slot), then hands its slot on."""
        try:
            result, tables = job.run()
        except BaseException as e:  # noqa: BLE001 - raised below, once the slot is handed on
            job.error, result, tables = e, None, {}
        finished = time.monotonic()
        service = finished - job.started
        if tables:
            self.cost.observe(tables, service)
        with self._lock:
            self._running.discard(job)
            self._release(job)
            job.state = "done"
            self._hand_over()
        outcome = "failed" if job.error is not None else "met" if finished <= job.deadline else "missed"
        self._outcome(job.tenant.name, outcome, job.started - job.enqueued, service)
        if job.error is not None:
            raise job.error
        return result

    def _hand_over(self) -> None:
        """A slot was freed (under the lock): it goes to the first queued lookup that can still end in
        time; those that cannot are shed unrun."""
        while self._heap:
            _, job = heapq.heappop(self._heap)
            now = time.monotonic()
            if now + job.predicted <= job.deadline:
                self._start(job, now)
                job.turn.set()
                return
            job.state = "shed"
            self._release(job)
            job.error = DeadlineExceededError(
                f"tenant {job.tenant.name!r}: shed after {1e3 * (now - job.enqueued):.2f} ms in the queue: "
                f"predicted service {1e3 * job.predicted:.2f} ms vs {1e3 * (job.deadline - now):.2f} ms left to "
                f"the deadline")
            self._outcome(job.tenant.name, "shed", now - job.enqueued, 0.0)
            job.turn.set()
        self._slots += 1

    def _cancel(self, job: Job) -> None:
        """The call ended (cancelled, or its deadline passed) while job may still be queued."""
        with self._lock:
            if job.state != "queued":
                return
            job.state = "cancelled"
            self._heap.remove((job.order, job))
            heapq.heapify(self._heap)
            self._release(job)
        self._outcome(job.tenant.name, "cancelled", time.monotonic() - job.enqueued, 0.0)
        job.error = DeadlineExceededError(f"tenant {job.tenant.name!r}: the call ended while queued")
        job.turn.set()

    def _release(self, job: Job) -> None:
        left = self._in_flight[job.tenant.name] - 1
        if left:
            self._in_flight[job.tenant.name] = left
        else:
            del self._in_flight[job.tenant.name]
