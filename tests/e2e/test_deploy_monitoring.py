"""deploy/prometheus and deploy/grafana as shipped, against a real Prometheus.

promtool checks the scrape configuration and the rules and runs the rules' unit tests.  Then a
Prometheus on loopback, on the shipped prometheus.yml (target address and intervals rewritten) and
the shipped rules, scrapes a real daemon while the load generator and a side client drive it, and
every dashboard panel's expression and every recording rule is evaluated through the HTTP API: each
must return data in a sane range.  There is no Grafana binary here, so the dashboard's structure is
checked against what Grafana requires of a dashboard JSON model."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from embtier_tools.loadgen import LoadGenerator, Workload

from tests.support import free_port, running_daemon

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "embtier-dashboard.json"
SHIPPED_TARGET = "127.0.0.1:9464"

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus and promtool are not installed (Debian package prometheus; .ci/run installs it)")

INF = math.inf


@dataclass(frozen=True)
class Sane:
    """The range every value must lie in; positive: some value must be > 0 (the load drove it)."""

    low: float = 0.0
    high: float = INF
    positive: bool = True


RATIO = Sane(0.0, 1.0)
SECONDS = Sane(0.0, 10.0)  # the largest finite bucket of the daemon's histograms
PANELS = {
    "Requests/s by method": Sane(),
    "Errors/s by method and code": Sane(),
    "Latency p50 / p99 by method": SECONDS,
    "Tier used vs capacity": Sane(),
    "Rows per tier": Sane(),
    "Rows served/s by tier": Sane(),
    "Hit ratio per tier": RATIO,
    "Hit ratio per table and tier": RATIO,
    "Migrations/s by direction": Sane(),
    "Bytes migrated/s": Sane(),
    "Migration backlog by table": Sane(positive=False),
    "Bytes on the wire vs bytes gathered": Sane(),
    "Share of gathered bytes kept off the wire": RATIO,
    "WAL fsync p99": SECONDS,
    "WAL bytes/s": Sane(),
    "Time since last checkpoint": Sane(0.0, 3600.0, positive=False),
    "Resident memory": Sane(),
    "Available memory": Sane(),
    "Fabric bytes/s by offload and link": Sane(),
    "Modelled fabric transfer p99 (modelled, not measured)": SECONDS,
    "Live ids by managed table": Sane(),
    "Key evictions/s by table": Sane(),
    "Unknown ids/s by table": Sane(),
    "Key map bytes per live id": Sane(0.0, 64.0),
    "Lookups/s by tenant and outcome": Sane(),
    "SLO attainment by tenant": RATIO,
    "Queue time p99 by tenant": SECONDS,
    "Service time p99 by tenant": SECONDS,
    "SCM read errors/s by table": Sane(positive=False),
    "Calls refused for their role/s by method": Sane(),
}
RECORDING_RULES = {
    "embtier:rows_served:rate5m": Sane(),
    "embtier:tier_hit_ratio:rate5m": RATIO,
    "embtier:requests:rate5m": Sane(),
    "embtier:request_duration_seconds:p99_rate5m": SECONDS,
    "embtier:pooling_saved_bytes:rate5m": Sane(),
    "embtier:pooling_saved_ratio:rate5m": RATIO,
    "embtier:migrations:rate5m": Sane(),
    "embtier:tier_used_ratio": RATIO,
    "embtier:wal_fsync_duration_seconds:p99_rate5m": SECONDS,
    "embtier:tenant_slo_attainment:ratio_rate5m": RATIO,
}
ROWS = ("Traffic", "Tiers", "Tiering", "Pooled path", "Durability", "Process", "Fabric (PIFS emulation)",
        "Keys (managed tables)", "Tenants (real-time serving)", "Faults and access")
MANAGED_ROWS = 2000  # the managed table "query": side traffic writes new ids past its capacity


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120,
                          check=False)


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


# ---- the files on their own ------------------------------------------------------------------------


@needs_prometheus
@pytest.mark.parametrize("args", [("check", "config", "prometheus.yml"), ("check", "rules", "embtier-rules.yml"),
                                  ("test", "rules", "embtier-rules.test.yml")], ids=" ".join)
def test_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_where_it_fires():
    alerts = re.findall(r"^\s*- alert: (\S+)$", (PROMETHEUS_DIR / "embtier-rules.yml").read_text(), re.MULTILINE)
    tests = (PROMETHEUS_DIR / "embtier-rules.test.yml").read_text()
    firing = set(re.findall(r"alertname: (\S+)\n\s+exp_alerts:\n\s+- exp_labels:", tests))
    silent = set(re.findall(r"alertname: (\S+)\n\s+exp_alerts: \[\]", tests))
    assert len(alerts) >= 7 and firing == silent == set(alerts)


def test_dashboard_has_what_grafana_requires():
    dashboard = json.loads(DASHBOARD.read_text())
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"]) and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["instance"]["type"] == "query" and variables["instance"]["multi"]
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all(isinstance(p["id"], int) for p in panels)
    assert [p["title"] for p in panels if p["type"] == "row"] == list(ROWS)
    occupied: set[tuple[int, int]] = set()
    for p in panels:
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy") and grid["x"] + grid["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
    assert panels[0]["type"] == "row" and panels[0]["gridPos"]["y"] == 0  # every panel sits under a row
    for p in dashboard_panels():
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"] and "$instance" in t["expr"], f"panel {p['title']!r} does not follow $instance"
    assert sorted(p["title"] for p in dashboard_panels()) == sorted(PANELS)


# ---- a real Prometheus scraping a real daemon under load ---------------------------------------------


@dataclass
class Scraped:
    url: str
    daemon: object
    at: float         # evaluation time: after the last scrape and rule evaluation that saw the load
    window: str       # a range covering the whole run, for $__rate_interval

    def query(self, expr: str) -> list[dict]:
        params = urllib.parse.urlencode({"query": expr, "time": f"{self.at:.3f}"})
        reply = get_json(f"{self.url}/api/v1/query?{params}")
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.load(reply)


def start_prometheus(directory: Path, target: str) -> tuple[subprocess.Popen, str]:
    """Prometheus on loopback: the shipped prometheus.yml scraping target every second, the shipped rules."""
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert config.count(f"- {SHIPPED_TARGET}") == 1 and config.count("interval: 15s") == 2
    config = config.replace(f"- {SHIPPED_TARGET}", f"- {target}").replace("interval: 15s", "interval: 1s")
    (directory / "prometheus.yml").write_text(config)
    shutil.copy(PROMETHEUS_DIR / "embtier-rules.yml", directory)
    address = f"127.0.0.1:{free_port()}"
    with open(directory / "prometheus.log", "w") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={directory / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address={address}"],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{address}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"prometheus did not become ready:\n{(directory / 'prometheus.log').read_text()}")


def side_traffic(target: str, tcp: str, stop: threading.Event, failures: list[BaseException]) -> None:
    """Raw lookups, writes (the log), a checkpoint and requests that fail, alongside the pooled load;
    new raw ids into the managed table "query" (more than it holds: once its protection epochs pass,
    it evicts) and lookups of them and of ids it never saw; writes over plaintext TCP, which an
    anonymous peer (a reader) may not make."""
    ids = np.arange(0, 60_000, 7, dtype=np.int64)
    rng = np.random.default_rng(5)
    try:
        with Client(target, timeout=60) as c, Client(tcp, timeout=60) as anonymous:
            c.checkpoint()
            while not stop.wait(0.3):
                with pytest.raises(EmbtierClientError) as refused:
                    anonymous.write_rows("item", ids[:4], np.ones((4, 16), np.float32))
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, refused.value
                c.lookup("user", ids)
                c.write_rows("item", ids[:64], np.ones((64, 16), np.float32), add=True, scale=0.01)
                raw = rng.integers(-2**63, 2**63 - 1, 300, dtype=np.int64, endpoint=True)
                c.write_rows("query", raw, np.ones((raw.size, 16), np.float32))
                _, unknown = c.lookup_counted("query", np.concatenate([raw, raw + 1]))
                assert unknown >= raw.size  # (raw + 1 were never written, short of a 1-in-2^55 chance)
                for bad in (lambda: c.lookup("missing", ids), lambda: c.lookup("user", np.array([10**9]))):
                    with pytest.raises(EmbtierClientError):
                        bad()
    except BaseException as e:  # noqa: BLE001 - handed to the fixture, which fails with it
        failures.append(e)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    root = tmp_path_factory.mktemp("monitoring")
    tables = {"user": 60_000, "item": 30_000}
    config = "[tiering]\nenabled = true\ninterval_seconds = 0.5\n"
    with running_daemon(root / "embtierd", config) as daemon:  # tiers of 2 MiB: most rows on SCM
        prometheus, url = start_prometheus(root, daemon.metrics)
        try:
            started = time.time()
            with Client(daemon.target) as c:
                for name, rows in tables.items():
                    c.create_table(name, rows, 16, initializer="uniform", seed=len(name),
                                   dram_capacity_bytes=1 << 20, cxl_capacity_bytes=1 << 20)
                c.create_table("query", MANAGED_ROWS, 16, key_space="managed", default_value=0.5)
            stop, failures = threading.Event(), []
            side = threading.Thread(target=side_traffic, args=(daemon.target, daemon.tcp, stop, failures))
            side.start()
            try:
                for seed in (0, 100):  # the hot set moves half-way: the tiering engine keeps moving rows
                    workload = Workload(tables, bags=64, pooling_factor=16, batches=4, seed=seed)
                    stats = LoadGenerator(daemon.target, workload, concurrency=2).run(4)
                    assert stats.requests > 0 and stats.errors == 0
            finally:
                stop.set()
                side.join(timeout=60)
            assert failures == []
            loaded = time.time()
            at = wait_for_evaluation_after(url, loaded)
            yield Scraped(url, daemon, at, f"{math.ceil(at - started) + 5}s")
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)


def wait_for_evaluation_after(url: str, moment: float, timeout: float = 30) -> float:
    """Waits until Prometheus has evaluated the rules on a scrape taken after moment; returns the time then."""
    params = urllib.parse.urlencode({"query": f"min(timestamp(embtier:requests:rate5m)) > {moment + 1:.3f}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get_json(f"{url}/api/v1/query?{params}")["data"]["result"]:
            return time.time()
        time.sleep(0.5)
    raise TimeoutError(f"prometheus evaluated no rule on a scrape after the load within {timeout} s")


def check_values(what: str, result: list[dict], sane: Sane) -> None:
    assert result, f"{what}: the query returned nothing"
    values = [float(r["value"][1]) for r in result]
    finite = [v for v in values if not math.isnan(v)]  # NaN: a method idle over the whole window (0 / 0)
    assert finite, f"{what}: every series is NaN: {result}"
    assert all(sane.low <= v <= sane.high for v in finite), f"{what}: outside [{sane.low}, {sane.high}]: {result}"
    assert not sane.positive or max(finite) > 0, f"{what}: no value > 0 although the load ran: {result}"


@needs_prometheus
def test_every_dashboard_panel_returns_data(scraped):
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", scraped.window).replace("$instance",
                                                                                      scraped.daemon.metrics)
            assert "$" not in expr, f"panel {panel['title']!r}: a dashboard variable the test does not know"
            check_values(f"panel {panel['title']!r} ({target['refId']}: {expr})", scraped.query(expr),
                         PANELS[panel["title"]])


@needs_prometheus
def test_every_recording_rule_returns_data(scraped):
    groups = get_json(f"{scraped.url}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules if r["type"] == "recording"} == set(RECORDING_RULES)
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    for name, sane in RECORDING_RULES.items():
        check_values(f"rule {name}", scraped.query(name), sane)
    per_table: dict[str, float] = {}
    for r in scraped.query("embtier:tier_hit_ratio:rate5m"):
        per_table[r["metric"]["table"]] = per_table.get(r["metric"]["table"], 0.0) + float(r["value"][1])
    assert sorted(per_table) == ["item", "query", "user"] and all(math.isclose(s, 1.0) for s in per_table.values())


@needs_prometheus
def test_instance_variable_lists_the_daemon(scraped):
    query = json.loads(DASHBOARD.read_text())["templating"]["list"][1]["query"]["query"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", query).groups()
    params = urllib.parse.urlencode({"match[]": metric})
    assert get_json(f"{scraped.url}/api/v1/label/{label}/values?{params}")["data"] == [scraped.daemon.metrics]


@needs_prometheus
def test_stopped_daemon_raises_the_down_alert(scraped):
    """Last, as it stops the daemon: the alert's job and the scrape job agree, so up == 0 matches."""
    assert scraped.daemon.stop() == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alerts = get_json(f"{scraped.url}/api/v1/alerts")["data"]["alerts"]
        down = [a for a in alerts if a["labels"]["alertname"] == "EmbtierDown"]
        if down:
            assert down[0]["labels"]["instance"] == scraped.daemon.metrics and down[0]["state"] == "pending"
            return
        time.sleep(0.5)
    pytest.fail("EmbtierDown did not appear within 30 s of the daemon stopping")
