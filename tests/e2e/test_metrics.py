"""The /metrics endpoint of a real daemon parses, its counters move by
exactly what the test did (health checks under the health service's name),
and a table's series go with the table (dropped, or not restored)."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support import running_daemon

HEALTH_CHECK = "grpc.health.v1.Health/Check"


def scrape(daemon) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_by_what_was_done(daemon):
    with Client(daemon.target) as c:
        info = c.create_table("m", 200_000, 16)  # 2 MiB DRAM = 32768 rows, CXL the next 32768, SCM the rest
        dram, cxl = info.rows_by_tier["dram"], info.rows_by_tier["cxl"]
        before = scrape(daemon)
        ids = np.array([0, 1, dram, dram + 1, dram + 2, dram + cxl + 5])  # 2 DRAM, 3 CXL, 1 SCM rows
        for _ in range(3):
            c.lookup("m", ids)
        c.lookup_pooled({"m": (ids, np.array([4, 2], np.int32))})
        with pytest.raises(EmbtierClientError):
            c.lookup("missing", ids)
        after = scrape(daemon)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("embtier_requests_total", method="Lookup", code="OK") == 3
    assert delta("embtier_requests_total", method="Lookup", code="NOT_FOUND") == 1
    assert delta("embtier_requests_total", method="LookupPooled", code="OK") == 1
    assert delta("embtier_request_duration_seconds_count", method="Lookup") == 4
    assert delta("embtier_rows_served_total", table="m", tier="dram") == 4 * 2
    assert delta("embtier_rows_served_total", table="m", tier="cxl") == 4 * 3
    assert delta("embtier_rows_served_total", table="m", tier="scm") == 4 * 1
    assert delta("embtier_gathered_bytes_total", method="Lookup") == 3 * 6 * 64
    assert delta("embtier_wire_bytes_total", method="Lookup") == 3 * 6 * 64
    assert delta("embtier_wire_bytes_total", method="LookupPooled") == 2 * 64  # two pooled vectors: the saving
    assert value(after, "embtier_table_rows", table="m", tier="scm") == 200_000 - dram - cxl
    assert value(after, "embtier_tier_capacity_bytes", tier="dram") == 2 << 20
    assert value(after, "embtier_tier_emulated", tier="cxl") == 1
    assert value(after, "embtier_process_resident_memory_bytes") > 10 << 20
    assert value(after, "embtier_system_memory_available_bytes") > 0
    assert any(name == "embtier_build_info" for name, _ in after)


def test_health_checks_are_counted_under_the_health_service(daemon):
    before = scrape(daemon)
    with grpc.insecure_channel(daemon.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "embtier.v1.EmbeddingStore", ""):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(daemon)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("embtier_requests_total", method=HEALTH_CHECK, code="OK") == 3
    assert delta("embtier_requests_total", method=HEALTH_CHECK, code="NOT_FOUND") == 1
    assert delta("embtier_request_duration_seconds_count", method=HEALTH_CHECK) == 4
    assert not [labels for name, labels in after if ("method", "Check") in labels]


def table_series(samples, table: str) -> set[str]:
    """The names of the samples with label table=table."""
    return {name for name, labels in samples if ("table", table) in labels}


def wait_for_series(daemon, table: str, names: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not names <= table_series(scrape(daemon), table):
        assert time.monotonic() < deadline, f"{table}: {table_series(scrape(daemon), table)} lacks some of {names}"
        time.sleep(0.1)


COUNTED = {"embtier_rows_served_total", "embtier_migration_backlog_rows", "embtier_fabric_port_moved_rows_total",
           "embtier_fabric_port_balance_ratio"}  # made as the daemon serves and tiers (not at scrape time)
SCRAPED = {"embtier_table_rows", "embtier_table_metadata_bytes"}  # read from the store when scraped


def test_series_of_a_dropped_or_not_restored_table_are_gone(tmp_path):
    config = "[tiering]\nenabled = true\ninterval_seconds = 0.2\n"
    with running_daemon(tmp_path / "s", config) as d, Client(d.target) as c:
        for table in ("keep", "gone"):
            c.create_table(table, 50_000, 16)  # rows in DRAM, CXL and SCM
            c.lookup(table, np.arange(0, 50_000, 7))
            wait_for_series(d, table, COUNTED | SCRAPED)
        saved = c.checkpoint("full")
        c.drop_table("gone")
        assert table_series(scrape(d), "gone") == set()
        c.create_table("later", 1000, 8)
        c.lookup("later", np.arange(1000))
        wait_for_series(d, "later", COUNTED | SCRAPED)
        c.lookup("keep", np.arange(10))
        restored, _ = c.restore(saved.id)
        assert set(restored.tables) == {"keep", "gone"}  # the checkpoint had both
        samples = scrape(d)
        assert table_series(samples, "later") == set()
        c.drop_table("gone")  # back from the checkpoint; gone again
        time.sleep(1.0)  # five tiering intervals: nothing brings them back
        samples = scrape(d)
        assert table_series(samples, "gone") == set() and table_series(samples, "later") == set()
        assert COUNTED | SCRAPED <= table_series(samples, "keep")  # the tables kept keep theirs
