"""The queue of lookups in front of the kernels: priority classes, then earliest deadline first.

Lookup and LookupPooled calls (the service validates them first, on their gRPC threads) hand their
work to Scheduler.run, which queues it and waits; a fixed set of kernel workers takes the queued
work of the highest tenant priority, earliest deadline first, and runs it.  Writes and admin calls
never enter the queue: they run on their gRPC threads as before, so lookups cannot starve them.

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
from collections.abc import Callable
from dataclasses import dataclass, field
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
    """Predicted service time of a lookup from the rows it reads per tier, fitted to measurements."""

    def __init__(self):
        self.coef = np.array(START_COSTS)
        self._x = np.zeros((WINDOW, 1 + NUM_TIERS))
        self._y = np.zeros(WINDOW)
        self._seen = 0
        self._mix: dict[str, np.ndarray] = {}  # table -> share of its rows each tier served lately
        self._lock = threading.Lock()

    def rows(self, work: list[tuple[str, int]]) -> np.ndarray:
        """Rows per tier a lookup of (table, ids) pairs is expected to read."""
        with self._lock:
            return sum((n * self._mix.get(table, _ALL_DRAM) for table, n in work), np.zeros(NUM_TIERS))

    def predict(self, rows: np.ndarray) -> float:
        return float(self.coef[0] + self.coef[1:] @ rows)

    def observe(self, tables: dict[str, np.ndarray], seconds: float) -> None:
        """A lookup the workers ran: rows per tier it read from each table, and its service time."""
        with self._lock:
            total = np.zeros(NUM_TIERS)
            for table, tier_rows in tables.items():
                n = tier_rows.sum()
                if n:
                    share = tier_rows / n
                    old = self._mix.get(table)
                    self._mix[table] = share if old is None else (1 - MIX_WEIGHT) * old + MIX_WEIGHT * share
                total += tier_rows
            i = self._seen % WINDOW
            self._x[i] = (1.0, *total)
            self._y[i] = seconds
            self._seen += 1
            if self._seen % REFIT_EVERY == 0:
                self._fit()

    def forget(self, table: str) -> None:
        with self._lock:
            self._mix.pop(table, None)

    def _fit(self) -> None:
        n = min(self._seen, WINDOW)
        x, y = self._x[:n], self._y[:n]
        used = np.flatnonzero(x.any(axis=0))  # (a tier no lookup read keeps its cost)
        coef, *_ = np.linalg.lstsq(x[:, used], y, rcond=None)
        fitted = self.coef.copy()
        fitted[used] = np.maximum(coef, 0.0)
        self.coef = fitted


_ALL_DRAM = np.array([1.0, 0.0, 0.0])


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
    finished: float = 0.0
    state: str = "queued"        # queued, running, done, shed, cancelled
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """The queue and its kernel workers.  outcome(tenant, outcome, queue_s, service_s) is told how
    every lookup ended (rpc/metrics.py counts them)."""

    def __init__(self, config: SchedulerConfig, outcome: Callable[[str, str, float, float], None]):
        self.config = config
        self.cost = CostModel()
        self._outcome = outcome
        self._heap: list[tuple[tuple, Job]] = []
        self._running: set[Job] = set()
        self._in_flight: dict[str, int] = {}
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, name=f"kernel-worker-{i}", daemon=True)
                         for i in range(config.kernel_workers)]

    def start(self) -> None:
        if self.config.enabled:
            for w in self._workers:
                w.start()

    def stop(self) -> None:
        """Lets the workers finish what is queued, then stops them."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for w in self._workers:
            if w.is_alive():
                w.join(timeout=30)

    @property
    def queued(self) -> int:
        with self._cond:
            return sum(job.state == "queued" for _, job in self._heap)

    def run(self, tenant: TenantConfig, remaining: float, work: list[tuple[str, int]],
            run: Callable[[], tuple[Any, dict[str, np.ndarray]]], context) -> Any:
        """Queues run (a lookup of work: (table, ids) pairs) for tenant with remaining seconds to its
        deadline, waits for a worker to run it and returns its result; refuses it as the module says.
        With scheduler.enabled false, runs it here and now (and only counts whether it met its deadline)."""
        now = time.monotonic()
        if not self.config.enabled:
            result, _ = run()
            end = time.monotonic()
            self._outcome(tenant.name, "met" if end - now <= remaining else "missed", 0.0, end - now)
            return result
        job = Job(tenant, now + remaining, self.cost.predict(self.cost.rows(work)), run)
        job.order = (-tenant.priority, job.deadline, next(self._seq))
        with self._cond:
            if self._stopping:
                raise UnavailableError("the daemon is shutting down")
            self._admit(job, now, remaining)
            heapq.heappush(self._heap, (job.order, job))
            job.enqueued = now
            self._in_flight[tenant.name] = self._in_flight.get(tenant.name, 0) + 1
            self._cond.notify()
        if not context.add_callback(lambda: self._cancel(job)):  # (the call already ended)
            self._cancel(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

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
        before = sum(other.predicted for order, other in self._heap if order < job.order and other.state == "queued")
        busy = sum(max(0.0, other.predicted - (now - other.started)) for other in self._running)
        wait = (before + busy) / len(self._workers)
        if wait + job.predicted > remaining:
            self._outcome(tenant.name, "refused_deadline", 0.0, 0.0)
            raise DeadlineExceededError(
                f"tenant {tenant.name!r}: predicted {1e3 * (wait + job.predicted):.2f} ms (queue {1e3 * wait:.2f} ms "
                f"+ service {1e3 * job.predicted:.2f} ms) vs {1e3 * remaining:.2f} ms left to the deadline: refused "
                f"before it ran")

    def _cancel(self, job: Job) -> None:
        """The call ended (cancelled, or its deadline passed) while job may still be queued."""
        with self._cond:
            if job.state != "queued":
                return
            job.state = "cancelled"
            self._heap.remove((job.order, job))
            heapq.heapify(self._heap)
            self._release(job)
        self._outcome(job.tenant.name, "cancelled", time.monotonic() - job.enqueued, 0.0)
        job.error = DeadlineExceededError(f"tenant {job.tenant.name!r}: the call ended while queued")
        job.done.set()

    def _release(self, job: Job) -> None:
        left = self._in_flight[job.tenant.name] - 1
        if left:
            self._in_flight[job.tenant.name] = left
        else:
            del self._in_flight[job.tenant.name]

    def _next(self) -> Job | None:
        """The next job to run (marked running), None to stop; sheds those that can no longer end in time."""
        with self._cond:
            while True:
                while not self._heap and not self._stopping:
                    self._cond.wait()
                if not self._heap:
                    return None
                _, job = heapq.heappop(self._heap)
                now = time.monotonic()
                if now + job.predicted <= job.deadline:
                    job.state, job.started = "running", now
                    self._running.add(job)
                    return job
                job.state = "shed"
                self._release(job)
                job.error = DeadlineExceededError(
                    f"tenant {job.tenant.name!r}: shed after {1e3 * (now - job.enqueued):.2f} ms in the queue: "
                    f"predicted service {1e3 * job.predicted:.2f} ms vs {1e3 * (job.deadline - now):.2f} ms left to "
                    f"the deadline")
                self._outcome(job.tenant.name, "shed", now - job.enqueued, 0.0)
                job.done.set()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                job.result, tables = job.run()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting call
                job.error, tables = e, {}
            job.finished = time.monotonic()
            service = job.finished - job.started
            if tables:
                self.cost.observe(tables, service)
            with self._cond:
                self._running.discard(job)
                self._release(job)
                job.state = "done"
            outcome = "failed" if job.error is not None else "met" if job.finished <= job.deadline else "missed"
            self._outcome(job.tenant.name, outcome, job.started - job.enqueued, service)
            job.done.set()
