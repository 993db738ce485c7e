"""The shaped-link test bed (embtier_tools.fabric, `embtier fabric`): two namespaces joined by a veth pair
with exactly two addresses, tc shaping read back two ways, a shaped rate and delay that are real,
`up` over a crashed run's leftovers, a `down` that leaves nothing (processes included), and a real
daemon in the switch namespace serving a real client in the host namespace.

Root only: every test that builds a test bed skips, saying why, where network namespaces cannot be
made.  Each test uses its own prefix and removes its test bed even when it fails.  Traffic goes only
between the two namespaces and over their loopbacks."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from embtier_tools import fabric
from embtier_tools.fabric import DelayUnsupported, FabricError, TestBed

PORT = 5201
_SERIAL = itertools.count()

# The switch side: one connection at a time; "e" echoes one byte per byte, "u<n>" reads n bytes then
# answers one, "d<n>" sends n bytes.
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
print("ready", flush=True)
chunk = bytes(1 << 20)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = c.makefile("rb")
    op = f.readline().split()
    if op[0] == b"e":
        while (b := f.read(1)):
            c.sendall(b)
    elif op[0] == b"u":
        left = int(op[1])
        while left > 0 and (b := f.read(min(left, 1 << 20))):
            left -= len(b)
        c.sendall(b"k")
    else:
        left = int(op[1])
        while left > 0:
            c.sendall(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
    f.close()
    c.close()
"""

# The host side: prints {"rtt_seconds": min of 20 one-byte round trips, "upload_seconds", "download_seconds"}.
CLIENT = r"""
import json, socket, sys, time
host, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def connect(op):
    c = socket.create_connection((host, port), timeout=30)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(op.encode() + b"\n")
    return c
out = {}
c = connect("e")
rtts = []
for _ in range(20):
    t = time.perf_counter()
    c.sendall(b"x")
    assert c.recv(1) == b"x"
    rtts.append(time.perf_counter() - t)
c.close()
out["rtt_seconds"] = min(rtts)
if nbytes:
    c = connect(f"u {nbytes}")
    data = bytes(nbytes)
    t = time.perf_counter()
    c.sendall(data)
    assert c.recv(1) == b"k"
    out["upload_seconds"] = time.perf_counter() - t
    c.close()
    c = connect(f"d {nbytes}")
    t = time.perf_counter()
    got = 0
    while got < nbytes:
        b = c.recv(1 << 20)
        assert b
        got += len(b)
    out["download_seconds"] = time.perf_counter() - t
    c.close()
print(json.dumps(out))
"""

# A real client of the daemon, in the host namespace: numpy in, numpy out, checked against numpy.
DAEMON_CLIENT = r"""
import sys
import numpy as np
from embtier import Client
rng = np.random.default_rng(7)
values = rng.standard_normal((1000, 16)).astype(np.float32)
ids = rng.integers(0, 1000, 300)
lengths = np.array([100, 0, 150, 50], np.int32)
with Client(sys.argv[1]) as c:
    c.create_table("fab", 1000, 16)
    c.write_rows("fab", np.arange(1000), values)
    np.testing.assert_array_equal(c.lookup("fab", ids), values[ids])
    pooled = c.lookup_pooled({"fab": (ids, lengths)})["fab"]
ends = np.cumsum(lengths)
expected = np.stack([values[ids[e - n:e]].sum(axis=0) for e, n in zip(ends, lengths)])
np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)
print("ok", pooled.shape)
"""


def ip_netns_unavailable() -> str | None:
    """Why a test bed cannot be built here, or None."""
    if os.geteuid() != 0:
        return fabric.NEEDS_ROOT
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, util-linux)"
    probe = f"ettprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


@pytest.fixture(scope="module")
def netns_permitted() -> None:
    reason = ip_netns_unavailable()
    if reason is not None:
        pytest.skip(f"the fabric test bed needs network namespaces: {reason}")


@pytest.fixture
def prefix(netns_permitted) -> Iterator[str]:
    """A prefix of this test's own; whatever the test leaves under it is removed afterwards."""
    name = f"ett{os.getpid() % 1000}-{next(_SERIAL)}"
    yield name
    TestBed(name).down()


@pytest.fixture
def make_bed(prefix) -> Iterator[Callable[..., TestBed]]:
    """make_bed(rate, delay): a test bed that is up, and down after the test whatever happens."""
    beds: list[TestBed] = []

    def make(rate_bits_per_second: float = 1e9, delay_seconds: float = 0.0) -> TestBed:
        bed = TestBed(prefix, rate_bits_per_second, delay_seconds)
        beds.append(bed)
        bed.up()
        return bed

    yield make
    for bed in beds:
        bed.down()


def in_netns(bed: TestBed, side: str, *command: str) -> str:
    return subprocess.run(["ip", "netns", "exec", bed.namespaces[side], *command], capture_output=True, text=True,
                          check=True, timeout=30).stdout


def in_netns_pids(name: str) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=True).stdout.split()


def netns_names() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                       check=True).stdout.splitlines() if line.strip()}


def root_ifnames() -> set[str]:
    return {link["ifname"] for link in json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                                                 text=True, check=True).stdout)}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def assert_gone(bed: TestBed) -> None:
    assert not set(bed.namespaces.values()) & netns_names()
    assert not any(Path(bed.netns_path(side)).exists() for side in fabric.SIDES)
    assert not set(bed.ifnames.values()) & root_ifnames()
    status = bed.status()
    assert not status["up"] and not status["host"]["exists"] and not status["switch"]["exists"]


def measure(bed: TestBed, nbytes: int) -> dict:
    """Round trip, upload (host -> switch) and download (switch -> host) times over the veth."""
    server = bed.popen("switch", [sys.executable, "-c", SERVER, bed.switch_address, str(PORT)],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = bed.popen("host", [sys.executable, "-c", CLIENT, bed.switch_address, str(PORT), str(nbytes)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        return json.loads(out)
    finally:
        fabric.stop_process(server)
        server.stdout.close()


def test_up_makes_two_namespaces_one_veth_two_addresses_and_shapes_both_ends(make_bed):
    bed = make_bed(100e6)
    assert set(bed.namespaces.values()) <= netns_names()
    assert not set(bed.ifnames.values()) & root_ifnames()  # the veth lives only in the namespaces
    status = bed.status()
    assert status["up"]
    for side, address in (("host", "169.254.100.1/30"), ("switch", "169.254.100.2/30")):
        links = json.loads(in_netns(bed, side, "ip", "-j", "addr", "show"))
        addresses = {link["ifname"]: sorted(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"])
                     for link in links}
        assert set(addresses) == {"lo", bed.ifnames[side]}, addresses
        assert "127.0.0.1/8" in addresses["lo"] and set(addresses["lo"]) <= {"127.0.0.1/8", "::1/128"}, addresses
        assert addresses[bed.ifnames[side]] == [address], addresses
        assert status[side]["link"]["addresses"] == [address]
        assert status[side]["link"]["state"] == "UP"
        assert status[side]["rate_bits_per_second"] == 100e6
        assert status[side]["delay_seconds"] == 0
        [tbf] = status[side]["qdiscs"]
        assert (tbf["kind"], tbf["handle"], tbf["parent"]) == ("tbf", "1:", "root")
        assert tbf["burst_bytes"] >= fabric.MIN_BURST_BYTES - 64  # the kernel keeps it in 64 ns ticks
        [shown] = json.loads(in_netns(bed, side, "tc", "-j", "qdisc", "show", "dev", bed.ifnames[side]))
        assert (shown["kind"], shown["handle"], shown.get("root")) == ("tbf", "1:", True)
        assert shown["options"]["rate"] * 8 == 100e6
        assert abs(shown["options"]["burst"] - tbf["burst_bytes"]) <= 64


def test_a_shaped_rate_is_real_both_ways_and_changes_live(make_bed):
    rate, nbytes = 100e6, 3_000_000
    bed = make_bed(rate)
    first = measure(bed, nbytes)
    ideal = nbytes * 8 / rate  # 0.24 s; the 128 KiB bucket lets about 4 % through at once
    assert first["upload_seconds"] >= 0.8 * ideal, first
    assert first["download_seconds"] >= 0.8 * ideal, first
    assert first["upload_seconds"] < 10 * ideal and first["download_seconds"] < 10 * ideal, first
    assert first["rtt_seconds"] < 0.05, first
    bed.shape(25e6, 0)
    assert bed.status()["switch"]["rate_bits_per_second"] == 25e6
    slower = measure(bed, nbytes // 3)
    ideal = nbytes // 3 * 8 / 25e6  # 0.32 s
    assert slower["upload_seconds"] >= 0.8 * ideal, slower
    assert slower["download_seconds"] >= 0.8 * ideal, slower


def test_a_delay_is_real_and_changes_live(prefix):
    """A 20 ms one-way delay by netem, or by netfilter queues on kernels without netem: the round trip
    takes 40 ms, bulk transfers still fill the link (no small-queue throttling), the delay changes and
    goes away live."""
    bed = TestBed(prefix, 1e9, 0.020)
    try:
        bed.up()
    except DelayUnsupported as e:
        assert bed.namespaces["host"] not in netns_names()  # a failed up() leaves nothing
        pytest.skip(str(e))
    try:
        status = bed.status()
        by = status["host"]["delay_by"]
        for side in fabric.SIDES:
            assert status[side]["rate_bits_per_second"] == 1e9
            assert abs(status[side]["delay_seconds"] - 0.020) < 1e-4
            assert status[side]["delay_by"] == by
            kinds = [q["kind"] for q in json.loads(in_netns(bed, side, "tc", "-j", "qdisc", "show", "dev",
                                                            bed.ifnames[side]))]
            assert kinds == (["tbf", "netem"] if by == "netem" else ["tbf"]), kinds
            if by == "netfilter queue":
                rules = in_netns(bed, side, "iptables-legacy", "-t", "mangle", "-S", "PREROUTING")
                assert f"-A PREROUTING -i {bed.ifnames[side]} -j NFQUEUE --queue-num 0 --queue-bypass" in rules
        delayed = measure(bed, 4_000_000)
        assert 0.040 <= delayed["rtt_seconds"] < 0.5, delayed
        # 4 MB at 1 Gbit/s is 32 ms on the wire; with slow start over a 40 ms round trip about 0.4 s
        assert delayed["upload_seconds"] < 2.0 and delayed["download_seconds"] < 2.0, delayed
        bed.shape(1e9, 0.005)
        assert abs(bed.status()["switch"]["delay_seconds"] - 0.005) < 1e-4
        assert 0.010 <= measure(bed, 0)["rtt_seconds"] < 0.040
        bed.shape(1e9, 0)
        status = bed.status()
        assert status["host"]["delay_seconds"] == status["switch"]["delay_seconds"] == 0
        assert measure(bed, 0)["rtt_seconds"] < 0.010
        if by == "netfilter queue":
            assert "NFQUEUE" not in in_netns(bed, "host", "iptables-legacy", "-t", "mangle", "-S", "PREROUTING")
            assert not any("embtier_tools.fabric_delay" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
                           for side in fabric.SIDES for pid in status[side]["pids"] if Path(f"/proc/{pid}").exists())
    finally:
        bed.down()


def test_up_over_a_crashed_runs_leftovers(prefix):
    crashed = TestBed(prefix, 1e9)
    crashed.up()
    orphan = subprocess.Popen(["ip", "netns", "exec", crashed.namespaces["switch"], "sleep", "300"])
    try:
        for _ in range(100):  # until it is in the namespace
            if str(orphan.pid) in in_netns_pids(crashed.namespaces["switch"]):
                break
            time.sleep(0.05)
        again = TestBed(prefix, 200e6)  # a new run knows nothing of the old one
        again.up()
        assert orphan.wait(timeout=10) != 0  # the crashed run's process was in the namespace
        assert again.status()["up"] and again.status()["host"]["rate_bits_per_second"] == 200e6
        again.up()  # up twice in a row
        assert again.status()["up"]
        again.down()
        for side in fabric.SIDES:  # a crash right after the namespaces were made
            subprocess.run(["ip", "netns", "add", again.namespaces[side]], check=True)
        again.up()
        assert measure(again, 0)["rtt_seconds"] < 0.05
    finally:
        orphan.kill()
        orphan.wait()


def test_down_removes_everything_processes_included_and_is_idempotent(make_bed):
    bed = make_bed()
    child = bed.popen("host", ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    escaper = bed.popen("switch", ["sh", "-c", "setsid sleep 300 & echo $!"], stdout=subprocess.PIPE, text=True)
    escaped = int(escaper.stdout.readline())  # in a session of its own: only the namespace still holds it
    assert alive(grandchild) and alive(escaped)
    bed.down()
    assert child.poll() is not None and escaper.poll() is not None
    assert not alive(grandchild) and not alive(escaped)
    assert_gone(bed)
    bed.down()
    assert_gone(bed)


def test_with_block_brings_the_bed_down_on_errors_and_ctrl_c(prefix):
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), TestBed(prefix, 1e9) as bed:
            assert bed.status()["up"]
            raise error("stop")
        assert_gone(bed)


def test_a_daemon_in_the_switch_namespace_serves_a_client_in_the_host_namespace(make_bed, tmp_path):
    bed = make_bed(1e9)
    daemon, target = fabric.start_daemon(bed, tmp_path, extra_args=["--dram-bytes", "16M", "--cxl-bytes", "16M",
                                                                    "--scm-bytes", "64M"])
    assert target == f"{bed.switch_address}:{fabric.DAEMON_PORT}"
    sent_before = bed.status()["host"]["link"]["tx_bytes"]
    client = bed.popen("host", [sys.executable, "-c", DAEMON_CLIENT, target], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, f"{out}{err}\n{(tmp_path / 'embtierd.log').read_text()}"
    assert out.startswith("ok")
    assert bed.status()["host"]["link"]["tx_bytes"] - sent_before > 1000 * 16 * 4  # the rows crossed the veth
    fabric.stop_process(daemon, timeout=20)
    assert daemon.returncode == 0, (tmp_path / "embtierd.log").read_text()


def test_cli_up_status_down(prefix):
    def embtier(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "embtier.cli", "fabric", *args], check=False,
                              capture_output=True, text=True, timeout=60)

    up = embtier("up", "--prefix", prefix, "--rate", "250mbit")
    assert up.returncode == 0, up.stderr
    assert f"ip netns exec {prefix}-switch" in up.stdout and "169.254.100.2" in up.stdout
    status = json.loads(embtier("status", "--prefix", prefix, "--json").stdout)
    assert status["up"] and status["host"]["rate_bits_per_second"] == 250e6
    assert "tbf 1: parent root rate 250 Mbit/s" in embtier("status", "--prefix", prefix).stdout
    assert embtier("down", "--prefix", prefix).returncode == 0
    assert not json.loads(embtier("status", "--prefix", prefix, "--json").stdout)["host"]["exists"]
    bad = embtier("up", "--prefix", prefix, "--rate", "fast")
    assert bad.returncode == 1 and "cannot read 'fast' as a rate" in bad.stderr


def test_cli_run_serves_the_load_generator_over_the_link_and_tears_down(prefix):
    run = subprocess.run([sys.executable, "-m", "embtier.cli", "fabric", "run", "--prefix", prefix, "--rate", "1gbit",
                          "--duration", "1", "--rows", "10000", "--bags", "64"], check=False, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    table = [line.split() for line in run.stdout.splitlines()]
    rows = {fields[0]: fields for fields in table if fields[:1] in (["pooled"], ["raw"])}
    assert set(rows) == {"pooled", "raw"}, run.stdout
    for fields in rows.values():
        assert int(fields[1]) > 0 and fields[2] == "0", run.stdout  # requests, errors
    assert not {f"{prefix}-host", f"{prefix}-switch"} & netns_names()


@pytest.mark.parametrize("text, bits", [("1gbit", 1e9), ("10gbit", 10e9), ("25gbit", 25e9), ("100mbit", 100e6),
                                        ("25G", 25e9), ("1e9", 1e9)])
def test_parse_rate(text, bits):
    assert fabric.parse_rate(text) == bits


@pytest.mark.parametrize("text, seconds", [("50us", 50e-6), ("1ms", 1e-3), ("0", 0.0), ("0.5s", 0.5)])
def test_parse_delay(text, seconds):
    assert fabric.parse_delay(text) == pytest.approx(seconds)


def test_not_root_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(FabricError, match=r"embtier fabric needs root \(network namespaces, tc\)"):
        TestBed("ettnoroot").up()
