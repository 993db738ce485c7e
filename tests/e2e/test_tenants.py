"""Tenants and the lookup queue in a real daemon: one kernel worker and lookups of a table pinned to
an emulated CXL tier whose injected latency (0.2 ms a row) makes service times the test controls,
so that a long lookup holds the worker while others queue behind it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from embtier.v1 import embtier_pb2 as pb
from embtier.v1 import embtier_pb2_grpc as pb_grpc
from embtier.wire import TENANT_METADATA_KEY
from prometheus_client.parser import text_string_to_metric_families

from tests.support import running_daemon

ROW_SECONDS = 200e-6  # the injected latency of a CXL row
CONFIG = f"""
[tiering]
enabled = false
[tiers.cxl]
emulated_latency_ns = {int(ROW_SECONDS * 1e9)}
[scheduler]
kernel_workers = 1
[tenants.low]
priority = 1
[tenants.high]
priority = 5
[tenants.one]
max_in_flight = 1
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("tenants"), CONFIG) as d:
        with Client(d.target) as c:
            c.create_table("t", 1000, 16, initializer="uniform", seed=1, pin_tier="cxl")
        yield d


def lookup(target: str, tenant: str | None, n: int, timeout: float = 10.0) -> np.ndarray:
    with Client(target, timeout=timeout, tenant=tenant, retries=0) as c:
        return c.lookup("t", np.arange(n) % 1000)


def metric(daemon, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go():
        try:
            out["result"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e
        out["at"] = time.monotonic()
    t = threading.Thread(target=go)
    t.start()
    return t, out


def test_queued_lookups_run_by_priority_then_earliest_deadline(daemon):
    plan = [("low, late", "low", 5.0), ("low, soon", "low", 3.0), ("high", "high", 8.0)]
    clients = {name: Client(daemon.target, timeout=timeout, tenant=tenant, retries=0) for name, tenant, timeout in plan}
    clients["blocker"] = Client(daemon.target, timeout=10, tenant="low", retries=0)
    for c in clients.values():  # connected beforehand: each call reaches the daemon when it is sent
        c.lookup("t", [0])
    blocker = in_thread(clients["blocker"].lookup, "t", np.arange(6000) % 1000)  # 1.2 s on the one slot
    time.sleep(0.15)
    calls = {}
    for name, _, _ in plan:  # 50 ms each: the order they end in stands out from client threads' scheduling
        calls[name] = in_thread(clients[name].lookup, "t", np.arange(250))
        time.sleep(0.05)
    for t, _ in [blocker, *calls.values()]:
        t.join(30)
    for c in clients.values():
        c.close()
    assert all("error" not in out for _, out in [blocker, *calls.values()])
    finished = sorted(calls, key=lambda name: calls[name][1]["at"])
    assert finished == ["high", "low, soon", "low, late"]
    assert blocker[1]["at"] < calls["high"][1]["at"]


def test_a_lookup_predicted_to_miss_its_deadline_is_refused_unrun(daemon):
    rng = np.random.default_rng(0)
    for n in rng.integers(20, 150, 40):  # the daemon measures what a CXL row costs
        lookup(daemon.target, "low", int(n))
    served = metric(daemon, "embtier_rows_served_total", table="t", tier="cxl")
    start = time.monotonic()
    with pytest.raises(EmbtierClientError) as err:
        lookup(daemon.target, "high", 2000, timeout=0.2)  # 0.4 s of rows
    assert time.monotonic() - start < 0.15  # refused at once, not run late
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "tenant 'high': predicted" in err.value.message and "refused before it ran" in err.value.message
    predicted = float(err.value.message.split("predicted ")[1].split(" ms")[0])
    assert 0.25 < predicted / 1e3 / (2000 * ROW_SECONDS) < 4  # the measured cost, near the injected one
    assert metric(daemon, "embtier_rows_served_total", table="t", tier="cxl") == served  # the kernels never ran it
    assert metric(daemon, "embtier_tenant_requests_total", tenant="high", outcome="refused_deadline") == 1


def test_a_tenant_over_its_in_flight_limit_is_refused(daemon):
    blocker = in_thread(lookup, daemon.target, "one", 1500)
    time.sleep(0.1)
    with pytest.raises(EmbtierClientError) as err:
        lookup(daemon.target, "one", 5)
    blocker[0].join(30)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'one' has 1 lookups queued or running, its max_in_flight" in err.value.message
    assert "error" not in blocker[1]
    lookup(daemon.target, "one", 5)  # and served once the first ended


def test_a_cancelled_lookup_leaves_the_queue_unrun(daemon):
    cancelled = metric(daemon, "embtier_tenant_requests_total", tenant="low", outcome="cancelled")
    blocker = in_thread(lookup, daemon.target, "high", 1500)
    time.sleep(0.1)
    served = metric(daemon, "embtier_rows_served_total", table="t", tier="cxl")
    with grpc.insecure_channel(daemon.target) as channel:
        call = pb_grpc.EmbeddingStoreStub(channel).Lookup.future(
            pb.LookupRequest(table="t", ids=np.arange(777, dtype="<i8").tobytes()), timeout=10,
            metadata=((TENANT_METADATA_KEY, "low"),))
        time.sleep(0.05)
        assert call.cancel()
    blocker[0].join(30)
    time.sleep(0.1)
    assert metric(daemon, "embtier_tenant_requests_total", tenant="low", outcome="cancelled") == cancelled + 1
    assert metric(daemon, "embtier_rows_served_total", table="t", tier="cxl") == served + 1500  # the blocker's only
    assert metric(daemon, "embtier_scheduler_queued") == 0


def test_an_unknown_tenant_is_invalid_argument_and_no_tenant_is_the_default(daemon):
    with pytest.raises(EmbtierClientError) as err:
        lookup(daemon.target, "nobody", 3)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata embtier-tenant = 'nobody' names no tenant; the tenants are default, high, low, one" \
        in err.value.message
    before = metric(daemon, "embtier_tenant_requests_total", tenant="default", outcome="met")
    assert lookup(daemon.target, None, 3).shape == (3, 16)
    assert metric(daemon, "embtier_tenant_requests_total", tenant="default", outcome="met") == before + 1


@pytest.mark.parametrize("section, message", [
    ("[tenants.a]\npriority = 10\n", "tenants.a.priority: expected an integer in [0, 9], got 10"),
    ("[tenants.a]\ndeadline_ms = 0\n", "tenants.a.deadline_ms: expected a number in [0.01, 3600000], got 0"),
    ('[tenants."a b"]\n', "tenants.a b: a name of 1-64 characters of [A-Za-z0-9_.-] is needed, got 'a b'"),
    ("[tenants.a]\nshare = 1\n", "tenants.a: unknown key(s) share; known: cxl, deadline_ms, dram, max_in_flight, priority, tables"),
    ("[scheduler]\nkernel_workers = 0\n", "scheduler.kernel_workers: expected an integer in [1, 256], got 0"),
    ('[tenants.a]\ntables = ["t"]\n[tenants.b]\ntables = ["t"]\n',
     "tenants.b.tables: table 't' is tenant 'a''s already (a table belongs to one tenant at most)"),
    ('[tenants.a]\ndram = "150%"\n', "tenants.a.dram"),
])
def test_a_bad_tenant_configuration_stops_the_start_naming_the_key(tmp_path, section, message):
    config = tmp_path / "embtierd.toml"
    config.write_text(section)
    run = subprocess.run([sys.executable, "-m", "embtierd", "--state-dir", str(tmp_path), "--config", str(config)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr
