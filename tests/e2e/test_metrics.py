"""The /metrics endpoint of a real daemon parses, and its counters move by
exactly what the test did."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from prometheus_client.parser import text_string_to_metric_families


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
