"""The shaped-link test bed of the PIFS offload emulation (`embtier fabric`).

Owns two network namespaces, `<prefix>-host` (the inference server: clients run
there) and `<prefix>-switch` (the fabric switch: the daemon runs there), the veth
pair that joins them, "the host link", and the shaping of that link:

    <prefix>-host                                          <prefix>-switch
      lo (up)                                                lo (up)
      <prefix>-h  169.254.100.1/30  <====== veth ======>  <prefix>-s  169.254.100.2/30
        egress (requests):                                   egress (replies):
        tbf 1: rate R  [netem 10: delay D]                   tbf 1: rate R  [netem 10: delay D]
        [ingress: NFQUEUE, delay D]                          [ingress: NFQUEUE, delay D]  (without netem)

Nothing else gets an address: the two IPv4 link-local addresses above are the
only ones (the veth ends generate no IPv6 link-local address), and the veth is
created with its ends already inside the namespaces, so the root namespace's
interfaces are never touched.  Both ends are shaped, since requests leave
through the host end and replies through the switch end:

- rate: a token-bucket filter (tbf) at the root of each end, `rate` bytes/s,
  a bucket of max(128 KiB, 500 us of the rate) (a whole 64 KiB GSO packet of the
  veth fits, so tbf never has to split one) and a queue of 10 ms of the rate on
  top of it; tbf's 32-bit rate field caps the rate at 34 Gbit/s (pyroute2 0.9.7
  cannot send TCA_TBF_RATE64);
- delay: a netem qdisc in the tbf's class 1:1 (one-way delay, so a round trip
  takes twice as long), on kernels that have netem (CONFIG_NET_SCH_NETEM).
  Without netem, each end delays the packets it receives instead: an
  iptables NFQUEUE rule (mangle PREROUTING, -i the veth end, --queue-bypass)
  hands them to a netfilter queue, and `python -m embtier_tools.fabric_delay` in
  that namespace releases each one after the delay (embtier/fabric_delay.py).
  The delay then comes after the sender's tbf, as propagation follows
  serialisation on a wire; it is applied on arrival rather than on departure
  because a packet held on the sender's side would still count against its
  TCP socket's small-queue budget (netem orphans the packets it holds; a
  netfilter queue cannot), which throttles a 20 ms link to a few Mbit/s.
  Changing the delay switches the rule to the other of two queue numbers
  once a new process holds it, so nothing is dropped.  Without netem and
  without iptables (or its NFQUEUE target), a delay raises DelayUnsupported
  and the rate alone works.

Processes run inside a namespace through `nsenter --net`, each in its own
session; `down()` stops them (their whole process group) and any other process
left in the namespaces before removing the veth and the namespaces.

Also here: the pieces `embtier fabric run` is built of, start_daemon (embtierd in
the switch namespace, serving on the veth) and run_host_client (a client process
in the host namespace), and that client itself, `python -m embtier_tools.fabric
wait|loadgen`, which only ever runs inside the host namespace.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self

import psutil
from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

from embtier_tools.daemon import command, launch

Side = Literal["host", "switch"]
SIDES: tuple[Side, Side] = ("host", "switch")
ADDRESSES: dict[Side, str] = {"host": "169.254.100.1", "switch": "169.254.100.2"}
PREFIX_LENGTH = 30
DAEMON_PORT = 50051
METRICS_PORT = 9464              # on the switch namespace's own loopback
IFNAME_MAX = 15                  # IFNAMSIZ - 1

GSO_MAX_BYTES = 65536            # the largest packet the veth hands its qdisc
MIN_BURST_BYTES = 2 * GSO_MAX_BYTES
BURST_SECONDS = 500e-6           # the bucket holds this much of the rate, at least MIN_BURST_BYTES
QUEUE_SECONDS = 0.010            # the queue in front of the bucket holds this much of the rate
MIN_RATE_BITS_PER_SECOND = 1e6
MAX_RATE_BITS_PER_SECOND = (2**32 - 1) * 8
MAX_DELAY_SECONDS = 10.0
NETEM_MIN_LIMIT_PACKETS = 1000
TBF_HANDLE, NETEM_PARENT, NETEM_HANDLE = "1:", "1:1", "10:"
MTU_BYTES = 1500

NEEDS_ROOT = "embtier fabric needs root (network namespaces, tc)"
NO_DELAY = ("a link delay needs the netem qdisc (CONFIG_NET_SCH_NETEM; `modprobe sch_netem` where it is a "
            "module) or a netfilter queue (CONFIG_NETFILTER_NETLINK_QUEUE and iptables' NFQUEUE target); "
            "without them only the rate can be shaped (delay 0)")
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class FabricError(RuntimeError):
    """The test bed cannot be set up or used; the message says why and what to do."""


class DelayUnsupported(FabricError):
    """The kernel has no netem qdisc, so a link delay cannot be emulated (the rate can)."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise FabricError(NEEDS_ROOT)


_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmgt]?)(?:bit)?(?:/s)?\s*$", re.IGNORECASE)
_DELAY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ns|us|µs|ms|s)\s*$", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_DELAY_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_rate(text: str) -> float:
    """Bits per second of "10gbit", "100mbit", "25g", "1e9" (decimal units, as tc)."""
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a rate (examples: 100mbit, 1gbit, 25gbit)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def parse_delay(text: str) -> float:
    """Seconds of "50us", "1ms", "0.5s" or "0"."""
    if text.strip() == "0":
        return 0.0
    m = _DELAY_RE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a delay (examples: 0, 50us, 1ms)")
    return float(m.group(1)) * _DELAY_UNITS[m.group(2).lower()]


def format_rate(bits_per_second: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:g} {unit}"
    return f"{bits_per_second:g} bit/s"


def format_delay(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g} ms"
    return f"{seconds * 1e6:g} us"


def check_shaping(rate_bits_per_second: float, delay_seconds: float) -> None:
    if not MIN_RATE_BITS_PER_SECOND <= rate_bits_per_second <= MAX_RATE_BITS_PER_SECOND:
        raise ValueError(f"rate {format_rate(rate_bits_per_second)} is outside [{format_rate(MIN_RATE_BITS_PER_SECOND)}, "
                         f"{format_rate(MAX_RATE_BITS_PER_SECOND)}] (tbf's 32-bit rate in bytes/s)")
    if not 0 <= delay_seconds <= MAX_DELAY_SECONDS:
        raise ValueError(f"delay {delay_seconds!r} s is outside [0, {MAX_DELAY_SECONDS:g}] s")


def _ticks_to_seconds(ticks: int) -> float:
    return ticks / tick_in_usec / 1e6


def _handle_text(handle: int) -> str:
    if handle == 0xFFFFFFFF:
        return "root"
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}" if handle & 0xFFFF else f"{handle >> 16:x}:"


def _describe_qdisc(msg: Any) -> dict:
    """A qdisc dump message as a plain dict: kind, handle, parent, its shaping and counters."""
    kind = msg.get_attr("TCA_KIND")
    out: dict[str, Any] = {"kind": kind, "handle": _handle_text(msg["handle"]), "parent": _handle_text(msg["parent"])}
    stats = msg.get_attr("TCA_STATS") or {}
    out["sent_bytes"] = stats.get("bytes", 0)
    out["dropped_packets"] = stats.get("drop", 0)
    options = msg.get_attr("TCA_OPTIONS")
    if kind == "tbf" and options is not None:
        parms = options.get_attr("TCA_TBF_PARMS")
        rate_bytes = parms["rate"]
        out["rate_bits_per_second"] = rate_bytes * 8.0
        out["burst_bytes"] = int(rate_bytes * _ticks_to_seconds(parms["buffer"]))
        out["limit_bytes"] = parms["limit"]
    elif kind == "netem" and options is not None:
        out["delay_seconds"] = _ticks_to_seconds(options["delay"])
        out["limit_packets"] = options["limit"]
    return out


def _queue_delay_of(pids: list[int]) -> float | None:
    """The delay of the embtier_tools.fabric_delay process among pids (its --seconds), None without one."""
    for pid in pids:
        try:
            args = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if "embtier_tools.fabric_delay" in args and "--seconds" in args[:-1]:
            return float(args[args.index("--seconds") + 1])
    return None


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stops a process started by TestBed.popen and its process group: SIGTERM, SIGKILL after timeout s.
    A process already waited for is left alone (its pid, and so its group id, may belong to another
    process by now; what it left in the test bed's namespaces goes with them)."""
    if proc.returncode is not None:
        return

    def signal_group(sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    if proc.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    signal_group(signal.SIGKILL)  # the leader if it is still there, and whatever it left in its group
    proc.wait(timeout=5.0)


class TestBed:
    """Two namespaces joined by a shaped veth pair; `with TestBed(...) as bed:` brings it up and always down."""

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str = "embtier", rate_bits_per_second: float = 10e9, delay_seconds: float = 0.0,
                 stop_timeout_seconds: float = 5.0):
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r}: 1-32 characters of letters, digits, '_', '.', '-', "
                             f"starting with a letter or digit")
        check_shaping(rate_bits_per_second, delay_seconds)
        self.prefix = prefix
        self.rate_bits_per_second = float(rate_bits_per_second)
        self.delay_seconds = float(delay_seconds)
        self.stop_timeout_seconds = stop_timeout_seconds
        self.namespaces: dict[Side, str] = {"host": f"{prefix}-host", "switch": f"{prefix}-switch"}
        short = prefix[:IFNAME_MAX - 2]
        self.ifnames: dict[Side, str] = {"host": f"{short}-h", "switch": f"{short}-s"}
        self._children: list[subprocess.Popen] = []
        self._delayers: dict[Side, tuple[subprocess.Popen, int]] = {}  # without netem: process, queue number

    @property
    def host_address(self) -> str:
        return ADDRESSES["host"]

    @property
    def switch_address(self) -> str:
        return ADDRESSES["switch"]

    def netns_path(self, side: Side) -> str:
        return f"{netns.NETNS_RUN_DIR}/{self.namespaces[side]}"

    def _exists(self, side: Side) -> bool:
        return self.namespaces[side] in netns.listnetns()

    def _ipr(self, side: Side) -> IPRoute:
        return IPRoute(netns=self.namespaces[side], flags=0)  # flags=0: never create a namespace by looking

    # -- up, shape, down ---------------------------------------------------------------------------

    def up(self) -> None:
        """Creates the namespaces, the veth pair, its two addresses and the shaping; first removes
        whatever a previous run with this prefix left.  On any failure (Ctrl-C too) it removes what
        it made and raises."""
        require_root()
        self.down()
        try:
            for side in SIDES:
                self._create_namespace(self.namespaces[side])
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.ifnames["host"], kind="veth", net_ns_fd=self.namespaces["host"],
                         peer={"ifname": self.ifnames["switch"], "net_ns_fd": self.namespaces["switch"]})
            for side in SIDES:
                with self._ipr(side) as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                    index = ipr.link_lookup(ifname=self.ifnames[side])[0]
                    ipr.link("set", index=index, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [
                        ["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]})  # IN6_ADDR_GEN_MODE_NONE: no fe80:: address
                    ipr.addr("add", index=index, address=ADDRESSES[side], prefixlen=PREFIX_LENGTH)
                    ipr.link("set", index=index, state="up")
            self.shape(self.rate_bits_per_second, self.delay_seconds)
        except BaseException:
            self.down()
            raise

    @staticmethod
    def _create_namespace(name: str) -> None:
        try:
            netns.create(name)
        except Exception as e:  # pyroute2 re-raises the child's error as whatever class it names
            raise FabricError(f"network namespaces are not permitted here: creating {name} failed: {e} "
                              f"(embtier fabric needs CAP_SYS_ADMIN and CAP_NET_ADMIN in the initial user "
                              f"namespace; unprivileged containers do not have them)") from e
        if name not in netns.listnetns():
            raise FabricError(f"network namespaces are not permitted here: {name} was not created")

    def shape(self, rate_bits_per_second: float, delay_seconds: float) -> None:
        """Changes the rate (bit/s) and one-way delay (s) of both ends, live: a change within the same
        structure (delay stays 0, or stays > 0) changes the qdiscs in place and drops nothing.  Where
        the kernel has no netem, the delay goes through netfilter queues (see the module's docstring);
        without those either, a delay raises DelayUnsupported after the rate has changed."""
        check_shaping(rate_bits_per_second, delay_seconds)
        netem = True
        for side in SIDES:
            with self._ipr(side) as ipr:
                netem &= self._shape_end(ipr, ipr.link_lookup(ifname=self.ifnames[side])[0], rate_bits_per_second,
                                         delay_seconds)
        if not netem or self._delayers:
            for side in SIDES:
                self._queue_delay(side, 0.0 if netem else delay_seconds, rate_bits_per_second)
        self.rate_bits_per_second = float(rate_bits_per_second)
        self.delay_seconds = float(delay_seconds)

    @staticmethod
    def _shape_end(ipr: IPRoute, index: int, rate_bits_per_second: float, delay_seconds: float) -> bool:
        """The tbf, and the netem for a delay; False when the delay needs netem and the kernel has none."""
        rate_bytes = rate_bits_per_second / 8
        burst = max(MIN_BURST_BYTES, int(rate_bytes * BURST_SECONDS))
        limit = burst + int(rate_bytes * QUEUE_SECONDS)
        kinds = {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index)}
        if delay_seconds == 0 and "netem" in kinds:
            # tbf's child becomes noop until the tbf below, whose limit makes a new bfifo child
            ipr.tc("del", index=index, handle=NETEM_HANDLE, parent=NETEM_PARENT)
        ipr.tc("replace", "tbf", index, TBF_HANDLE, rate=int(rate_bytes), burst=burst, limit=limit)
        if delay_seconds > 0:
            packets = max(NETEM_MIN_LIMIT_PACKETS, int((limit + rate_bytes * delay_seconds) / MTU_BYTES) + 1)
            try:
                ipr.tc("replace", "netem", index, NETEM_HANDLE, parent=NETEM_PARENT,
                       delay=round(delay_seconds * 1e6), limit=packets)  # in us
            except NetlinkError as e:
                if e.code != errno.ENOENT:
                    raise
                return False
        return True

    def _iptables(self, side: Side, *args: str) -> None:
        """iptables (legacy: the NFQUEUE target of xtables) in the namespace of side."""
        binary = shutil.which("iptables-legacy") or shutil.which("iptables")
        if binary is None:
            raise DelayUnsupported(NO_DELAY + "; iptables is not installed (apt-get install iptables)")
        result = subprocess.run(["nsenter", f"--net={self.netns_path(side)}", binary, "-w", "-t", "mangle", *args],
                                check=False, capture_output=True, text=True)
        if result.returncode != 0:
            failed = f"`iptables {' '.join(args)}` in {self.namespaces[side]} failed: {result.stderr.strip()}"
            if args[0] == "-A":  # the first rule: the kernel may lack the NFQUEUE target
                raise DelayUnsupported(f"{NO_DELAY}; {failed}")
            raise FabricError(f"changing the link delay: {failed}")

    def _queue_delay(self, side: Side, delay_seconds: float, rate_bits_per_second: float) -> None:
        """Without netem: delays the packets side receives by delay_seconds through a netfilter queue
        (see the module's docstring); 0 removes the rule and the process."""
        old = self._delayers.get(side)  # replaced only once the new one is in place
        ifname = self.ifnames[side]
        if delay_seconds > 0:
            queue = 1 - old[1] if old else 0
            packets = max(NETEM_MIN_LIMIT_PACKETS,
                          int(rate_bits_per_second / 8 * (delay_seconds + QUEUE_SECONDS) / MTU_BYTES) + 1)
            proc = self.popen(side, host_client_command("--queue", str(queue), "--seconds", repr(delay_seconds),
                                                        "--max-packets", str(packets), module="embtier_tools.fabric_delay"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.stdout.readline().strip() != "ready":
                stop_process(proc)
                raise DelayUnsupported(NO_DELAY + f"; the netfilter queue refused: {proc.stderr.read().strip()}")
            rule = ["-i", ifname, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]
            if old:
                self._iptables(side, "-R", "PREROUTING", "1", *rule)
            else:
                self._iptables(side, "-A", "PREROUTING", *rule)
            self._delayers[side] = (proc, queue)
        elif old:
            self._iptables(side, "-D", "PREROUTING", "1")
            del self._delayers[side]
        if old:
            time.sleep(self.delay_seconds)  # the packets the old queue holds leave before it closes
            stop_process(old[0])

    def down(self) -> None:
        """Stops every process in the namespaces, removes the veth pair and the namespaces.  Parts
        already gone are skipped; a part that cannot be removed raises FabricError once the rest is."""
        problems: list[str] = []
        for proc in self._children:
            stop_process(proc, self.stop_timeout_seconds)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._children.clear()
        self._delayers.clear()
        present = [side for side in SIDES if self._exists(side)]
        if present:
            require_root()
        for side in present:
            problems += self._kill_namespace_processes(self.namespaces[side])
        for side in present:  # deleting one end deletes both
            try:
                with self._ipr(side) as ipr:
                    found = ipr.link_lookup(ifname=self.ifnames[side])
                    if found:
                        ipr.link("del", index=found[0])
                        break
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    problems.append(f"deleting {self.ifnames[side]} in {self.namespaces[side]}: {e}")
        for side in present:
            try:
                netns.remove(self.namespaces[side])
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"removing namespace {self.namespaces[side]}: {e}")
        if problems:
            raise FabricError("the test bed was not removed completely: " + "; ".join(problems))

    @staticmethod
    def _kill_namespace_processes(name: str, rounds: int = 50) -> list[str]:
        """SIGKILLs what is left in namespace name (children's children, a crashed run's processes)."""
        for _ in range(rounds):
            pids = netns.ns_pids().get(name, [])
            if not pids:
                return []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return [f"processes {netns.ns_pids().get(name, [])} are still in namespace {name}"]

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- processes -----------------------------------------------------------------------------------

    def popen(self, side: Side, args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Starts args inside the namespace of side ("host" or "switch"), in a session of its own
        (so that down() stops its whole process group); popen_kwargs go to subprocess.Popen."""
        if side not in SIDES:
            raise ValueError(f"side {side!r}: expected 'host' or 'switch'")
        if not popen_kwargs.pop("start_new_session", True):
            raise ValueError("popen: processes of the test bed always start a new session")
        if not self._exists(side):
            raise FabricError(f"namespace {self.namespaces[side]} does not exist: bring the test bed up first")
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise FabricError("nsenter (util-linux) is needed to run processes in the test bed's namespaces")
        proc = subprocess.Popen([nsenter, f"--net={self.netns_path(side)}", "--", *args], start_new_session=True,
                                **popen_kwargs)
        self._children.append(proc)
        return proc

    # -- status --------------------------------------------------------------------------------------

    def status(self) -> dict:
        """What exists, per side: namespace, veth end (state, addresses, byte counters), qdiscs with
        their rate and delay, processes; "up" is true when all of it is there and shaped."""
        require_root()
        sides: dict[str, dict] = {}
        for side in SIDES:
            info: dict[str, Any] = {"namespace": self.namespaces[side], "exists": self._exists(side),
                                    "ifname": self.ifnames[side], "link": None, "qdiscs": [], "pids": []}
            if info["exists"]:
                info["pids"] = netns.ns_pids().get(self.namespaces[side], [])
                with self._ipr(side) as ipr:
                    found = ipr.link_lookup(ifname=self.ifnames[side])
                    if found:
                        link = ipr.get_links(found[0])[0]
                        stats = link.get_attr("IFLA_STATS64") or {}
                        info["link"] = {
                            "state": link.get_attr("IFLA_OPERSTATE"),
                            "addresses": [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                                          for a in ipr.get_addr(index=found[0])],
                            "tx_bytes": stats.get("tx_bytes", 0), "rx_bytes": stats.get("rx_bytes", 0)}
                        info["qdiscs"] = [_describe_qdisc(q) for q in ipr.get_qdiscs(found[0])]
            tbf = next((q for q in info["qdiscs"] if q["kind"] == "tbf"), None)
            netem = next((q for q in info["qdiscs"] if q["kind"] == "netem"), None)
            queued = _queue_delay_of(info["pids"])
            info["rate_bits_per_second"] = tbf["rate_bits_per_second"] if tbf else None
            info["delay_seconds"] = netem["delay_seconds"] if netem else queued if queued is not None else \
                (0.0 if tbf else None)
            info["delay_by"] = "netem" if netem else "netfilter queue" if queued is not None else None
            sides[side] = info
        up = all(s["link"] is not None and s["link"]["state"] == "UP" and s["rate_bits_per_second"] is not None
                 for s in sides.values())
        return {"prefix": self.prefix, "up": up, "host_address": self.host_address,
                "switch_address": self.switch_address, **sides}


# -- the pieces of `embtier fabric run` ---------------------------------------------------------------

def host_client_command(*args: str, module: str = "embtier_tools.fabric") -> list[str]:
    """The command line of a client half (`python -m embtier_tools.fabric ...` unless module says)."""
    return [sys.executable, "-m", module, *args]


def run_host_client(bed: TestBed, args: Sequence[str], timeout: float, module: str = "embtier_tools.fabric") -> str:
    """Runs `python -m <module> args...` in the host namespace; its standard output, or
    FabricError with its output when it fails or takes more than timeout seconds."""
    proc = bed.popen("host", host_client_command(*args, module=module), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        out, err = proc.communicate()
        raise FabricError(f"the host client {' '.join(args)} took more than {timeout:g} s:\n{out}{err}") from None
    if proc.returncode != 0:
        raise FabricError(f"the host client {' '.join(args)} exited with {proc.returncode}:\n{out}{err}")
    return out


def start_daemon(bed: TestBed, state_dir: Path, port: int = DAEMON_PORT, extra_args: Sequence[str] = (),
                 timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """embtierd in the switch namespace, listening on <switch address>:port (metrics on the switch's
    loopback), state and log (embtierd.log) in state_dir; returns (its process, its target) once a
    health check from the host namespace, over the veth, says SERVING."""
    target = f"{bed.switch_address}:{port}"
    # the bed's host namespace presents no certificate: peers without an identity may do everything here
    daemon = launch(command(state_dir, [target], f"127.0.0.1:{METRICS_PORT}", "--anonymous-role", "admin",
                            *extra_args), state_dir, target, popen=functools.partial(bed.popen, "switch"))
    proc, log_path = daemon.proc, daemon.log_path
    waiter = bed.popen("host", host_client_command("wait", "--target", target, "--timeout", str(timeout)),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout + 30  # the waiter's own timeout, plus its start
    try:
        while waiter.poll() is None:
            if proc.poll() is not None:
                raise FabricError(f"embtierd exited with {proc.returncode} before serving; its log:\n"
                                  f"{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise FabricError(f"embtierd did not serve on {target} within {timeout:g} s; its log:\n"
                                  f"{log_path.read_text()}")
            time.sleep(0.1)
        output = waiter.communicate()[0]
        if waiter.returncode != 0:
            raise FabricError(f"the health check from {bed.namespaces['host']} failed: {output}; "
                              f"embtierd's log:\n{log_path.read_text()}")
    except BaseException:
        stop_process(waiter)
        stop_process(proc)
        raise
    return proc, target


# -- the client half, run inside the host namespace -----------------------------------------------------

def link_bytes(ifname: str) -> tuple[int, int]:
    """(bytes sent, bytes received) by interface ifname of this process's network namespace."""
    for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]:
        name, _, counters = line.partition(":")
        if name.strip() == ifname:
            fields = counters.split()
            return int(fields[8]), int(fields[0])
    raise FabricError(f"no interface {ifname} in this network namespace")


def _loadgen(args: argparse.Namespace) -> dict:
    from embtier.client import Client

    from .loadgen import LoadGenerator, Workload

    with Client(args.target) as client:
        client.create_table(args.table, args.rows, args.dim, "float32", "uniform", 1)
    results = {}
    for mode in args.modes.split(","):
        workload = Workload({args.table: args.rows}, args.bags, args.pooling_factor, args.alpha, mode == "pooled")
        sent, received = link_bytes(args.ifname)
        start = time.monotonic()
        stats = LoadGenerator(args.target, workload, args.concurrency).run(args.duration)
        seconds = time.monotonic() - start
        sent_after, received_after = link_bytes(args.ifname)
        results[mode] = {"requests": stats.requests, "errors": stats.errors, "rows": stats.rows,
                         "seconds": seconds, "p50_ms": stats.percentile_ms(50), "p99_ms": stats.percentile_ms(99),
                         "host_to_switch_bytes": sent_after - sent, "switch_to_host_bytes": received_after - received}
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from embtier.client import wait_serving

    p = argparse.ArgumentParser(prog="python -m embtier_tools.fabric",
                                description="The client half of the fabric test bed, run in the host namespace.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("wait", help="wait until the daemon's health service says SERVING")
    s.add_argument("--target", required=True)
    s.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("loadgen", help="create a table, run the load generator per mode; one JSON object out")
    s.add_argument("--target", required=True)
    s.add_argument("--ifname", required=True, help="the host end of the veth (its byte counters)")
    s.add_argument("--table", default="fabric")
    s.add_argument("--rows", type=int, default=100_000)
    s.add_argument("--dim", type=int, default=64)
    s.add_argument("--modes", default="pooled,raw", help="comma-separated: pooled (LookupPooled), raw (Lookup)")
    s.add_argument("--duration", type=float, default=5.0, help="seconds per mode")
    s.add_argument("--concurrency", type=int, default=2)
    s.add_argument("--bags", type=int, default=512)
    s.add_argument("--pooling-factor", type=int, default=32)
    s.add_argument("--alpha", type=float, default=1.05)
    args = p.parse_args(argv)
    if args.command == "wait":
        wait_serving(args.target, timeout=args.timeout)
    else:
        print(json.dumps(_loadgen(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
