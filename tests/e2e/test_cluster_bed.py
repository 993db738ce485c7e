"""The cluster test bed (embtier_tools.cluster_bed): real etcd and real embtierd processes on three
hosts, reachable from the root namespace and reaching etcd from their own; a killed daemon is gone
while the others serve, a partitioned host is cut off until healed, a paused etcd answers nothing
until resumed, and down() (also over a crashed run's leftovers) leaves no namespace, veth or process.

Namespace mode needs root; the loopback mode tests run anywhere."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import etcd3gw
import grpc
import psutil
import pytest
from embtier.client import Client, EmbtierClientError
from embtier_tools.cluster_bed import ClusterBed, ClusterBedError, namespaces_unavailable
from pyroute2 import IPRoute, netns

from tests.support import TIER_FLAGS

_SERIAL = itertools.count()

# Run on a host: put argv[3] = argv[4] in the etcd at argv[1], then print the values of argv[3]
# and argv[5] (a key put from elsewhere), one a line.
ETCD_CLIENT = r"""
import sys, etcd3gw
host, port = sys.argv[1].rsplit(":", 1)
c = etcd3gw.client(host=host, port=int(port), timeout=float(sys.argv[2]))
c.put(sys.argv[3], sys.argv[4])
for key in sys.argv[3], sys.argv[5]:
    print(c.get(key)[0].decode())
"""

_NO_NAMESPACES = namespaces_unavailable()
needs_namespaces = pytest.mark.skipif(_NO_NAMESPACES is not None, reason=f"namespace mode: {_NO_NAMESPACES}")


@pytest.fixture
def prefix(tmp_path) -> Iterator[str]:
    """A prefix of this test's own; what the test leaves under it or in tmp_path is removed afterwards."""
    name = f"ecb{os.getpid() % 1000}-{next(_SERIAL)}"
    yield name
    ClusterBed(1, name, tmp_path, netns=_NO_NAMESPACES is None, etcd=False).down()


def etcd_client(endpoint: str, timeout_seconds: float = 5.0) -> etcd3gw.Etcd3Client:
    host, port = endpoint.rsplit(":", 1)
    return etcd3gw.client(host=host, port=int(port), timeout=timeout_seconds)


def assert_reaches_etcd(bed: ClusterBed, i: int) -> None:
    """Host i writes a key and reads it back along with one written from the root namespace."""
    etcd_client(bed.etcd.endpoints[0]).put("/bed/root", "from-root")
    lines = bed.python(i, ETCD_CLIENT, bed.etcd_endpoint(i), "5", f"/bed/host{i}", f"hello-{i}", "/bed/root")
    assert lines.split() == [f"hello-{i}", "from-root"]
    assert etcd_client(bed.etcd.endpoints[0]).get(f"/bed/host{i}") == [f"hello-{i}".encode()]


def assert_serves(target: str) -> None:
    with Client(target, timeout=5) as c:
        assert c.tables() == []


def assert_unavailable(target: str) -> None:
    with Client(target, timeout=2, retries=0) as c, pytest.raises(EmbtierClientError) as failed:
        c.tables()
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE


def prefix_links(prefix: str) -> list[str]:
    with IPRoute() as ipr:
        return [name for link in ipr.get_links() if (name := link.get_attr("IFLA_IFNAME")).startswith(prefix[:11])]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(bed: ClusterBed, pids: list[int]) -> None:
    assert not [name for name in netns.listnetns() if name.startswith(f"{bed.prefix}-")]
    assert not prefix_links(bed.prefix)
    assert not [pid for pid in pids if alive(pid)]
    base = str(bed.base_dir)
    assert not [p.pid for p in psutil.process_iter(["cmdline"])
                if p.pid != os.getpid() and any(base in arg for arg in p.info["cmdline"] or [])]


def start_all(bed: ClusterBed, tmp_path: Path) -> list[int]:
    for i in range(bed.n):
        daemon = bed.start_daemon(i, tmp_path / f"d{i}", TIER_FLAGS)
        assert daemon.target == bed.target(i)
    return [bed.etcd.proc.pid, *(d.proc.pid for d in bed.daemons.values())]


@needs_namespaces
def test_namespace_mode_hosts_serve_reach_etcd_die_partition_and_heal(prefix, tmp_path):
    with ClusterBed(3, prefix, tmp_path, netns=None) as bed:
        assert bed.mode == "netns"
        assert sorted(bed.namespace(i) for i in range(3)) == sorted(
            name for name in netns.listnetns() if name.startswith(f"{prefix}-"))
        assert [bed.address(i) for i in range(3)] == ["169.254.200.2", "169.254.201.2", "169.254.202.2"]
        assert bed.etcd_endpoint(1) == f"169.254.201.1:{bed.etcd.port}"
        assert f"127.0.0.1:{bed.etcd.port}" in bed.etcd.endpoints
        pids = start_all(bed, tmp_path)
        for i in range(3):
            assert_serves(bed.target(i))
            assert_reaches_etcd(bed, i)

        bed.kill(1)
        assert_unavailable(bed.target(1))
        for i in (0, 2):
            assert_serves(bed.target(i))

        bed.partition(2)
        with Client(bed.target(2), timeout=1, retries=0) as c, pytest.raises(EmbtierClientError):
            c.tables()
        with pytest.raises(ClusterBedError):  # nor does host 2 reach etcd
            bed.python(2, ETCD_CLIENT, bed.etcd_endpoint(2), "1", "/bed/cut", "x", "/bed/root", timeout=20)
        assert_serves(bed.target(0))  # the others are untouched
        bed.heal(2)
        assert_serves(bed.target(2))
        assert_reaches_etcd(bed, 2)

        bed.etcd.pause()
        with pytest.raises(etcd3gw.exceptions.Etcd3Exception):
            etcd_client(bed.etcd.endpoints[0], 0.5).get("/bed/root")
        bed.etcd.resume()
        assert etcd_client(bed.etcd.endpoints[0]).get("/bed/root") == [b"from-root"]

        assert bed.stop_daemon(0) == 0, bed.daemons[0].log()
        assert_unavailable(bed.target(0))
    assert_nothing_left(bed, pids)
    bed.down()  # idempotent
    assert_nothing_left(bed, pids)


@needs_namespaces
def test_down_removes_a_crashed_runs_namespaces_veths_and_processes(prefix, tmp_path):
    crashed = ClusterBed(2, prefix, tmp_path, netns=True)
    crashed.up()
    pids = start_all(crashed, tmp_path)
    worker = crashed.popen(1, ["sleep", "300"])  # something else left in a namespace
    # a new bed of the same prefix and base_dir knows nothing of crashed's processes
    ClusterBed(2, prefix, tmp_path, netns=True, etcd=False).down()
    assert_nothing_left(crashed, [*pids, worker.pid])
    for proc in [worker, *(d.proc for d in crashed.daemons.values()), crashed.etcd.proc]:
        proc.wait(timeout=5)


def test_loopback_mode_hosts_serve_reach_etcd_and_die_but_cannot_partition(prefix, tmp_path):
    with ClusterBed(3, prefix, tmp_path, netns=False) as bed:
        assert bed.mode == "loopback"
        assert {bed.address(i) for i in range(3)} == {"127.0.0.1"}
        assert len({bed.target(i) for i in range(3)}) == 3
        assert bed.etcd.endpoints == [bed.etcd_endpoint(0)]
        pids = start_all(bed, tmp_path)
        for i in range(3):
            assert_serves(bed.target(i))
        assert_reaches_etcd(bed, 0)
        bed.kill(0)
        assert_unavailable(bed.target(0))
        assert_serves(bed.target(1))
        with pytest.raises(ClusterBedError, match="namespace mode"):
            bed.partition(1)
    assert_nothing_left(bed, pids)
