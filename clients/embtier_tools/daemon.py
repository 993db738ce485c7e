"""Starting an embtierd process on this host, for the demo, the fabric test bed
and the tests: one command line, the daemon's log in its state directory, and
waiting until its health service says SERVING."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from embtier.client import wait_serving

LOG_NAME = "embtierd.log"
# Ports handed to daemons come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range,
# 32768-60999 by default): a port bound and released there can be taken by any outgoing connection
# before the daemon binds it; one below it is taken only by a listener that asks for it by number.
LISTEN_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on now and that this process has not handed out before."""
    for _ in range(1000):
        port = random.choice(LISTEN_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {LISTEN_PORTS.start}-{LISTEN_PORTS.stop - 1}")


def command(state_dir: Path, listen: Sequence[str], metrics_listen: str, *extra: str) -> list[str]:
    """`python -m embtierd` with its state in state_dir, serving on each of listen (the first one is
    where it is reached) and /metrics on metrics_listen; extra flags after (they win over earlier ones)."""
    return [sys.executable, "-m", "embtierd", "--state-dir", str(state_dir),
            *(flag for address in listen for flag in ("--listen", address)), "--metrics-listen", metrics_listen,
            *extra]


@dataclass
class Daemon:
    """A started embtierd: its process, the address it was reached on, and its log."""

    proc: subprocess.Popen
    target: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (an orderly shutdown), then its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def launch(args: list[str], state_dir: Path, target: str, env: dict[str, str] | None = None,
           popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> Daemon:
    """Starts the command line args (see command()) with its output in state_dir/embtierd.log;
    popen starts it somewhere else (the fabric test bed's namespaces)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / LOG_NAME
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = popen(args, stdout=log, stderr=subprocess.STDOUT,
                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    return Daemon(proc, target, log_path)


def start(state_dir: Path, listen: Sequence[str], metrics_listen: str, *extra: str,
          env: dict[str, str] | None = None, timeout: float = 60.0) -> Daemon:
    """A serving embtierd on this host; RuntimeError with its log when it exits or does not serve
    within timeout seconds (it is killed then)."""
    daemon = launch(command(state_dir, listen, metrics_listen, *extra), state_dir, listen[0], env)
    try:
        wait_serving(daemon.target, daemon.proc, timeout)
    except (RuntimeError, TimeoutError) as e:
        daemon.proc.kill()
        daemon.proc.wait(timeout=30)
        raise RuntimeError(f"{e}; its log ({daemon.log_path}):\n{daemon.log()}") from None
    return daemon
