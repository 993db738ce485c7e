"""Helpers the tests share (fixtures stay in the conftest files and use these): stores and
configurations of small tiers, fake sysfs trees, the kernel's view of a memory policy, and real
embtierd processes on temporary state directories.  Imported by the tests as tests.support; no
test module imports another."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import platform
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from embtier.client import wait_serving
from embtier.shm import SharedMemory, side_socket
from embtier.wire import CREDENTIAL_METADATA_KEY
from embtier_tools.daemon import Daemon, command, free_port, launch
from embtierd import config, native

# ---- stores ---------------------------------------------------------------------------------------


def make_config(state_dir, dram="64K", cxl="64K", scm="64M", fabric=None, **kernels):
    return config.load(overrides={
        "state_dir": str(state_dir),
        "tiers": {"dram": {"capacity": dram}, "cxl": {"capacity": cxl}, "scm": {"capacity": scm}},
        "kernels": kernels,
        "fabric": fabric or {},
    })


_BEST_ISA = {name: code for code, name in native.ISA_NAMES.items()}[native.isa()]
AVAILABLE_ISAS = [native.ISA_NAMES[code] for code in sorted(native.ISA_NAMES) if code <= _BEST_ISA]


def assert_parts_match_addresses(store, name):
    """Every row's fabric part is the port whose segment of the CXL arena holds its bytes."""
    table = store._tables[name]
    loc = table.native.loc
    tier, slot = loc >> table.native.tier_shift, loc & ((1 << table.native.tier_shift) - 1)
    cxl = store.tiers.cxl
    space = table.slots.get(1)
    expected = np.where(tier == 0, 0, 1 + store.cxl_ports).astype(np.int64)
    if space is not None:
        rows = np.flatnonzero(tier == 1)
        offsets = np.array([e.offset for e in space.extents])[slot[rows] >> space.shift]
        expected[rows] = 1 + np.array([cxl.port_of(int(o)) for o in np.unique(offsets)])[
            np.searchsorted(np.unique(offsets), offsets)]
    assert np.array_equal(store.parts_of(name, np.arange(table.num_rows)).astype(np.int64), expected)


# ---- fake sysfs trees -----------------------------------------------------------------------------

KIB = 1024
GIB = 1024**3


def make_sysfs(
    root: Path,
    nodes: dict[int, tuple[str, int | None]],
    online: str | None = None,
) -> Path:
    """Write a fake ``devices/system/node`` tree under ``root``.

    ``nodes`` maps node id -> (cpulist text, MemTotal in kB or None for no meminfo file).
    ``online`` is the content of ``node/online``; None leaves the file out.
    """
    node_dir = root / "devices" / "system" / "node"
    node_dir.mkdir(parents=True)
    if online is not None:
        (node_dir / "online").write_text(online)
    for node_id, (cpulist, mem_kb) in nodes.items():
        d = node_dir / f"node{node_id}"
        d.mkdir()
        (d / "cpulist").write_text(cpulist)
        if mem_kb is not None:
            (d / "meminfo").write_text(
                f"Node {node_id} MemTotal:       {mem_kb} kB\n"
                f"Node {node_id} MemFree:        {mem_kb // 2} kB\n"
                f"Node {node_id} MemUsed:        {mem_kb - mem_kb // 2} kB\n"
            )
    return root


# ---- the kernel's view of a memory policy ----------------------------------------------------------

MPOL_DEFAULT, MPOL_BIND = 0, 2
MPOL_F_ADDR = 2
SYS_GET_MEMPOLICY = {"x86_64": 239, "aarch64": 236}
MASK_WORDS = 16  # room for 1024 nodes, more than any kernel's nr_node_ids here

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def get_mempolicy(address: int) -> tuple[int, set[int]]:
    """(mode, node ids) of the policy that covers address; skips the test where the syscall is refused."""
    number = SYS_GET_MEMPOLICY.get(platform.machine())
    if number is None:
        pytest.skip(f"no get_mempolicy syscall number known for {platform.machine()}")
    mode = ctypes.c_int(-1)
    mask = (ctypes.c_ulong * MASK_WORDS)()
    rc = _libc.syscall(ctypes.c_long(number), ctypes.byref(mode), mask, ctypes.c_ulong(64 * MASK_WORDS),
                       ctypes.c_void_p(address), ctypes.c_ulong(MPOL_F_ADDR))
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            pytest.skip(f"get_mempolicy(2) refused here: {errno.errorcode[err]}")
        raise OSError(err, f"get_mempolicy(MPOL_F_ADDR, {address:#x})")
    nodes = {64 * w + b for w in range(MASK_WORDS) for b in range(64) if mask[w] >> b & 1}
    return mode.value, nodes


# ---- real daemons -----------------------------------------------------------------------------------

TIER_FLAGS = ("--dram-bytes", "2M", "--cxl-bytes", "2M", "--scm-bytes", "256M")


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


@contextlib.contextmanager
def kill_daemons_started_since():
    """Kills, on leaving, the daemons started within the block that are still running."""
    first = len(_started)
    try:
        yield
    finally:
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


class _Credential(grpc.UnaryUnaryClientInterceptor):
    """Adds the side socket's credential to each call's metadata."""

    def __init__(self, token: str):
        self.metadata = ((CREDENTIAL_METADATA_KEY, token),)

    def intercept_unary_unary(self, continuation, details, request):
        metadata = (*(details.metadata or ()), *self.metadata)
        return continuation(details._replace(metadata=metadata), request)


@contextlib.contextmanager
def credentialed_channel(target: str):
    """A plain gRPC channel to a daemon's Unix socket whose calls carry this process's credential from
    the side socket (as the client library's do), so that raw stubs act as this process's uid (root
    here: admin); the credential lasts while the channel is open."""
    side = SharedMemory(side_socket(target))
    try:
        reply = side.credential()
        assert reply is not None, "the daemon gave no credential (auth off?)"
        with grpc.insecure_channel(target) as channel:
            yield grpc.intercept_channel(channel, _Credential(reply["token"]))
    finally:
        side.close()


# ---- certificates (the openssl command line) ----------------------------------------------------------

OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = embtier test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:::1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


def openssl(cwd: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def make_ca(d: Path, name: str) -> None:
    openssl(d, "req", "-config", "openssl.cnf", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN=embtier test {name}", "-extensions", "ca")


def make_leaf(d: Path, name: str, ca: str, extensions: str, subject: str) -> None:
    openssl(d, "req", "-config", "openssl.cnf", "-new", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", subject)
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "2", "-extfile", "openssl.cnf",
            "-extensions", extensions, "-out", f"{name}.pem")
