"""The shipped XRBench scenarios (deploy/scenarios/) against a real daemon, a few seconds each, two
streams: the report has every tenant, over both streams, and numbers that add up.  The daemon's configuration holds the scenario's
tenants when this daemon knows [tenants] (a daemon without them serves the requests FIFO and does
not read the metadata).  That the requests carried their tenant is not checked here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from embtier import Client
from embtier_tools import xrbench
from embtierd import config

from tests.support import run_cli, start_daemon

SCENARIOS = Path(__file__).resolve().parents[2] / "deploy" / "scenarios"
DURATION_SECONDS = 3.0
STREAMS = 2
KNOWS_TENANTS = any(name.startswith("tenants.") for name in config.key_names())


@pytest.fixture(scope="module", params=["social_interaction", "outdoor_activity", "ar_gaming"])
def scenario_daemon(request, tmp_path_factory):
    """(the scenario, a daemon configured for it, with room in DRAM for its tables)."""
    scenario = xrbench.load_scenario(SCENARIOS / f"{request.param}.toml")
    state = tmp_path_factory.mktemp(request.param)
    config_path = state / "embtierd.toml"
    config_path.write_text("[tiering]\nenabled = false\n\n" + (xrbench.daemon_config(scenario) if KNOWS_TENANTS else ""))
    daemon = start_daemon(state / "state", "--dram-bytes", "96M", "--cxl-bytes", "32M", config=config_path)
    yield scenario, daemon
    assert daemon.stop() == 0, daemon.log()


def test_a_scenario_run_reports_every_tenant(scenario_daemon):
    scenario, daemon = scenario_daemon
    with Client(daemon.target) as client:
        rows = xrbench.ensure_tables(client, scenario)
        assert rows == {t.name: t.rows for t in scenario.tables.values()}
        assert xrbench.ensure_tables(client, scenario) == rows  # they exist now: kept
    report = xrbench.run_scenario(daemon.target, scenario, rows, streams=STREAMS, duration_seconds=DURATION_SECONDS)
    assert [t.name for t in report.tenants] == list(scenario.models)
    assert report.mode == scenario.mode and 0 <= report.score <= 100 and report.streams == STREAMS
    for t in report.tenants:
        model = scenario.models[t.name]
        expected = STREAMS * model.fps * DURATION_SECONDS * (model.probability if model.after else 1.0)
        assert abs(t.frames - expected) <= STREAMS, t
        assert t.requests + t.dropped == t.frames and t.requests >= 1, t
        assert t.deadline_met + sum(t.errors.values()) <= t.requests, t
        assert t.deadline_met >= 1 and 0 < t.p50_ms <= t.p99_ms < 1000 * model.deadline_seconds + 50, t
        assert 0 <= t.mean_rt <= 1 and t.qoe == 1 - t.frame_drop_rate and 0 <= t.score <= t.qoe, t
    assert report.score == pytest.approx(100 * sum(t.score for t in report.tenants) / len(report.tenants))
    assert not math.isnan(report.score)
    assert len(report.stream_scores) == STREAMS and all(0 <= x <= 100 for x in report.stream_scores)
    assert report.elapsed_seconds >= DURATION_SECONDS - 1 / max(m.fps for m in scenario.models.values())
    assert 0 < report.generator_cpu_share < 1


@pytest.mark.parametrize("scenario_daemon", ["ar_gaming"], indirect=True)
def test_the_command_line_prints_the_report(scenario_daemon, tmp_path):
    scenario, daemon = scenario_daemon
    path = str(SCENARIOS / "ar_gaming.toml")
    out = run_cli(daemon.target, "bench", "--scenario", path, "--duration", "0.5", "--streams", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("scenario ar_gaming (concurrent), 2 streams: 180.0 requests/s offered (90.0 a stream)")
    assert [line.split()[0] for line in lines[2:5]] == list(scenario.models)
    assert lines[-3].startswith("per-stream score: ") and lines[-3].endswith("over 2 streams")
    assert lines[-2].startswith("load generator (this process): ")
    assert lines[-1].startswith("score ")
    capacity = run_cli(daemon.target, "bench", "--scenario", path, "--capacity", "--duration", "0.3",
                       "--concurrency", "2")
    assert capacity.returncode == 0, capacity.stderr
    assert "requests/s closed-loop with 2 clients" in capacity.stdout and "streams of the scenario" in capacity.stdout
    loaded = run_cli(daemon.target, "bench", "--scenario", path, "--duration", "0.3", "--load", "0.5")
    assert loaded.returncode == 0, loaded.stderr
    first, chosen, head = loaded.stdout.splitlines()[:3]
    streams = int(chosen.split()[3])
    assert first.startswith("capacity of scenario ar_gaming: ") and chosen.startswith("load 0.5 = ")
    assert head.startswith(f"scenario ar_gaming (concurrent), {streams} stream")
    both = run_cli(daemon.target, "bench", "--scenario", path, "--streams", "2", "--load", "1")
    assert both.returncode == 1 and "give --streams or --load, not both" in both.stderr
    bad = run_cli(daemon.target, "bench", "--scenario", str(tmp_path / "none.toml"))
    assert bad.returncode == 1 and "none.toml: cannot read it" in bad.stderr
