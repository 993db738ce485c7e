"""The scheduler (tenancy/scheduler.py) on its own: real queue and worker threads running work the
test controls (an event it releases, a list it records the order in); the e2e tests run it in a
daemon with real lookups."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from embtierd.config import SchedulerConfig, TenantConfig
from embtierd.errors import DeadlineExceededError, OverloadedError
from embtierd.tenancy.scheduler import CostModel, Scheduler

LOW, HIGH = TenantConfig("low", priority=1), TenantConfig("high", priority=5)


class Call:
    """The parts of a gRPC call the scheduler uses: add_callback (kept, to end the call by hand)."""

    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback) -> bool:
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


@pytest.fixture
def scheduler():
    """One kernel worker; outcomes recorded as (tenant, outcome)."""
    outcomes: list[tuple[str, str]] = []
    s = Scheduler(SchedulerConfig(enabled=True, kernel_workers=1, max_queued=8),
                  lambda tenant, outcome, q, t: outcomes.append((tenant, outcome)))
    s.outcomes = outcomes
    yield s
    s.stop()


RUNNING = threading.Event()  # set by gated work once a worker runs it


def work(name: str, ran: list[str], gate: threading.Event | None = None):
    def run():
        if gate is not None:
            RUNNING.set()
            gate.wait(10)
        ran.append(name)
        return name, {"t": np.array([10, 0, 0])}
    return run


def submit(s: Scheduler, tenant, remaining: float, run, results: dict, name: str, call: Call | None = None):
    def go():
        try:
            results[name] = s.run(tenant, remaining, [("t", 10)], run, call or Call())
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[name] = e
    t = threading.Thread(target=go)
    t.start()
    return t


def wait_running() -> None:
    """Until the worker runs the gated work (what is submitted next queues behind it)."""
    assert RUNNING.wait(10)
    RUNNING.clear()


def wait_queued(s: Scheduler, n: int) -> None:
    deadline = time.monotonic() + 10
    while s.queued != n:
        assert time.monotonic() < deadline, f"{s.queued} queued, not {n}"
        time.sleep(0.005)


def test_the_queue_serves_higher_priority_first_then_earliest_deadline(scheduler):
    gate, ran, results = threading.Event(), [], {}
    threads = [submit(scheduler, LOW, 30, work("blocker", ran, gate), results, "blocker")]
    wait_running()  # the worker took it and waits on the gate: what follows queues
    for i, (name, tenant, remaining) in enumerate([("late", LOW, 20), ("soon", LOW, 8), ("high", HIGH, 25),
                                                   ("soon2", LOW, 8.5)]):
        threads.append(submit(scheduler, tenant, remaining, work(name, ran), results, name))
        wait_queued(scheduler, i + 1)
    gate.set()
    for t in threads:
        t.join(10)
    assert ran == ["blocker", "high", "soon", "soon2", "late"]
    assert all(results[n] == n for n in ran)
    assert sorted(scheduler.outcomes) == sorted([("low", "met")] * 4 + [("high", "met")])


def test_a_lookup_predicted_to_miss_its_deadline_is_refused_before_it_runs(scheduler):
    scheduler.cost.coef = np.array([0.2, 0, 0, 0])  # (as if measured: 200 ms a lookup)
    ran = []
    with pytest.raises(DeadlineExceededError, match=r"tenant 'low': predicted 200.00 ms \(queue 0.00 ms \+ service "
                                                    r"200.00 ms\) vs 150.00 ms left to the deadline"):
        scheduler.run(LOW, 0.15, [("t", 10)], work("x", ran), Call())
    assert ran == [] and scheduler.outcomes == [("low", "refused_deadline")]
    # the queue ahead counts: one running (200 ms predicted) and one queued before it
    gate, results = threading.Event(), {}
    threads = [submit(scheduler, LOW, 5, work("a", ran, gate), results, "a")]
    wait_running()
    threads.append(submit(scheduler, HIGH, 0.45, work("b", ran), results, "b"))  # (its deadline comes first)
    wait_queued(scheduler, 1)
    with pytest.raises(DeadlineExceededError, match=r"predicted [56]\d\d.\d\d ms \(queue [34]\d\d.\d\d ms"):
        scheduler.run(HIGH, 0.5, [("t", 10)], work("c", ran), Call())
    gate.set()
    for t in threads:
        t.join(10)
    assert ran[0] == "a" and "c" not in ran


def test_a_queued_lookup_whose_deadline_can_no_longer_be_met_is_shed_unrun(scheduler):
    gate, ran, results = threading.Event(), [], {}
    threads = [submit(scheduler, LOW, 30, work("blocker", ran, gate), results, "blocker")]
    wait_running()
    threads.append(submit(scheduler, HIGH, 0.1, work("doomed", ran), results, "doomed"))
    wait_queued(scheduler, 1)
    time.sleep(0.15)  # its deadline passes while the blocker runs
    gate.set()
    for t in threads:
        t.join(10)
    assert ran == ["blocker"]
    assert isinstance(results["doomed"], DeadlineExceededError) and "shed after" in str(results["doomed"])
    assert ("high", "shed") in scheduler.outcomes


def test_a_tenant_over_its_in_flight_limit_and_a_full_queue_are_refused(scheduler):
    one = TenantConfig("one", max_in_flight=1)
    gate, ran, results = threading.Event(), [], {}
    threads = [submit(scheduler, one, 30, work("a", ran, gate), results, "a")]
    wait_running()
    with pytest.raises(OverloadedError, match="tenant 'one' has 1 lookups queued or running, its max_in_flight"):
        scheduler.run(one, 30, [("t", 1)], work("b", ran), Call())
    for i in range(8):  # max_queued
        threads.append(submit(scheduler, LOW, 30, work(f"q{i}", ran), results, f"q{i}"))
        wait_queued(scheduler, i + 1)
    with pytest.raises(OverloadedError, match="8 lookups are queued, scheduler.max_queued"):
        scheduler.run(LOW, 30, [("t", 1)], work("c", ran), Call())
    gate.set()
    for t in threads:
        t.join(10)
    assert "b" not in ran and "c" not in ran and len(ran) == 9
    assert ("one", "refused_in_flight") in scheduler.outcomes and ("low", "refused_queue_full") in scheduler.outcomes


def test_a_call_that_ends_while_queued_leaves_the_queue(scheduler):
    gate, ran, results, call = threading.Event(), [], {}, Call()
    threads = [submit(scheduler, LOW, 30, work("blocker", ran, gate), results, "blocker"),
               submit(scheduler, LOW, 30, work("gone", ran), results, "gone", call)]
    wait_queued(scheduler, 1)
    call.end()  # the client cancelled it
    wait_running()
    gate.set()
    for t in threads:
        t.join(10)
    assert ran == ["blocker"] and isinstance(results["gone"], DeadlineExceededError)
    assert ("low", "cancelled") in scheduler.outcomes


def test_the_cost_model_learns_per_tier_costs_and_table_mixes():
    model, rng = CostModel(), np.random.default_rng(0)
    truth = np.array([1e-4, 2e-8, 8e-8, 2e-6])
    for _ in range(256):
        rows = rng.integers(0, 5000, 3).astype(float)
        model.observe({"t": rows}, float(truth @ np.r_[1.0, rows]))
    np.testing.assert_allclose(model.coef, truth, rtol=1e-6)
    model.observe({"u": np.array([0.0, 100.0, 300.0])}, 0.001)
    np.testing.assert_allclose(model.rows([("u", 40)]), [0, 10, 30])
    np.testing.assert_allclose(model.rows([("never", 7)]), [7, 0, 0])  # a table not seen yet: DRAM


def test_without_scheduling_lookups_run_at_once_and_are_only_counted():
    outcomes = []
    s = Scheduler(SchedulerConfig(enabled=False), lambda tenant, outcome, q, t: outcomes.append(outcome))
    ran = []
    assert s.run(LOW, 5, [("t", 1)], work("a", ran), Call()) == "a"

    def slow():
        time.sleep(0.05)
        return "b", {}
    assert s.run(LOW, 0.01, [("t", 1)], slow, Call()) == "b"
    s.stop()
    assert outcomes == ["met", "missed"]
