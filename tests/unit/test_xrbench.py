"""XRBench scenarios (embtier_tools.xrbench): the score against values computed by hand from the
formulas of XRBench's reference implementation, the scenario files and their errors, and the driver's
schedule (streams and their clock offsets, release times, frame choice, one request in flight per
stream and model, cascades within a stream, drops) with fake senders in place of the daemon."""

from __future__ import annotations

import itertools
import math
import threading
import time
import tomllib
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from embtier_tools import xrbench
from embtier_tools.xrbench import DROPPED, Frame, FrameResult

SCENARIOS = Path(__file__).resolve().parents[2] / "deploy" / "scenarios"

# ---- the score ----------------------------------------------------------------------------------


def test_realtime_score_is_the_sigmoid_of_the_delay_in_ms():
    deadline = np.full(5, 1.0)
    finish = np.array([1.0, 1.0 - 1e-4, 1.0 + 1e-3, 0.5, np.inf])  # on time, 0.1 ms early, 1 ms late, 500 ms early, failed
    rt = xrbench.realtime_scores(finish, deadline)
    expected = [0.5, 1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(15)), 1.0, 0.0]
    np.testing.assert_allclose(rt, expected, rtol=1e-9, atol=1e-12)
    assert rt[1] == pytest.approx(0.8175744762)
    assert rt[2] == pytest.approx(3.059e-7, rel=1e-3)


def test_realtime_score_k_is_a_parameter():
    assert xrbench.realtime_scores(np.array([1.001]), np.array([1.0]), k_per_ms=1.0)[0] == \
        pytest.approx(1 / (1 + math.e))


def test_model_score_counts_dropped_frames_twice():
    # 3 requests sent (RT 1, 0.5, 0) and 1 frame dropped: 4 frames, QoE 3/4
    assert xrbench.frame_drop_rate(1, 4) == 0.25
    assert xrbench.qoe_score(1, 4) == 0.75
    assert xrbench.model_score(np.array([1.0, 0.5, 0.0]), dropped=1) == pytest.approx(1.5 / 4 * 0.75)
    assert xrbench.model_score(np.ones(10), dropped=0) == 1.0


def test_a_model_without_frames_scores_zero():
    assert xrbench.frame_drop_rate(0, 0) == 1.0
    assert xrbench.model_score(np.array([]), dropped=0) == 0.0


def test_scenario_score_is_100_times_the_mean():
    assert xrbench.scenario_score([1.0, 0.5]) == 75.0
    # XRBench-MLSys2023's published VR-gaming summary: per model RT, EN, QoE -> overall 86.466141
    per_model = [1.0 * 0.976447 * 1.0, 1.0 * 0.976719 * 1.0, 0.743658 * 0.861711 * 1.0]
    assert xrbench.scenario_score(per_model) == pytest.approx(86.466141, abs=1e-4)


def test_tenant_report_from_frame_results():
    results = [
        FrameResult(0, 0, 0.0, 0.010, 0.000, 0.002, "OK"),                   # 8 ms early: RT 1
        FrameResult(0, 1, 0.010, 0.020, 0.010, 0.021, "OK"),                 # 1 ms late: a miss, RT ~3e-7
        FrameResult(0, 2, 0.020, 0.030, 0.020, 0.020, "DEADLINE_EXCEEDED"),  # refused: a miss, RT 0
        FrameResult(0, 3, 0.030, 0.040, math.nan, math.nan, DROPPED),
    ]
    t = xrbench.tenant_report("m", 100.0, results)
    assert (t.frames, t.requests, t.dropped, t.deadline_met) == (4, 3, 1, 1)
    assert t.errors == {"DEADLINE_EXCEEDED": 1}
    assert t.deadline_met_fraction == pytest.approx(1 / 3)
    assert t.frame_drop_rate == 0.25 and t.qoe == 0.75
    rt = [1 / (1 + math.exp(-15 * 8)), 1 / (1 + math.exp(15)), 0.0]
    assert t.mean_rt == pytest.approx(sum(rt) / 3)
    assert t.score == pytest.approx(sum(rt) / 4 * 0.75)
    assert (t.p50_ms, t.p99_ms) == (pytest.approx(6.5), pytest.approx(10.91))  # of the two answered OK
    assert xrbench.results_score(results) == pytest.approx(t.score)


def test_a_report_over_streams_scores_tenants_over_all_their_frames_and_each_stream_alone():
    s = scenario(after_probability=None)
    ok = [FrameResult(stream, i, 0.0, 0.010, 0.0, 0.001, "OK") for stream in (0, 1) for i in range(2)]
    results = {"up": ok, "down": ok,
               "side": [*ok[:2], FrameResult(1, 0, 0.0, 0.01, math.nan, math.nan, DROPPED),
                        FrameResult(1, 1, 0.0, 0.01, 0.0, 0.002, "DEADLINE_EXCEEDED")]}
    report = xrbench.scenario_report(s, results, streams=2, duration_seconds=1.0, elapsed_seconds=1.0,
                                     generator_cpu_seconds=0.1)
    side = report.tenants[2]
    assert (side.name, side.frames, side.dropped, side.requests) == ("side", 4, 1, 3)
    assert side.frames_per_second == 60.0 and report.offered_rate == 2 * (60 + 60 + 30)
    assert side.score == pytest.approx(2 / 4 * 0.75)
    assert report.score == pytest.approx(100 * (1 + 1 + 0.375) / 3)  # over tenants, unchanged by streams
    assert report.stream_scores == [100.0, pytest.approx(100 * 2 / 3)]  # stream 1's side scores 0
    text = xrbench.format_report(report)
    assert text.startswith("scenario s (concurrent), 2 streams: 300.0 requests/s offered (150.0 a stream)")
    assert "per-stream score: min 66.7, median 83.3, max 100.0 over 2 streams" in text
    assert "ms CPU per request sent" in text and text.splitlines()[-1].startswith("score 79.2 / 100")


# ---- scenario files -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, mode, models", [
    ("social_interaction", "cascaded-concurrent",
     {"eye_segmentation": 60, "gaze_estimation": 60, "depth_refinement": 30, "hand_tracking": 30}),
    ("outdoor_activity", "cascaded-concurrent",
     {"keyword_detection": 3, "speech_recognition": 3, "semantic_segmentation": 10, "object_detection": 30}),
    ("ar_gaming", "concurrent", {"hand_tracking": 45, "depth_estimation": 30, "plane_detection": 15}),
])
def test_shipped_scenarios_load(name, mode, models):
    s = xrbench.load_scenario(SCENARIOS / f"{name}.toml")
    assert s.name == name and s.mode == mode
    assert {m.name: m.fps for m in s.models.values()} == models
    for m in s.models.values():
        assert m.deadline_seconds == pytest.approx(1 / m.fps)  # XRBench: due when the next frame arrives
        assert s.tenants[m.name].deadline_ms == pytest.approx(1000 / m.fps, abs=1e-3)
    rendered = tomllib.loads(xrbench.daemon_config(s))
    assert set(rendered) == {"tenants"} and set(rendered["tenants"]) == set(models)


def test_cascades_of_the_shipped_scenarios():
    social = xrbench.load_scenario(SCENARIOS / "social_interaction.toml")
    assert social.models["gaze_estimation"].after == "eye_segmentation"
    outdoor = xrbench.load_scenario(SCENARIOS / "outdoor_activity.toml")
    asr = outdoor.models["speech_recognition"]
    assert (asr.after, asr.probability) == ("keyword_detection", 0.2)
    assert outdoor.frames_per_second("speech_recognition") == pytest.approx(0.6)
    assert outdoor.offered_rate() == pytest.approx(3 + 0.6 + 10 + 30)
    assert outdoor.offered_rate(streams=3) == pytest.approx(3 * 43.6)
    assert outdoor.longest_period_seconds == pytest.approx(1 / 3)


def test_the_rendered_tenants_admit_one_request_per_stream():
    s = xrbench.load_scenario(SCENARIOS / "ar_gaming.toml")
    for streams, expected in ((1, 8), (8, 8), (40, 40)):
        tenants = tomllib.loads(xrbench.daemon_config(s, streams))["tenants"]
        assert {t["max_in_flight"] for t in tenants.values()} == {expected}


def test_the_daemon_accepts_the_rendered_tenants():
    config = pytest.importorskip("embtierd.config")
    if not any(name.startswith("tenants.") for name in config.key_names()):
        pytest.skip("this daemon has no [tenants] configuration yet")
    for path in sorted(SCENARIOS.glob("*.toml")):
        loaded = config.load(overrides=tomllib.loads(xrbench.daemon_config(xrbench.load_scenario(path))))
        assert loaded is not None


GOOD = """
[scenario]
name = "t"

[tables.t1]
rows = 100
dim = 4

[models.a]
fps = 10
tables = ["t1"]
bags = 2
ids_per_bag = 3

[models.b]
after = "a"
tables = ["t1"]
bags = 1
ids_per_bag = 1

[daemon.tenants.a]
priority = 5
deadline_ms = 100.0
max_in_flight = 2

[daemon.tenants.b]
priority = 5
deadline_ms = 100.0
max_in_flight = 2
"""


def test_a_small_file_and_its_defaults():
    s = xrbench.parse_scenario(GOOD)
    b = s.models["b"]
    assert (b.fps, b.probability, b.deadline_seconds, b.after) == (10.0, 1.0, 0.1, "a")
    assert s.tables["t1"].alpha == xrbench.DEFAULT_ALPHA and s.seed == 0 and s.mode == "cascaded"


@pytest.mark.parametrize("old, new, message", [
    ("fps = 10\n", "", "models.a.fps: is required"),
    ("fps = 10\n", 'fps = "fast"\n', "models.a.fps: must be a number > 0, got 'fast'"),
    ("fps = 10\n", "fps = -1\n", "models.a.fps: must be a number > 0"),
    ('after = "a"', 'after = "x"', "models.b.after: 'x' is not a model of this file"),
    ("fps = 10\n", 'fps = 10\nafter = "b"\n', "models.b.after: cascade loop a -> b -> a"),
    ('after = "a"\n', 'after = "a"\nfps = 30\n',
     "models.b.fps: a cascaded model runs on its upstream's frames: 30 differs from models.a.fps = 10"),
    ("fps = 10\n", "fps = 10\nprobability = 0.5\n", "models.a.probability: is for a cascaded model"),
    ('after = "a"\n', 'after = "a"\nprobability = 1.5\n', "models.b.probability: must be a number > 0 and <= 1.0"),
    ('tables = ["t1"]\nbags = 2', 'tables = ["nope"]\nbags = 2', "models.a.tables: 'nope' is not a table"),
    ('tables = ["t1"]\nbags = 2', "tables = []\nbags = 2", "models.a.tables: must be a non-empty list"),
    ("bags = 2", "bags = 0", "models.a.bags: must be an integer >= 1, got 0"),
    ("bags = 2", "bags = true", "models.a.bags: must be an integer >= 1, got True"),
    ("bags = 2", "bags = 2\ncolour = 1", "models.a: unknown key(s) colour"),
    ("dim = 4", "dim = 4.5", "tables.t1.dim: must be an integer >= 1"),
    ("rows = 100\n", "", "tables.t1.rows: is required"),
    ('name = "t"', "", "scenario.name: is required"),
    ("[daemon.tenants.b]\npriority = 5", "[daemon.tenants.c]\npriority = 5", "daemon.tenants.b: missing"),
    ("priority = 5\ndeadline_ms = 100.0\nmax_in_flight = 2\n\n[daemon.tenants.b]",
     "priority = 10\ndeadline_ms = 100.0\nmax_in_flight = 2\n\n[daemon.tenants.b]",
     "daemon.tenants.a.priority: must be an integer in 0..9, got 10"),
    ("max_in_flight = 2\n\n[daemon.tenants.b]", "max_in_flight = 0\n\n[daemon.tenants.b]",
     "daemon.tenants.a.max_in_flight: must be an integer >= 1"),
    ("[scenario]", "extra = 1\n[scenario]", "unknown top-level key(s) extra"),
    ("[models.b]", "[models.b b]", "not valid TOML"),
])
def test_bad_files_name_the_field(old, new, message):
    assert old in GOOD
    with pytest.raises(xrbench.ScenarioError) as e:
        xrbench.parse_scenario(GOOD.replace(old, new, 1), "bad.toml")
    assert str(e.value).startswith("bad.toml: ") and message in str(e.value)


def test_a_tenant_that_is_no_model():
    text = GOOD + "\n[daemon.tenants.zz]\npriority = 1\ndeadline_ms = 1.0\nmax_in_flight = 1\n"
    with pytest.raises(xrbench.ScenarioError, match="daemon.tenants.zz: no model of that name"):
        xrbench.parse_scenario(text)


def test_a_file_without_tables_or_models():
    no_tables = GOOD.replace("[tables.t1]\nrows = 100\ndim = 4\n", "")
    with pytest.raises(xrbench.ScenarioError, match=r"tables: needs at least one \[tables.NAME\] table"):
        xrbench.parse_scenario(no_tables)


def test_a_missing_file(tmp_path):
    with pytest.raises(xrbench.ScenarioError, match="missing.toml: cannot read it"):
        xrbench.load_scenario(tmp_path / "missing.toml")


# ---- the schedule -------------------------------------------------------------------------------


def test_release_times_from_an_offset():
    np.testing.assert_allclose(xrbench.release_times(60, 0.1), np.arange(6) / 60)
    np.testing.assert_allclose(xrbench.release_times(60, 0.1, 0.01), 0.01 + np.arange(6) / 60)
    assert len(xrbench.release_times(60, 0.1, 0.5)) == 6   # the duration counts from the offset
    assert len(xrbench.release_times(3, 1.0)) == 3


def test_stream_offsets_spread_over_the_longest_period():
    s = xrbench.load_scenario(SCENARIOS / "ar_gaming.toml")  # 45, 30 and 15 FPS: 1/15 s
    offsets = xrbench.stream_offsets(s, 8)
    slices = np.floor(offsets / (1 / 15) * 8)
    assert slices.tolist() == list(range(8))       # one in each eighth of the period
    assert np.all(offsets >= 0) and np.all(offsets < 1 / 15)
    np.testing.assert_array_equal(offsets, xrbench.stream_offsets(s, 8))  # seeded
    assert len(set(np.round(offsets % (1 / 15 / 8), 9))) == 8              # random within its slice
    assert 0 <= xrbench.stream_offsets(s, 1)[0] < 1 / 15
    with pytest.raises(ValueError):
        xrbench.stream_offsets(s, 0)


def test_streams_at_load_is_the_rounded_share_of_the_capacity():
    assert xrbench.streams_at_load(1.0, 9.3) == 9
    assert xrbench.streams_at_load(0.5, 9.3) == 5 and xrbench.streams_at_load(1.2, 9.3) == 11
    assert xrbench.streams_at_load(0.01, 3.0) == 1   # at least one
    with pytest.raises(ValueError):
        xrbench.streams_at_load(0.0, 3.0)


def test_triggered_takes_an_even_share_first_included():
    assert [n for n in range(15) if xrbench.triggered(n, 0.2)] == [0, 5, 10]
    assert [n for n in range(6) if xrbench.triggered(n, 0.5)] == [0, 2, 4]
    assert all(xrbench.triggered(n, 1.0) for n in range(10))
    assert sum(xrbench.triggered(n, 0.3) for n in range(1000)) == 300


def test_take_frame_drops_what_cannot_make_its_deadline():
    pending = deque([Frame(0, 0, 0.0, 1.0), Frame(0, 1, 0.5, 1.5), Frame(0, 2, 1.0, 2.0)])
    frame, expired = xrbench.take_frame(pending, now=1.5)
    assert frame == Frame(0, 2, 1.0, 2.0) and expired == [Frame(0, 0, 0.0, 1.0), Frame(0, 1, 0.5, 1.5)]
    assert not pending
    assert xrbench.take_frame(deque(), 0.0) == (None, [])


def scenario(after_probability: float | None = 1.0, fps: float = 60) -> xrbench.Scenario:
    """up (fps) -> down, cascaded with after_probability (None: not cascaded), and side (30 FPS)."""
    cascade = "" if after_probability is None else f'after = "up"\nprobability = {after_probability}\n'
    models = "".join(f"[models.{name}]\n{extra}tables = [\"t\"]\nbags = 1\nids_per_bag = 1\n\n"
                     f"[daemon.tenants.{name}]\npriority = 1\ndeadline_ms = 10.0\nmax_in_flight = 1\n\n"
                     for name, extra in (("up", f"fps = {fps}\n"), ("down", cascade or f"fps = {fps}\n"),
                                         ("side", "fps = 30\n")))
    return xrbench.parse_scenario(f'[scenario]\nname = "s"\n\n[tables.t]\nrows = 10\ndim = 1\n\n{models}')


class FakeDaemon:
    """Senders that take latency_seconds (per model) and answer as answer(model, n-th call) says; logs
    each call."""

    def __init__(self, latency_seconds: dict[str, float], answer=lambda model, n: "OK"):
        self.latency, self.answer = latency_seconds, answer
        self.calls: dict[str, list[tuple[float, float]]] = {}  # model -> (send time, timeout)
        self.lock = threading.Lock()

    def senders(self, s: xrbench.Scenario) -> dict[str, xrbench.Send]:
        def sender(name):
            def send(timeout):
                with self.lock:
                    calls = self.calls.setdefault(name, [])
                    calls.append((time.perf_counter(), timeout))
                    n = len(calls) - 1
                time.sleep(self.latency.get(name, 0.001))
                return self.answer(name, n)
            return send
        return {name: sender(name) for name in s.models}


def by_frame(results: list[FrameResult]) -> dict[tuple[int, int], FrameResult]:
    return {(r.stream, r.index): r for r in results}


def sent(results: list[FrameResult]) -> list[FrameResult]:
    return [r for r in results if r.code != DROPPED]


def test_a_cascaded_frame_is_sent_after_its_upstream_frame_finished():
    sc = scenario()
    results = xrbench.run_schedule(sc, FakeDaemon({"up": 0.004}).senders(sc), 0.5)
    up, down = by_frame(results["up"]), by_frame(results["down"])
    assert len(up) == 30 and len(results["side"]) == 15  # 60 and 30 FPS for 0.5 s
    assert sorted(down) == sorted(up)                # each up frame handed on, answered or not
    for f, r in down.items():
        assert r.release == up[f].release            # the cascade shares the frame's capture time
        assert r.deadline == pytest.approx(up[f].release + 1 / 60)
        assert r.code == DROPPED or (up[f].code == "OK" and r.issue >= up[f].finish)  # no input: dropped
    assert sum(r.code == "OK" for r in down.values()) >= 25  # 4 + 1 ms of 16.7: nearly all in time
    assert all(r.issue >= r.release for r in sent(results["up"]))


def test_a_failed_upstream_request_drops_the_cascaded_frame():
    sc = scenario()
    daemon = FakeDaemon({}, answer=lambda model, n: "RESOURCE_EXHAUSTED" if model == "up" and n % 2 else "OK")
    results = xrbench.run_schedule(sc, daemon.senders(sc), 0.3)
    up, down = by_frame(results["up"]), by_frame(results["down"])
    assert sorted(down) == sorted(up)
    for f, r in down.items():
        assert (r.code == DROPPED) == (up[f].code != "OK")
    assert len(daemon.calls["down"]) == sum(r.code == "OK" for r in up.values())


def test_a_cascade_with_probability_runs_on_every_nth_frame():
    sc = scenario(after_probability=0.2)
    results = xrbench.run_schedule(sc, FakeDaemon({}).senders(sc), 0.5)
    assert [i for _, i in sorted(by_frame(results["down"]))] == [0, 5, 10, 15, 20, 25]


def test_concurrent_models_run_on_their_own_clocks():
    sc = scenario(after_probability=None)
    results = xrbench.run_schedule(sc, FakeDaemon({"up": 0.030}).senders(sc), 0.3)
    assert len(results["down"]) == 18 and all(r.code == "OK" for r in results["down"])  # up's slowness aside


def test_a_frame_waits_for_the_previous_request_or_is_dropped():
    sc = scenario(after_probability=None)
    daemon = FakeDaemon({"up": 0.025})  # longer than the 16.7 ms between frames and deadline
    results = xrbench.run_schedule(sc, daemon.senders(sc), 0.5)
    up = results["up"]
    served = sent(up)
    assert len(up) == 30 and 0 < len(served) < 30
    assert len(daemon.calls["up"]) == len(served)
    for earlier, later in itertools.pairwise(served):
        assert later.issue >= earlier.finish               # one request in flight per tenant
    for r in up:
        if r.code == DROPPED:
            assert any(q.issue < r.deadline <= q.finish + 0.002 for q in served)  # expired behind one in flight


def test_the_timeout_is_the_time_left_to_the_deadline():
    sc = scenario(after_probability=None)
    daemon = FakeDaemon({})
    results = xrbench.run_schedule(sc, daemon.senders(sc), 0.2)
    assert len(results["side"]) == 6
    timeouts = [timeout for _, timeout in daemon.calls["side"]]
    assert all(0 < t <= 1 / 30 for t in timeouts)
    assert np.median(timeouts) > 1 / 30 - 0.002  # sent when captured: (nearly) the whole deadline left


def test_streams_run_on_offset_clocks_one_request_in_flight_per_stream_and_model():
    sc = scenario()
    offsets = [0.0, 0.003, 0.0061]
    daemon = FakeDaemon({"up": 0.008, "down": 0.002})  # up + down: 10 of their 16.7 ms
    results = xrbench.run_schedule(sc, daemon.senders(sc), 0.5, offsets)
    for name, fps in (("up", 60), ("side", 30)):
        for stream, offset in enumerate(offsets):
            mine = sorted((r for r in results[name] if r.stream == stream), key=lambda r: r.index)
            assert len(mine) == len(xrbench.release_times(fps, 0.5, offset))
            np.testing.assert_allclose([r.release for r in mine], offset + np.arange(len(mine)) / fps)
            for earlier, later in itertools.pairwise(sent(mine)):
                assert later.issue >= earlier.finish  # one in flight per (stream, model)
    # the tenant has several requests in flight at once: one per stream
    up = sent(results["up"])
    overlapping = max(sum(r.issue <= q.issue < r.finish for r in up) for q in up)
    assert overlapping == len(offsets)
    assert len(daemon.calls["up"]) == len(up) and len(daemon.calls["down"]) == len(sent(results["down"]))
    # cascades stay within their stream: each stream's down frame follows that stream's up frame
    ups, downs = by_frame(results["up"]), by_frame(results["down"])
    assert sorted(downs) == sorted(ups)
    for f, r in downs.items():
        assert r.release == ups[f].release
        assert r.code == DROPPED or (ups[f].code == "OK" and r.issue >= ups[f].finish)  # no input: dropped
    assert sum(r.code == "OK" for r in downs.values()) >= 0.9 * len(ups)


def test_a_sender_that_raises_stops_the_run():
    sc = scenario(after_probability=None)

    def broken(timeout):
        raise OSError("no channel")

    senders = {**FakeDaemon({}).senders(sc), "side": broken}
    with pytest.raises(RuntimeError, match="no channel"):
        xrbench.run_schedule(sc, senders, 0.1)
