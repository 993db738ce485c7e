"""A real embtierd process per test module, on a Unix socket and a loopback
TCP port in a temporary state directory, stopped with SIGTERM afterwards
(started the way the tools start one: embtier_tools.daemon)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from embtier.client import wait_serving
from embtier_tools.daemon import Daemon, command, launch

TIER_FLAGS = ("--dram-bytes", "2M", "--cxl-bytes", "2M", "--scm-bytes", "256M")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProcess(Daemon):
    """A test's daemon: reached on its Unix socket (target), also on TCP, its metrics on their own port."""

    socket_path: Path = Path()
    tcp: str = ""
    metrics: str = ""


def run_cli(target: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`embtier --target target args...` as a separate process; its result, whatever the exit status."""
    return subprocess.run([sys.executable, "-m", "embtier.cli", "--target", target, *args], check=False,
                          capture_output=True, text=True, timeout=timeout)


def daemon_args(state_dir: Path, *extra: str, config: Path | None = None) -> tuple[list[str], Path, str, str]:
    """(embtierd command line, socket path, TCP address, metrics address) for a daemon in state_dir."""
    sock = state_dir / "embtierd.sock"
    tcp = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    args = command(state_dir, [f"unix://{sock}", tcp], metrics, *TIER_FLAGS,
                   *(["--config", str(config)] if config is not None else []), *extra)
    return args, sock, tcp, metrics


_started: list[DaemonProcess] = []  # every daemon started, in order


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test():
    """Kills the daemons a test started and left running (a test that failed half way); those of
    module fixtures, started before it, are theirs to stop."""
    first = len(_started)
    yield
    for left in _started[first:]:
        if left.proc.poll() is None:
            left.proc.kill()
            left.proc.wait(timeout=30)
    del _started[first:]


def start_daemon(state_dir: Path, *extra: str, config: Path | None = None,
                 env: dict[str, str] | None = None) -> DaemonProcess:
    """A serving embtierd; config is a TOML file under the flags (which win over it).  Without one the
    tiering engine is off, so that rows stay where the test put them (tests of tiering pass a config)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = state_dir / "embtierd.toml"
        config.write_text("[tiering]\nenabled = false\n")
    args, sock, tcp, metrics = daemon_args(state_dir, *extra, config=config)
    started = launch(args, state_dir, f"unix://{sock}", env)
    daemon = DaemonProcess(started.proc, started.target, started.log_path, sock, tcp, metrics)
    _started.append(daemon)
    try:
        wait_serving(daemon.target, daemon.proc)
    except (RuntimeError, TimeoutError) as e:
        daemon.stop()
        raise RuntimeError(f"{e}; its log:\n{daemon.log()}") from None
    return daemon


@contextlib.contextmanager
def running_daemon(state_dir: Path, config_text: str):
    """A daemon on a configuration of the test's own, which must exit 0 when stopped."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir / "embtierd.toml"
    config.write_text(config_text)
    d = start_daemon(state_dir, config=config)
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("embtierd"))
    yield d
    assert d.stop() == 0, d.log()
