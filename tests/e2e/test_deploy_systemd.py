"""deploy/systemd as shipped, checked with systemd's own tools: the unit verifies and scores, the user
and the SCM directory are created, the sample configuration covers every key and starts a daemon,
and that daemon, traced with strace under load, asks the kernel for nothing the unit's sandbox
refuses (system calls, socket families, writable paths, writable-and-executable memory).

There is no systemd as PID 1 here, so the unit is not started by systemd itself; systemd-analyze
verify checks a copy whose ExecStart= is the venv's real embtierd instead of /opt/embtier/venv."""

from __future__ import annotations

import functools
import json
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from embtier import Client, EmbtierClientError
from embtier.client import wait_serving
from embtierd import config

from tests.support import free_port

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT = SYSTEMD / "embtierd.service"
SAMPLE = SYSTEMD / "embtierd.toml"
SHIPPED_DAEMON = "/opt/embtier/venv/bin/embtierd"
VENV_DAEMON = Path(sys.executable).with_name("embtierd")

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                            reason="systemd-analyze is not installed (Debian package systemd)")

# What `systemd-analyze security` still counts against the unit, and what the daemon needs it for.
ACCEPTED_EXPOSURES = {
    "PrivateNetwork=": "gRPC and /metrics are served over TCP",
    "RestrictAddressFamilies=~AF_(INET|INET6)": "gRPC and /metrics are served over TCP",
    "RestrictAddressFamilies=~AF_UNIX": "the gRPC Unix socket and sd_notify",
    "IPAddressDeny=": "loopback stays allowed for clients and Prometheus",
    "SystemCallFilter=~@resources": "mbind, set_mempolicy and move_pages bind the tiers to NUMA nodes",
    "ProcSubset=": "/proc/meminfo: tier sizes as a share of memory, available memory",
    "DeviceAllow=": "ProtectClock= leaves the real-time clock readable",
    "RootDirectory=/RootImage=": "the daemon runs from the host's file system",
}


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values, in order, of a unit file (sections merged: the unit's keys do not repeat across them)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120)


@needs_systemd_analyze
def test_unit_verifies_with_the_real_daemon(tmp_path):
    shipped = UNIT.read_text()
    assert shipped.count(SHIPPED_DAEMON) == 1
    copy = tmp_path / "embtierd.service"
    copy.write_text(shipped.replace(SHIPPED_DAEMON, str(VENV_DAEMON)))
    result = run("systemd-analyze", "verify", str(copy))
    # verify exits 0 on unknown keys and unparsable values, but says so: any output is a finding
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_security_exposure_is_only_what_the_daemon_needs():
    text = run("systemd-analyze", "security", "--offline=true", str(UNIT)).stdout
    score = float(re.search(r"Overall exposure level for embtierd\.service: ([0-9.]+)", text).group(1))
    checks = json.loads(run("systemd-analyze", "security", "--offline=true", "--json=short", str(UNIT)).stdout)
    exposed = {c["name"] for c in checks if c["exposure"] not in (None, "0.0")}
    assert exposed == set(ACCEPTED_EXPOSURES)
    assert score <= 1.0, text
    print(f"systemd-analyze security --offline=true: {score}")


@needs_systemd_analyze
def test_sysusers_and_tmpfiles_create_the_user_and_the_scm_directory(tmp_path):
    """Both run on a scratch root: the user lands in its etc/passwd, the directory under it."""
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package systemd)")
    for kind in ("sysusers", "tmpfiles"):
        (tmp_path / "etc" / f"{kind}.d").mkdir(parents=True)
        shutil.copy(SYSTEMD / f"embtier.{kind}.conf", tmp_path / "etc" / f"{kind}.d" / "embtier.conf")
    assert run("systemd-sysusers", f"--root={tmp_path}").returncode == 0
    assert run("systemd-tmpfiles", f"--root={tmp_path}", "--create").returncode == 0
    unit = unit_settings(UNIT.read_text())
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    user = users[unit["User"][0]]
    assert user[5] == f"/var/lib/{unit['StateDirectory'][0]}" and user[2] != "0"
    scm_dir = tmp_path / unit["ReadWritePaths"][0].lstrip("/")
    assert (scm_dir.stat().st_uid, scm_dir.stat().st_mode & 0o777) == (int(user[2]), 0o700)


def flat_keys(doc: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in doc.items():
        keys |= flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key}
    return keys


def test_sample_config_sets_every_key_and_the_unit_directories():
    sample = tomllib.loads(SAMPLE.read_text())
    assert flat_keys(sample) == flat_keys(tomllib.loads(config.DEFAULT_TOML))
    cfg = config.load(SAMPLE)
    unit = unit_settings(UNIT.read_text())
    assert unit["ExecStart"] == [f"{SHIPPED_DAEMON} --config /etc/{unit['ConfigurationDirectory'][0]}/embtierd.toml"]
    assert cfg.state_dir == Path("/var/lib") / unit["StateDirectory"][0]
    sockets = [Path(a.removeprefix("unix://")) for a in cfg.server.listen if a.startswith("unix://")]
    assert [s.parent for s in sockets] == [Path("/run") / unit["RuntimeDirectory"][0]]
    assert cfg.scm.path.parent == Path(unit["ReadWritePaths"][0])
    assert str(cfg.scm.path.parent) in unit["RequiresMountsFor"]


# ---- the daemon under strace -------------------------------------------------------------------


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls of a systemd syscall group (@name), nested groups expanded, as systemd lists them."""
    listing = run("systemd-analyze", "syscall-filter", name, check=True).stdout.splitlines()[1:]
    calls: set[str] = set()
    for item in (line.strip() for line in listing):
        if item and not item.startswith("#"):
            calls |= syscall_group(item) if item.startswith("@") else {item}
    return frozenset(calls)


def allowed_syscalls(filters: list[str]) -> set[str]:
    """SystemCallFilter= lines in order: the first (an allow list) sets the list, ~ lines remove, others add."""
    allowed: set[str] = set()
    for k, value in enumerate(filters):
        deny = value.startswith("~")
        assert not (deny and k == 0), "the unit's first SystemCallFilter= is meant to be an allow list"
        calls = set().union(*(syscall_group(n) if n.startswith("@") else {n} for n in value.lstrip("~").split()))
        allowed = allowed - calls if deny else allowed | calls
    return allowed


@needs_systemd_analyze
def test_syscall_filter_lets_numa_binding_and_async_io_through():
    allowed = allowed_syscalls(unit_settings(UNIT.read_text())["SystemCallFilter"])
    assert {"mbind", "set_mempolicy", "move_pages", "madvise", "io_setup", "io_submit", "io_getevents",
            "io_uring_setup", "io_uring_enter", "io_uring_register"} <= allowed
    assert {"mount", "setrlimit", "sched_setscheduler", "ptrace"}.isdisjoint(allowed)


TRACE_LINE = re.compile(r"^\d+ +(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)(.*)$")
WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT")
# calls that create, change or remove the paths they name; the *at ones only where the path is not
# relative to a directory descriptor (those name entries of a directory the daemon opened itself)
PATH_CALLS = {"mkdir", "rmdir", "rename", "unlink", "truncate", "link", "symlink"}
AT_CALLS = {"mkdirat", "unlinkat", "renameat", "renameat2"}


def traced(trace: str) -> tuple[set[str], set[str], set[str], list[str]]:
    """(system calls made, socket families, paths written or created, writable-or-executable remaps)."""
    calls, families, written, wx = set(), set(), set(), []
    for line in trace.splitlines():
        m = TRACE_LINE.match(line)
        if not m:
            continue
        name, rest = m.groups()
        calls.add(name)
        succeeded = re.search(r"= \d+$", rest) is not None
        if name == "socket" and (family := re.match(r"(AF_[A-Z0-9]+)", rest)):
            families.add(family.group(1))
        elif name == "openat" and succeeded and (p := re.match(r'AT_FDCWD, "([^"]+)", ([A-Z_|]+)', rest)):
            if WRITE_FLAGS.search(p.group(2)):
                written.add(p.group(1))
        elif succeeded and name in PATH_CALLS:
            written.update(re.findall(r'"([^"]+)"', rest))
        elif succeeded and name in AT_CALLS:
            written.update(re.findall(r'AT_FDCWD, "([^"]+)"', rest))
        elif succeeded and name == "bind":
            written.update(re.findall(r'sun_path="([^"]+)"', rest))
        if (name == "mmap" and "PROT_WRITE|PROT_EXEC" in rest) or (name.endswith("mprotect") and "PROT_EXEC" in rest):
            wx.append(line)
    return calls, families, written, wx


def inside(path: str, directories) -> bool:
    """Whether an absolute path (strace prints socket paths as "///dir/sock") lies in one of directories."""
    return path.startswith("/") and any(Path("/" + path.lstrip("/")).is_relative_to(d) for d in directories)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (Debian package strace)")
@needs_systemd_analyze
def test_daemon_on_the_sample_config_stays_inside_the_unit_sandbox(tmp_path):
    """The sample configuration with its directories moved under tmp_path (the unit's StateDirectory,
    RuntimeDirectory and ReadWritePaths) and its ports made free; tiers small so that rows land on SCM."""
    state, runtime, scm = tmp_path / "state", tmp_path / "run", tmp_path / "scm"
    for d in (state, runtime, scm):
        d.mkdir()
    tcp, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    text = SAMPLE.read_text()
    for shipped, here in (("/var/lib/embtier", state), ("/run/embtier", runtime), ("/srv/embtier-scm", scm),
                          ("127.0.0.1:50051", tcp), ("127.0.0.1:9464", metrics)):
        assert shipped in text
        text = text.replace(shipped, str(here))
    (tmp_path / "embtierd.toml").write_text(text)
    trace = tmp_path / "strace.txt"
    log = tmp_path / "embtierd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), str(VENV_DAEMON), "--config",
                                 str(tmp_path / "embtierd.toml"), "--dram-bytes", "2M", "--cxl-bytes", "2M",
                                 "--scm-bytes", "256M"], stdout=out, stderr=subprocess.STDOUT)
    target = f"unix://{runtime}/embtierd.sock"
    try:
        wait_serving(target, proc, timeout=120)
        with Client(target, timeout=60) as c:
            c.create_table("t", 100_000, 16, initializer="uniform", seed=1)  # 2 MiB DRAM, 2 MiB CXL, SCM the rest
            ids = np.arange(0, 100_000, 997, dtype=np.int64)
            c.write_rows("t", ids, np.ones((ids.size, 16), np.float32))
            assert np.array_equal(c.lookup("t", ids), np.ones((ids.size, 16), np.float32))
            c.lookup_pooled({"t": (ids, np.array([ids.size], np.int32))})
            with pytest.raises(EmbtierClientError):
                c.lookup("missing", ids)
            c.checkpoint()
        with Client(tcp, timeout=60) as c:
            assert c.describe("t").rows_by_tier["scm"] > 0
        assert b"embtier_rows_served_total" in urllib.request.urlopen(f"http://{metrics}/metrics", timeout=30).read()
    finally:
        for daemon in psutil.Process(proc.pid).children():  # strace passes no signal on: stop its tracee
            daemon.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)  # strace exits with the daemon's status
    assert code == 0, log.read_text()

    calls, families, written, wx = traced(trace.read_text())
    unit = unit_settings(UNIT.read_text())
    assert {"mbind", "io_submit", "io_getevents", "fsync"} <= calls  # the paths the test meant to exercise ran
    assert calls - allowed_syscalls(unit["SystemCallFilter"]) == set()
    assert families <= set(unit["RestrictAddressFamilies"][0].split())
    # Python's bytecode cache is skipped silently where the venv is read-only (ProtectSystem=strict)
    assert {p for p in written if "__pycache__" not in p and not inside(p, (state, runtime, scm))} == set()
    assert wx == [], "MemoryDenyWriteExecute=yes refuses these"
