"""Process-level behaviour of embtierd: systemd notification, limits, flags."""

from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError

from .conftest import start_daemon


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
    cfg = tmp_path / "embtierd.toml"
    cfg.write_text('[server]\nmax_ids_per_request = 1000\nmax_message_bytes = "64K"\n')
    d = start_daemon(tmp_path / "s", config=cfg)
    try:
        with Client(d.target) as c:
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
    finally:
        assert d.stop() == 0


def test_print_config_shows_flags_over_defaults(tmp_path):
    out = subprocess.run([sys.executable, "-m", "embtierd", "--print-config", "--state-dir", str(tmp_path),
                          "--dram-bytes", "512M", "--listen", "unix:///tmp/x.sock"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    assert '"capacity_bytes": 536870912' in out and "unix:///tmp/x.sock" in out and str(tmp_path) in out


def test_bad_flag_value_exits_with_a_message(tmp_path):
    run = subprocess.run([sys.executable, "-m", "embtierd", "--state-dir", str(tmp_path), "--dram-bytes", "lots"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "tiers.dram.capacity: cannot read 'lots' as a size" in run.stderr
