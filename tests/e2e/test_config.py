"""The configuration as a real embtierd process meets it: with no file it runs on the defaults, and a bad
key, value or CXL node stops it with exit code 2 and one line naming the key and the value, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
from embtierd import config
from embtierd.topology import discover

from tests.support import daemon_args


def run_daemon(tmp_path, config_text: str) -> subprocess.CompletedProcess:
    """embtierd on config_text (and the small tiers of the e2e tests), to its exit."""
    path = tmp_path / "embtierd.toml"
    path.write_text(config_text)
    args, *_ = daemon_args(tmp_path / "state", config=path)
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


CPU_NODE = discover().cpu_nodes[0]
MISSING_NODE = max(n.id for n in discover().nodes) + 1  # no node of this host has this id


@pytest.mark.parametrize("config_text, line", [
    ("[kernels]\nkernel_thread = 2\n", "kernels: unknown key(s) kernel_thread; known: heat_sample_shift, "),
    ('[tiering]\nbandwidth = "fast"\n', "tiering.bandwidth: cannot read 'fast' as a size"),
    ("[tiering]\ninterval_seconds = 0\n", "tiering.interval_seconds: expected a number in [0.01, 3600], got 0"),
    ("[tiering.tables.users]\ndram = true\n", "tiering.tables.users.dram: expected a size, got True"),
    ('[tiering.tables.users]\npolicy = "mru"\n', "tiering.tables.users.policy: expected one of lfu, lru, got 'mru'"),
    ('[server.tls]\ncert = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"\n',
     "server.tls.cert: /nonexistent/cert.pem does not exist"),
    (f"[tiers.cxl]\nnode = {MISSING_NODE}\n",
     f"tiers.cxl.node = {MISSING_NODE}: NUMA node {MISSING_NODE} does not exist on this host"),
    (f"[tiers.cxl]\nnode = [{CPU_NODE}]\n", f"tiers.cxl.node = {CPU_NODE}: NUMA node {CPU_NODE} has CPUs"),
], ids=["unknown key", "bad size", "out of range", "wrong type in a table's settings",
        "bad choice in a table's settings", "missing TLS file", "CXL node not on this host", "CXL node with CPUs"])
def test_a_bad_configuration_stops_the_daemon_with_one_line(tmp_path, config_text, line):
    done = run_daemon(tmp_path, config_text)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR embtierd: ") and line in lines[0], done.stderr


def test_print_config_without_a_file_is_the_default_configuration(tmp_path):
    """Every key at its default (the unit tests pin those to the ones the daemon always had); the tier
    capacities are shares of the memory available when each is read, so they are compared apart."""
    done = subprocess.run([sys.executable, "-m", "embtierd", "--print-config"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=True)
    printed = json.loads(done.stdout)
    expected = json.loads(json.dumps(asdict(config.load()), default=str))
    for tier in ("dram", "cxl"):
        assert printed[tier].pop("capacity_bytes") == pytest.approx(expected[tier].pop("capacity_bytes"), rel=0.05)
    assert printed == expected
