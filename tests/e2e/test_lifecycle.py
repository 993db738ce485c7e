"""Process-level behaviour of embtierd: systemd notification, limits, flags."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from embtier import Client, EmbtierClientError
from prometheus_client.parser import text_string_to_metric_families

from tests.support import running_daemon, start_daemon


def test_systemd_notify_ready_and_stopping(tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        d = start_daemon(tmp_path / "s", env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        messages = set()
        while "READY=1" not in messages or "WATCHDOG=1" not in messages:
            messages.add(sock.recv(256).decode())
        assert d.stop() == 0, d.log()
        while "STOPPING=1" not in messages:
            messages.add(sock.recv(256).decode())


def test_over_the_limits_is_refused_before_work(tmp_path):
    limits = '[server]\nmax_ids_per_request = 1000\nmax_message_bytes = "64K"\n'
    with running_daemon(tmp_path / "s", limits) as d, Client(d.target) as c:
        c.create_table("lim", 100, 4)
        c.lookup("lim", np.zeros(1000, dtype=np.int64))
        with pytest.raises(EmbtierClientError) as err:
            c.lookup_pooled({"lim": (np.zeros(1001, dtype=np.int64), np.array([1001], np.int32))})
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1001 ids; the limit is 1000" in err.value.message
        with pytest.raises(EmbtierClientError) as err:  # 80 KB in one message: over 64K before any parsing
            c.write_rows("lim", np.arange(100), np.zeros((100, 200), np.float32))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.describe("lim").num_rows == 100


def test_print_config_shows_flags_over_defaults(tmp_path):
    out = subprocess.run([sys.executable, "-m", "embtierd", "--print-config", "--state-dir", str(tmp_path),
                          "--dram-bytes", "512M", "--listen", "unix:///tmp/x.sock"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    assert '"capacity_bytes": 536870912' in out and "unix:///tmp/x.sock" in out and str(tmp_path) in out


def test_bad_flag_value_exits_with_a_message(tmp_path):
    run = subprocess.run([sys.executable, "-m", "embtierd", "--state-dir", str(tmp_path), "--dram-bytes", "lots"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "tiers.dram.capacity: cannot read 'lots' as a size" in run.stderr


def served_from_dram(daemon) -> float:
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "embtier_rows_served_total" and s.labels["tier"] == "dram")


def test_the_daemon_moves_hot_rows_up(tmp_path):
    tiering = "[tiering]\nenabled = true\ninterval_seconds = 0.2\n\n[kernels]\nheat_sample_shift = 0\n"
    with running_daemon(tmp_path / "s", tiering) as d, Client(d.target) as c:
        info = c.create_table("hot", 100_000, 16)   # 2 MiB DRAM holds rows 0..32767
        hot = np.arange(90_000, 90_512)              # rows on SCM
        request = {"hot": (hot, np.full(16, 32, np.int32))}
        deadline = time.monotonic() + 30
        while True:
            before = served_from_dram(d)
            c.lookup_pooled(request)
            if served_from_dram(d) - before == hot.size:  # every hot row now comes from DRAM
                break
            assert time.monotonic() < deadline, "the hot rows were not moved into DRAM"
            time.sleep(0.05)
        assert c.describe("hot").rows_by_tier == info.rows_by_tier  # swapped with cold rows, not added
        np.testing.assert_array_equal(c.lookup("hot", hot), 0)      # moved rows keep their values


def _modes(state: Path) -> dict[str, int]:
    """Permission bits of the state directory and of everything the daemon keeps in it."""
    paths = [state, state / "scm.dat", state / "embtierd.sock", *(state / "wal").rglob("*"),
             *(state / "checkpoints").rglob("*"), state / "wal", state / "checkpoints"]
    return {str(p.relative_to(state.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_state_files_are_private_whatever_the_umask_and_old_ones_are_made_so(tmp_path):
    state = tmp_path / "s"
    old = os.umask(0o022)  # what a shell usually has: files 0644, directories 0755
    try:
        d = start_daemon(state)
    finally:
        os.umask(old)
    with Client(d.target) as c:
        c.create_table("p", 1000, 8, initializer="uniform", seed=1)
        c.write_rows("p", np.arange(10), np.ones((10, 8), np.float32))
        c.checkpoint("full")
    modes = _modes(state)
    socket_mode = modes.pop("s/embtierd.sock")
    assert socket_mode == 0o660  # members of the daemon's group may connect, nobody else
    assert modes["s"] == 0o700 and len(modes) > 6
    exposed = {path: oct(mode) for path, mode in modes.items() if mode & 0o077}
    assert exposed == {}, exposed
    assert d.stop() == 0, d.log()
    for path in [state, *(state / "wal").iterdir(), *(state / "checkpoints").rglob("*")]:  # as an older version left them
        path.chmod(0o755 if path.is_dir() else 0o644)
    d = start_daemon(state)
    modes = _modes(state)
    modes.pop("s/embtierd.sock")
    exposed = {path: oct(mode) for path, mode in modes.items() if mode & 0o077}
    assert exposed == {} and "made " in d.log(), exposed
    assert d.stop() == 0, d.log()


def _limits(pid: int) -> tuple[int, int]:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def _grpc_connections(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def test_piled_up_connections_leave_the_metrics_served_and_idle_ones_are_closed(tmp_path):
    """Started with a soft limit of 256 open files, the daemon raises it to the hard one; 400 silent
    connections leave /metrics served, and are closed once their handshake time is up; a client
    connection with no call is closed once idle."""
    state = tmp_path / "s"
    state.mkdir()
    config = state / "embtierd.toml"
    config.write_text("[tiering]\nenabled = false\n[server]\nhandshake_timeout_seconds = 1.0\n"
                      "idle_timeout_seconds = 1.0\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"the hard limit on open files is {hard}: too low to pile up connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the daemon inherits it
    try:
        d = start_daemon(state, config=config)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _limits(d.proc.pid) == (hard, hard) and "open file limit raised from 256" in d.log()
    host, port = d.tcp.rsplit(":", 1)
    silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(400)]
    try:
        text = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        assert "embtier_tier_capacity_bytes" in text
        with Client(d.target) as c:
            c.create_table("idle", 10, 4)
        deadline = time.monotonic() + 30
        for sock in silent:  # closed by the daemon (after its HTTP/2 settings): reads reach the end of the stream
            with contextlib.suppress(ConnectionResetError):
                while True:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    if not sock.recv(4096):
                        break
    finally:
        for sock in silent:
            sock.close()
    with Client(d.tcp) as c:
        c.describe("idle")
        assert _grpc_connections(d.proc.pid, int(port)) == 1
        deadline = time.monotonic() + 30
        while _grpc_connections(d.proc.pid, int(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _grpc_connections(d.proc.pid, int(port)) == 0  # idle for a second: closed
        assert c.describe("idle").num_rows == 10  # and the client reconnects on its next call
    assert d.stop() == 0, d.log()
