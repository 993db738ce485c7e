"""The multi-host test bed of the cluster tests, demo and benchmark: n hosts for embtierd
processes and one real etcd that all of them reach.

Namespace mode ("netns", root only) gives every host i a network namespace of its own, joined to
the root namespace by a veth pair on a /30 of 169.254.0.0/16 (the fabric test bed uses
169.254.100.0/30; this bed uses 169.254.(B+i).0/30, B the first of 200, 201, ... whose block no
other bed up at the same time holds):

    root namespace                                              <prefix>-n<i>
      etcd on 127.0.0.1:P and on every 169.254.(B+i).1:P          lo (up)
      tests and clients                                           embtierd on 169.254.(B+i).2:50051
      <short>-r<i>  169.254.(B+i).1/30  <====== veth ======>  <short>-n<i>  169.254.(B+i).2/30

Clients in the root namespace dial 169.254.(B+i).2 directly; the daemon of host i dials etcd on
169.254.(B+i).1.  partition(i) sets the root end of host i's veth down, so host i reaches
neither etcd nor any client (and no client reaches it) while its daemon keeps running; heal(i) sets
it up again.  The veth ends get no IPv6 link-local address.

Loopback mode ("loopback": not root, or namespaces not permitted) puts every host on 127.0.0.1
with ports of its own.  It runs the same daemons against the same etcd, but it cannot partition a
host: partition() raises ClusterBedError there.

Processes of the bed (etcd, the daemons, anything started with popen) run each in a session of its
own.  down() stops them, kills whatever is left in the bed's namespaces or runs with a state or data
directory under base_dir (a crashed run's daemons and etcd), then removes the veths and namespaces
of the prefix; up() does the same first.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self

import psutil
from embtier.client import wait_serving
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from embtier_tools.daemon import Daemon, command, free_port, launch
from embtier_tools.fabric import (
    DAEMON_PORT,
    IFNAME_MAX,
    METRICS_PORT,
    PREFIX_LENGTH,
    PREFIX_RE,
    FabricError,
    TestBed,
    stop_process,
)

Mode = Literal["netns", "loopback"]
LOOPBACK = "127.0.0.1"
FIRST_SUBNET_OCTET = 200         # host i owns 169.254.(B+i).0/30, B from 200 up (see _free_block)
MAX_HOSTS = 256 - FIRST_SUBNET_OCTET - 1
ETCD_LOG_NAME = "etcd.log"
OWNED_DIR_FLAGS = ("--state-dir", "--data-dir")  # a process with one of these under base_dir is the bed's


class ClusterBedError(FabricError):
    """The cluster test bed cannot be set up or used; the message says why."""


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed"
    probe = f"embtier-probe-{os.getpid()}"
    try:
        TestBed._create_namespace(probe)
    except FabricError as e:
        return str(e)
    netns.remove(probe)
    return None


def _http_get_json(url: str, timeout_seconds: float) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    with opener.open(url, timeout=timeout_seconds) as reply:
        return json.loads(reply.read())


class Etcd:
    """One etcd member in the root namespace, its data and log (etcd.log) in directory; it serves
    clients on port (a free one by default) of every address in hosts."""

    def __init__(self, directory: Path, hosts: Sequence[str] = (LOOPBACK,), port: int | None = None,
                 name: str = "embtier", stop_timeout_seconds: float = 10.0):
        if LOOPBACK not in hosts:
            raise ValueError(f"etcd hosts {list(hosts)}: {LOOPBACK} must be one (the health check uses it)")
        self.directory = Path(directory)
        self.hosts = tuple(hosts)
        self.port = port or free_port()
        self.name = name
        self.stop_timeout_seconds = stop_timeout_seconds
        self.proc: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / ETCD_LOG_NAME

    @property
    def endpoints(self) -> list[str]:
        """"host:port" of every address it serves on (all reachable from the root namespace)."""
        return [f"{host}:{self.port}" for host in self.hosts]

    def endpoint(self, host: str = LOOPBACK) -> str:
        """"host:port" where it serves on host (one of its hosts)."""
        if host not in self.hosts:
            raise ValueError(f"etcd does not serve on {host}; it serves on {', '.join(self.hosts)}")
        return f"{host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def command(self, peer_port: int) -> list[str]:
        binary = shutil.which("etcd")
        if binary is None:
            raise ClusterBedError("etcd is not installed (apt-get install etcd-server)")
        clients = ",".join(f"http://{host}:{self.port}" for host in self.hosts)
        peer = f"http://{LOOPBACK}:{peer_port}"
        return [binary, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", clients, "--advertise-client-urls", clients,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
                "--initial-cluster-token", f"{self.name}-{self.port}"]

    def start(self, timeout_seconds: float = 30.0) -> None:
        """Starts etcd and returns once it reports itself healthy; ClusterBedError with its log
        when it exits first or is not healthy within timeout_seconds (it is stopped then)."""
        if self.proc is not None and self.proc.poll() is None:
            raise ClusterBedError(f"etcd is already running (pid {self.proc.pid})")
        self.directory.mkdir(parents=True, exist_ok=True)
        # ETCD_* variables (such as /etc/default/etcd's) would override the flags
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command(free_port()), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self._wait_healthy(timeout_seconds)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        url = f"http://{self.endpoint()}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterBedError(f"etcd exited with {self.proc.returncode} before serving; its log "
                                      f"({self.log_path}):\n{self.log()}")
            try:
                if _http_get_json(url, 1.0).get("health") == "true":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise ClusterBedError(f"etcd was not healthy on {url} within {timeout_seconds:g} s; its log "
                              f"({self.log_path}):\n{self.log()}")

    def pause(self) -> None:
        """SIGSTOP: etcd keeps its data and connections but answers nothing until resume()."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise ClusterBedError("etcd is not running")
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after stop_timeout_seconds (a paused etcd is resumed first); idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would hold SIGTERM pending
        stop_process(self.proc, self.stop_timeout_seconds)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ClusterBed:
    """n hosts for daemons and one etcd; `with ClusterBed(...) as bed:` brings it up and always down.
    netns: True namespace mode, False loopback mode, None namespace mode where namespaces can be made."""

    def __init__(self, n: int, prefix: str, base_dir: Path, netns: bool | None = None, etcd: bool = True,
                 stop_timeout_seconds: float = 10.0):
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"n = {n}: a cluster bed has 1 to {MAX_HOSTS} hosts")
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r}: 1-32 characters of letters, digits, '_', '.', '-', "
                             f"starting with a letter or digit")
        if netns is None:
            netns = namespaces_unavailable() is None
        elif netns and (reason := namespaces_unavailable()) is not None:
            raise ClusterBedError(f"namespace mode is not possible here: {reason}")
        self.n = n
        self.prefix = prefix
        self.base_dir = Path(base_dir).resolve()
        self.mode: Mode = "netns" if netns else "loopback"
        self._first_octet = self._free_block(n) if netns else FIRST_SUBNET_OCTET
        self.stop_timeout_seconds = stop_timeout_seconds
        self.etcd: Etcd | None = Etcd(self.base_dir / "etcd", self._etcd_hosts()) if etcd else None
        self.daemons: dict[int, Daemon] = {}
        self._short = prefix[:IFNAME_MAX - len(f"-r{MAX_HOSTS - 1}")]
        self._ports: dict[int, tuple[int, int]] = {}  # host: (daemon port, metrics port)
        self._children: list[subprocess.Popen] = []

    # -- names and addresses -------------------------------------------------------------------------

    def _check_host(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise ValueError(f"host {i}: the bed has hosts 0 to {self.n - 1}")

    def namespace(self, i: int) -> str:
        self._check_host(i)
        return f"{self.prefix}-n{i}"

    def root_ifname(self, i: int) -> str:
        """The root namespace's end of host i's veth (the one partition() sets down)."""
        self._check_host(i)
        return f"{self._short}-r{i}"

    def host_ifname(self, i: int) -> str:
        self._check_host(i)
        return f"{self._short}-n{i}"

    def _subnet_address(self, i: int, last_octet: int) -> str:
        return f"169.254.{self._first_octet + i}.{last_octet}"

    @staticmethod
    def _free_block(n: int) -> int:
        """The first third octet o >= FIRST_SUBNET_OCTET (then below it, above the fabric's 100) such that
        no address of the root namespace lies in 169.254.o.0 - 169.254.(o+n-1).255: two beds up at once
        (a test and a benchmark) get blocks of their own, or their routes would cross."""
        with IPRoute() as ipr:
            used = {int(a.get_attr("IFA_ADDRESS").split(".")[2]) for a in ipr.get_addr(family=socket.AF_INET)
                    if a.get_attr("IFA_ADDRESS", "").startswith("169.254.")}
        for first in (*range(FIRST_SUBNET_OCTET, 256 - n), *range(101, FIRST_SUBNET_OCTET - n + 1)):
            if not used & set(range(first, first + n)):
                return first
        raise ClusterBedError(f"no free block of {n} /24s in 169.254.0.0/16 for the bed's veths")

    def address(self, i: int) -> str:
        """Where host i's daemon listens and clients in the root namespace reach it."""
        self._check_host(i)
        return self._subnet_address(i, 2) if self.mode == "netns" else LOOPBACK

    def gateway(self, i: int) -> str:
        """The root namespace's address as host i sees it (where host i reaches etcd)."""
        self._check_host(i)
        return self._subnet_address(i, 1) if self.mode == "netns" else LOOPBACK

    def _etcd_hosts(self) -> list[str]:
        if self.mode == "loopback":
            return [LOOPBACK]
        return [LOOPBACK, *(self._subnet_address(i, 1) for i in range(self.n))]

    def etcd_endpoint(self, i: int) -> str:
        """"host:port" of etcd for host i's daemon."""
        if self.etcd is None:
            raise ClusterBedError("this bed was made without etcd")
        return self.etcd.endpoint(self.gateway(i))

    def _host_ports(self, i: int) -> tuple[int, int]:
        self._check_host(i)
        if i not in self._ports:
            self._ports[i] = (DAEMON_PORT, METRICS_PORT) if self.mode == "netns" else (free_port(), free_port())
        return self._ports[i]

    def target(self, i: int) -> str:
        """"address:port" host i's daemon serves on (the same every time it is started without port)."""
        return f"{self.address(i)}:{self._host_ports(i)[0]}"

    # -- up and down ---------------------------------------------------------------------------------

    def up(self) -> None:
        """Removes what a previous run with this prefix and base_dir left, makes the namespaces and
        veths (namespace mode) and starts etcd; on any failure (Ctrl-C too) it removes what it made
        and raises."""
        self.down()
        try:
            if self.mode == "netns":
                for i in range(self.n):
                    self._make_host(i)
            if self.etcd is not None:
                self.etcd.start()
        except BaseException:
            self.down()
            raise

    def _make_host(self, i: int) -> None:
        TestBed._create_namespace(self.namespace(i))
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.root_ifname(i), kind="veth",
                     peer={"ifname": self.host_ifname(i), "net_ns_fd": self.namespace(i)})
        with IPRoute(netns=self.namespace(i), flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for namespace, ifname, last_octet in ((None, self.root_ifname(i), 1),
                                              (self.namespace(i), self.host_ifname(i), 2)):
            with self._ipr(namespace) as ipr:
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.link("set", index=index, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [
                    ["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]})  # IN6_ADDR_GEN_MODE_NONE: no fe80:: address
                ipr.addr("add", index=index, address=self._subnet_address(i, last_octet), prefixlen=PREFIX_LENGTH)
                ipr.link("set", index=index, state="up")

    @staticmethod
    def _ipr(namespace: str | None) -> IPRoute:
        return IPRoute() if namespace is None else IPRoute(netns=namespace, flags=0)  # flags=0: never create one

    def _leftover_namespaces(self) -> list[str]:
        pattern = re.compile(rf"{re.escape(self.prefix)}-n\d+")
        return [name for name in netns.listnetns() if pattern.fullmatch(name)]

    def _leftover_root_links(self, ipr: IPRoute) -> list[tuple[int, str]]:
        pattern = re.compile(rf"{re.escape(self._short)}-r\d+")
        return [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()
                if pattern.fullmatch(link.get_attr("IFLA_IFNAME") or "")]

    def down(self) -> None:
        """Stops every process of the bed (and any a crashed run left), removes the veths and the
        namespaces of the prefix.  Idempotent; a part that cannot be removed raises ClusterBedError
        once the rest is."""
        for proc in [*(d.proc for d in self.daemons.values()), *self._children]:
            stop_process(proc, self.stop_timeout_seconds)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.daemons.clear()
        self._children.clear()
        if self.etcd is not None:
            self.etcd.stop()
        problems = self._kill_processes_under_base_dir()
        if os.geteuid() != 0:  # a loopback bed of an unprivileged user made no namespace
            if problems:
                raise ClusterBedError("the cluster bed was not removed completely: " + "; ".join(problems))
            return
        namespaces = self._leftover_namespaces()
        for name in namespaces:
            problems += TestBed._kill_namespace_processes(name)
        with IPRoute() as ipr:  # deleting one end of a veth deletes both
            for index, ifname in self._leftover_root_links(ipr):
                try:
                    ipr.link("del", index=index)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        problems.append(f"deleting {ifname}: {e}")
        for name in namespaces:
            try:
                netns.remove(name)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"removing namespace {name}: {e}")
        if problems:
            raise ClusterBedError("the cluster bed was not removed completely: " + "; ".join(problems))

    def _owns(self, cmdline: Sequence[str]) -> bool:
        """Whether a command line has a state or data directory under base_dir."""
        for flag, value in itertools.pairwise(cmdline):
            if flag in OWNED_DIR_FLAGS and Path(value).resolve().is_relative_to(self.base_dir):
                return True
        return False

    def _kill_processes_under_base_dir(self, rounds: int = 50) -> list[str]:
        """SIGKILLs the daemons and etcd that run with their directory under base_dir (a crashed run's)."""
        spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        for _ in range(rounds):
            left = []
            for proc in psutil.process_iter(["cmdline"]):
                if proc.pid not in spared and self._owns(proc.info["cmdline"] or []):
                    left.append(proc)
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
            if not left:
                return []
            psutil.wait_procs(left, timeout=0.1)
        return [f"processes {[p.pid for p in left]} under {self.base_dir} are still running"]

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- processes -----------------------------------------------------------------------------------

    def popen(self, i: int, args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Starts args on host i (inside its namespace in namespace mode), in a session of its own so
        that down() stops its whole process group; popen_kwargs go to subprocess.Popen."""
        self._check_host(i)
        if not popen_kwargs.pop("start_new_session", True):
            raise ValueError("popen: processes of the cluster bed always start a new session")
        if self.mode == "netns":
            if self.namespace(i) not in netns.listnetns():
                raise ClusterBedError(f"namespace {self.namespace(i)} does not exist: bring the bed up first")
            args = ["nsenter", f"--net={netns.NETNS_RUN_DIR}/{self.namespace(i)}", "--", *args]
        proc = subprocess.Popen(list(args), start_new_session=True, **popen_kwargs)
        self._children.append(proc)
        return proc

    def run(self, i: int, args: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Runs args on host i to the end; its output (text), or ClusterBedError with it when it fails
        or takes more than timeout seconds."""
        proc = self.popen(i, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            out, err = proc.communicate()
            raise ClusterBedError(f"{' '.join(args)} on host {i} took more than {timeout:g} s:\n{out}{err}") from None
        finally:
            self._children.remove(proc)
        if proc.returncode != 0:
            raise ClusterBedError(f"{' '.join(args)} on host {i} exited with {proc.returncode}:\n{out}{err}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def python(self, i: int, code: str, *args: str, timeout: float = 30.0) -> str:
        """Runs `python -c code args...` on host i; its standard output."""
        return self.run(i, [sys.executable, "-c", code, *args], timeout).stdout

    def start_daemon(self, i: int, state_dir: Path | None = None, extra_args: Sequence[str] = (),
                     port: int | None = None, timeout: float = 60.0) -> Daemon:
        """embtierd on host i, serving on address(i):port (target(i) by default) and /metrics on its
        loopback, state and log (embtierd.log) in state_dir (base_dir/host<i> by default); returns
        once a health check from the root namespace says SERVING, or raises ClusterBedError with its
        log (it is killed then)."""
        running = self.daemons.get(i)
        if running is not None and running.proc.poll() is None:
            raise ClusterBedError(f"host {i} already runs embtierd (pid {running.proc.pid})")
        default_port, metrics_port = self._host_ports(i)
        target = f"{self.address(i)}:{port or default_port}"
        state_dir = Path(state_dir) if state_dir is not None else self.base_dir / f"host{i}"
        # the bed's clients present no certificates: peers without an identity may do everything here
        args = command(state_dir, [target], f"{LOOPBACK}:{metrics_port}", "--anonymous-role", "admin", *extra_args)
        daemon = launch(args, state_dir, target, popen=functools.partial(self._popen_daemon, i))
        self.daemons[i] = daemon
        try:
            wait_serving(target, daemon.proc, timeout)
        except (RuntimeError, TimeoutError) as e:
            stop_process(daemon.proc, 0)
            raise ClusterBedError(f"{e} (host {i}); its log ({daemon.log_path}):\n{daemon.log()}") from None
        return daemon

    def _popen_daemon(self, i: int, args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        proc = self.popen(i, args, stdin=subprocess.DEVNULL, **popen_kwargs)
        self._children.remove(proc)  # down() finds it in daemons
        return proc

    def _daemon(self, i: int) -> Daemon:
        self._check_host(i)
        if i not in self.daemons:
            raise ClusterBedError(f"host {i} has no daemon")
        return self.daemons[i]

    def kill(self, i: int) -> int:
        """SIGKILLs host i's daemon (a crash); its exit status."""
        proc = self._daemon(i).proc
        if proc.poll() is None:
            proc.kill()
        return proc.wait(timeout=30)

    def stop_daemon(self, i: int, timeout: float = 30.0) -> int:
        """SIGTERM to host i's daemon (an orderly shutdown); its exit status."""
        return self._daemon(i).stop(timeout)

    # -- partitions ----------------------------------------------------------------------------------

    def partition(self, i: int) -> None:
        """Cuts host i off: it reaches neither etcd nor the other hosts, and no client reaches it; its
        processes keep running.  Namespace mode only."""
        self._set_link(i, "down")

    def heal(self, i: int, timeout_seconds: float = 10.0) -> None:
        """Undoes partition(i); returns once both ends of the veth are up again."""
        self._set_link(i, "up")
        deadline = time.monotonic() + timeout_seconds
        while not self._link_up(i):
            if time.monotonic() > deadline:
                raise ClusterBedError(f"host {i}'s veth did not come up within {timeout_seconds:g} s")
            time.sleep(0.02)

    def _set_link(self, i: int, state: str) -> None:
        self._check_host(i)
        if self.mode != "netns":
            raise ClusterBedError("partitioning a host needs namespace mode (root and network namespaces); "
                                  "this bed runs every host on 127.0.0.1")
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.root_ifname(i))
            if not found:
                raise ClusterBedError(f"{self.root_ifname(i)} does not exist: bring the bed up first")
            ipr.link("set", index=found[0], state=state)

    def _link_up(self, i: int) -> bool:
        for namespace, ifname in ((None, self.root_ifname(i)), (self.namespace(i), self.host_ifname(i))):
            with self._ipr(namespace) as ipr:
                link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
                if link.get_attr("IFLA_OPERSTATE") != "UP":
                    return False
        return True
