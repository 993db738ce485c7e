"""Process-level behaviour of embtierd: systemd notification, limits, flags."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from prometheus_client.parser import text_string_to_metric_families

from .conftest import running_daemon, start_daemon


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
