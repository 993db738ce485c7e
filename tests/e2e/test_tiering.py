"""Tiering controls end to end: per-table policies over gRPC and the CLI,
recorded traces, and the sizing simulator against what a live daemon measured."""

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
from embtier_tools.loadgen import ZipfIds
from embtierd.tiering.simulate import SimConfig, simulate
from prometheus_client.parser import text_string_to_metric_families

from tests.support import run_cli, running_daemon

TIERS = ("dram", "cxl", "scm")


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return run_cli(daemon.target, *args)


def rows_served(daemon, table: str) -> np.ndarray:
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    out = np.zeros(3)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "embtier_rows_served_total" and s.labels["table"] == table:
                out[TIERS.index(s.labels["tier"])] += s.value
    return out


def metric_samples(daemon, *names: str) -> dict[str, list[tuple[dict, float]]]:
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {name: [] for name in names}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in out:
                out[s.name].append((s.labels, s.value))
    return out


def test_policy_settings_round_trip_and_bad_values(daemon):
    with Client(daemon.target) as c:
        c.create_table("pol", 20_000, 16, policy="lru", dram_capacity_bytes=64 * 1024)
        p = c.policy("pol")
        assert (p.policy, p.pin_tier, p.dram_capacity_bytes, p.cxl_capacity_bytes) == ("lru", "", 64 * 1024, -1)
        assert c.describe("pol").rows_by_tier["dram"] == 1024  # 64 KiB of 64-byte rows: its own limit
        p = c.set_policy("pol", policy="lfu", cxl_capacity_bytes=1 << 20)
        assert (p.policy, p.dram_capacity_bytes, p.cxl_capacity_bytes) == ("lfu", 64 * 1024, 1 << 20)
        p = c.set_policy("pol", pin_tier="scm", dram_capacity_bytes=-1)
        assert (p.pin_tier, p.dram_capacity_bytes) == ("scm", -1) and not p.tiering_enabled
        for kwargs, words in [({"policy": "mru"}, ["policy", "mru"]), ({"pin_tier": "disk"}, ["pin_tier", "disk"]),
                              ({"dram_capacity_bytes": -5}, ["dram_capacity_bytes", "-5"])]:
            with pytest.raises(EmbtierClientError) as err:
                c.set_policy("pol", **kwargs)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert all(w in err.value.message for w in words), err.value.message
        with pytest.raises(EmbtierClientError) as err:
            c.policy("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(EmbtierClientError) as err:
            c.create_table("pinned_big", 1_000_000, 64, pin_tier="dram")  # 256 MB into a 2 MiB DRAM tier
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in err.value.message
        assert c.policy("pol").pin_tier == "scm"  # the daemon kept serving, settings intact


def test_policy_command(daemon):
    with Client(daemon.target) as c:
        c.create_table("pol_cli", 5000, 8)
    shown = cli(daemon, "policy", "pol_cli")
    assert shown.returncode == 0 and "policy lfu" in shown.stdout and "no tier" in shown.stdout
    changed = cli(daemon, "policy", "pol_cli", "--policy", "lru", "--pin", "cxl", "--dram", "1M")
    assert changed.returncode == 0, changed.stderr
    assert "policy lru, pinned to cxl" in changed.stdout and "dram: 1.0 MiB" in changed.stdout
    with Client(daemon.target) as c:
        p = c.policy("pol_cli")
    assert (p.policy, p.pin_tier, p.dram_capacity_bytes) == ("lru", "cxl", 1 << 20)
    bad = cli(daemon, "policy", "missing")
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr


def test_record_trace_returns_the_ids_looked_up(daemon, tmp_path):
    with Client(daemon.target) as c:
        c.create_table("tr", 1000, 8)
        box = {}
        recorder = threading.Thread(target=lambda: box.setdefault("trace", c.record_trace("tr", 300, 30.0)))
        recorder.start()
        time.sleep(0.5)  # the recording starts when the daemon has the call
        sent = [np.arange(i * 100, i * 100 + 100) % 1000 for i in range(4)]
        c.lookup("tr", sent[0])
        c.lookup_pooled({"tr": (sent[1], np.array([50, 50], np.int32))})
        c.lookup("tr", sent[2])
        c.lookup("tr", sent[3])   # past max_ids: not recorded
        recorder.join(30)
        trace = box["trace"]
        np.testing.assert_array_equal(trace.ids, np.concatenate(sent[:3]))
        assert (trace.num_rows, trace.row_bytes) == (1000, 32)
        for max_ids in (0, 1 << 40):
            with pytest.raises(EmbtierClientError) as err:
                c.record_trace("tr", max_ids, 1.0)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and f"max_ids = {max_ids}" in err.value.message


def test_simulator_predicts_the_live_daemons_hit_ratios(tmp_path):
    """The benchmark's proportions (DRAM 10 % of the rows, CXL 20 %, Zipf 1.05) on a table small enough
    for CI: the simulator, replaying the trace the daemon recorded, within 0.05 of what the daemon served."""
    rows, dim = 40_960, 64          # 256-byte rows: DRAM 4096 rows = 1 MiB (the table's limit), CXL 8192 = 2 MiB
    config = '[tiering]\nenabled = true\ninterval_seconds = 0.25\nbandwidth = "1G"\n'
    with running_daemon(tmp_path / "s", config) as d, Client(d.target, timeout=120) as c:
        info = c.create_table("z", rows, dim, initializer="uniform", dram_capacity_bytes=1 << 20)
        capacity = (info.rows_by_tier["dram"], info.rows_by_tier["cxl"])
        assert capacity == (rows // 10, rows // 5)
        zipf, rng = ZipfIds(rows, 1.05, seed=3), np.random.default_rng(0)
        box = {}
        recorder = threading.Thread(target=lambda: box.setdefault("trace", c.record_trace("z", 30_000_000, 10.0)))
        recorder.start()
        time.sleep(0.5)
        sent, start, before, warm_ids = 0, time.monotonic(), None, 0
        while recorder.is_alive():
            ids = zipf.draw(rng, 128 * 32)
            c.lookup_pooled({"z": (ids, np.full(128, 32, np.int32))})
            sent += ids.size
            if before is None and time.monotonic() - start > 4:  # warm-up: 16 intervals
                before, warm_ids = rows_served(d, "z"), sent
        served = rows_served(d, "z") - before
        trace = box["trace"]
        tiering = metric_samples(d, "embtier_migrations_total", "embtier_migration_backlog_rows",
                                 "embtier_migrated_bytes_total", "embtier_tiering_interval_duration_seconds_count")
        assert sum(v for labels, v in tiering["embtier_migrations_total"] if labels["to"] == "dram") > 0
        assert [labels["table"] for labels, _ in tiering["embtier_migration_backlog_rows"]] == ["z"]
        assert tiering["embtier_migrated_bytes_total"][0][1] % 256 == 0  # whole 256-byte rows
        assert tiering["embtier_tiering_interval_duration_seconds_count"][0][1] >= 10
    per_interval = round(trace.ids.size / trace.seconds * trace.interval_seconds)
    sim = simulate(trace.ids, SimConfig(rows, capacity, per_interval,
                                        int(trace.bandwidth_bytes_per_second * trace.interval_seconds) // 256,
                                        heat_sample_shift=trace.heat_sample_shift))
    predicted = sim.hits[warm_ids // per_interval:].sum(axis=0)
    predicted = predicted / predicted.sum()
    measured = served / served.sum()
    assert abs(predicted[0] - measured[0]) <= 0.05, (predicted, measured)
    assert np.abs(predicted - measured).max() <= 0.05, (predicted, measured)


def test_simulate_command_on_a_recorded_trace(daemon, tmp_path):
    with Client(daemon.target) as c:
        c.create_table("sim_cli", 20_000, 16)
    zipf, rng = ZipfIds(20_000, 1.05, seed=1), np.random.default_rng(0)
    recorder = subprocess.Popen([sys.executable, "-m", "embtier.cli", "--target", daemon.target, "record", "sim_cli",
                                 "--ids", "200000", "--timeout", "30", "-o", str(tmp_path / "t.npy")],
                                stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    with Client(daemon.target) as c:
        for _ in range(50):
            c.lookup_pooled({"sim_cli": (zipf.draw(rng, 4000), np.full(100, 40, np.int32))})
    out, _ = recorder.communicate(timeout=60)
    assert recorder.returncode == 0 and "recorded 200000 ids" in out, out
    result = cli(daemon, "simulate", str(tmp_path / "t.npy"), "--dram", "64K", "--dram", "256K", "--cxl", "128K",
                 "--policy", "lfu", "--policy", "lru", "--granularity", "row", "--granularity", "page",
                 "--ids-per-interval", "20000", "--warmup-intervals", "3")
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["64.0"], ["256.0"])]
    assert len(lines) == 2 * 2 * 2  # two DRAM sizes x two policies x two granularities
    dram_hit = {(line[0], line[4], line[5]): float(line[6]) for line in lines}
    assert all(0 <= v <= 1 for v in dram_hit.values())
    assert dram_hit[("256.0", "lfu", "row")] > dram_hit[("64.0", "lfu", "row")]  # more DRAM, more hits


def test_simulate_command_refuses_bad_traces(tmp_path):
    (tmp_path / "text.npy").write_text("not an array")
    np.save(tmp_path / "floats.npy", np.zeros(10))
    np.save(tmp_path / "ids.npy", np.arange(100))
    for trace, words in [("text.npy", "cannot read"), ("floats.npy", "expected a 1-D array of integer ids"),
                         ("ids.npy", "--rows is needed")]:
        result = subprocess.run([sys.executable, "-m", "embtier.cli", "simulate", str(tmp_path / trace)],
                                check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and words in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "embtier.cli", "simulate", str(tmp_path / "ids.npy"), "--rows", "50",
                             "--row-bytes", "64", "--ids-per-interval", "10"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "id 99 is out of range [0, 50)" in result.stderr, result.stderr
