"""LookupPooled's offload modes through a real daemon: host, device and switch give the pooled
arrays of a numpy reference (sum, mean, max, weights, empty bags, float16 on the wire), the fabric
accounting of each request equals its closed form, host sends each distinct row once when asked
(the client always asks), and ports show in describe and the metrics."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from embtier.v1 import embtier_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.support import start_daemon

ROWS, DIM = 100_000, 16   # 64-byte rows: 2 MiB of DRAM and of CXL hold 32768 each, the rest is on SCM


def reference(table: np.ndarray, ids, lengths, weights, mode) -> np.ndarray:
    out = np.zeros((lengths.size, table.shape[1]), dtype=np.float64)
    start = 0
    for b, n in enumerate(lengths):
        rows = table[ids[start:start + n]].astype(np.float64)
        if weights is not None:
            rows = rows * weights[start:start + n, None]
        if n:
            out[b] = rows.max(axis=0) if mode == "max" else rows.sum(axis=0) / (n if mode == "mean" else 1)
        start += n
    return out


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("offload") / "s")
    with Client(d.target) as c:
        c.create_table("t", ROWS, DIM, initializer="uniform", seed=5)
        table = c.lookup("t", np.arange(ROWS)).copy()
    yield d, table
    assert d.stop() == 0, d.log()


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_three_modes_pool_like_numpy(daemon, mode, weighted):
    d, table = daemon
    rng = np.random.default_rng(len(mode) + weighted)
    lengths = rng.integers(0, 40, 300).astype(np.int32)
    lengths[[3, 7]] = 0  # empty bags
    ids = rng.integers(0, ROWS, int(lengths.sum()))
    weights = rng.uniform(-1, 1, ids.size).astype(np.float32) if weighted else None
    expected = reference(table, ids, lengths, weights, mode)
    with Client(d.target) as c:
        for offload in ("host", "device", "switch", None):
            got = c.lookup_pooled({"t": (ids, lengths, weights)}, mode=mode, offload=offload)["t"]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"offload {offload}")
            half = c.lookup_pooled({"t": (ids, lengths, weights)}, mode=mode, offload=offload,
                                   wire_dtype="float16")["t"]
            np.testing.assert_allclose(half, expected, rtol=2e-3, atol=2e-3, err_msg=f"offload {offload} fp16")


def test_fabric_bytes_equal_their_closed_form(daemon):
    d, _ = daemon
    # one bag of 3 DRAM rows (ids 0-2), one of 2 SCM rows, one empty bag; a second table-less check
    ids = np.array([0, 1, 2, 90_000, 90_001])
    lengths = np.array([3, 2, 0], dtype=np.int32)
    with Client(d.target) as c:
        _, host = c.lookup_pooled_fabric({"t": (ids, lengths)}, offload="host")
        _, device = c.lookup_pooled_fabric({"t": (ids, lengths)}, offload="device")
        _, switch = c.lookup_pooled_fabric({"t": (ids, lengths)}, offload="switch")
        _, default = c.lookup_pooled_fabric({"t": (ids, lengths)})
    row, partial = DIM * 4, 3 * DIM * 4           # a stored row; a float32 partial over the 3 bags
    assert host.device_link_bytes == {"dram": 3 * row, "scm": 2 * row}
    assert host.host_link_bytes == 5 * DIM * 4    # every row, float32 on the wire
    assert device.device_link_bytes == switch.device_link_bytes == {"dram": partial, "scm": partial}
    assert device.host_link_bytes == 2 * 3 * DIM * 4  # two ports' partials
    assert switch.host_link_bytes == 3 * DIM * 4      # one vector per bag
    assert default.offload == "switch" and host.offload == "host"
    hop = 2 * 40e-9  # the default hop latency, twice
    assert host.modelled_seconds == pytest.approx(hop + 3 * row / 31.5e9 + 5 * DIM * 4 / 63e9)
    assert switch.modelled_seconds == pytest.approx(hop + partial / 31.5e9 + 3 * DIM * 4 / 63e9)


def test_host_offload_sends_each_distinct_row_once(daemon):
    d, table = daemon
    ids = np.array([7, 3, 7, 7, 90_000, 3, 90_000, 11])
    lengths = np.array([4, 0, 4], dtype=np.int32)
    weights = np.linspace(-1, 1, ids.size, dtype=np.float32)
    bag = pb.FeatureBags(table="t", ids=ids.astype("<i8").tobytes(), lengths=lengths.tobytes())
    with Client(d.target) as c:
        got, traffic = c.lookup_pooled_fabric({"t": (ids, lengths, weights)}, offload="host")
        np.testing.assert_allclose(got["t"], reference(table, ids, lengths, weights, "sum"), rtol=1e-5, atol=1e-6)
        assert traffic.host_link_bytes == 4 * DIM * 4  # 4 distinct rows, not 8
        assert traffic.device_link_bytes == {"dram": 3 * DIM * 4, "scm": DIM * 4}
        for distinct in (True, False):
            reply = c.stub.LookupPooled(pb.LookupPooledRequest(features=[bag], offload=pb.HOST, distinct=distinct))
            r = reply.results[0]
            rows = np.frombuffer(r.rows, dtype="<f4").reshape(-1, DIM)
            if distinct:
                np.testing.assert_array_equal(rows, table[[3, 7, 11, 90_000]])
                np.testing.assert_array_equal(np.frombuffer(r.index, dtype="<i4"), [1, 0, 1, 1, 3, 0, 3, 2])
            else:
                np.testing.assert_array_equal(rows, table[ids])
                assert not r.index
        switch = c.stub.LookupPooled(pb.LookupPooledRequest(features=[bag], offload=pb.SWITCH, distinct=True))
        assert not switch.results[0].index and switch.results[0].values  # distinct is HOST's only


def test_ports_show_in_describe_and_metrics_and_bad_offload_is_refused(daemon):
    d, _ = daemon
    with Client(d.target) as c:
        info = c.describe("t")
        assert sorted(info.rows_by_port) == ["cxl0", "cxl1", "cxl2", "cxl3"]
        assert sum(info.rows_by_port.values()) == info.rows_by_tier["cxl"] == 32768
        cxl = {t.name: t for t in c.tiers()}["cxl"]
        assert [(p.name, p.numa_node) for p in cxl.ports] == [(f"cxl{i}", -1) for i in range(4)]
        assert sum(p.capacity_bytes for p in cxl.ports) == cxl.capacity_bytes
        assert sum(p.used_bytes for p in cxl.ports) == cxl.used_bytes > 0
        request = pb.LookupPooledRequest(features=[pb.FeatureBags(table="t", ids=np.arange(3).tobytes(),
                                                                  lengths=np.array([3], np.int32).tobytes())],
                                         offload=7)
        with pytest.raises(EmbtierClientError) as err:
            c._call("LookupPooled", request)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "offload" in err.value.message
        bad = pb.LookupPooledRequest(features=[pb.FeatureBags(table="t", ids=np.arange(3).tobytes(),
                                                              lengths=np.array([2, -1, 2], np.int32).tobytes())],
                                     offload=pb.DEVICE)
        with pytest.raises(EmbtierClientError) as err:
            c._call("LookupPooled", bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "features[0].lengths[1] = -1 is negative" in err.value.message
    text = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("embtier_table_port_rows", (("port", "cxl0"), ("table", "t")))] == info.rows_by_port["cxl0"]
    assert samples[("embtier_fabric_port_capacity_bytes", (("numa_node", "-1"), ("port", "cxl3")))] == \
        cxl.ports[3].capacity_bytes
    assert samples[("embtier_fabric_bytes_total", (("link", "host"), ("offload", "host")))] > 0
    assert any(name == "embtier_fabric_modelled_transfer_seconds_count" for name, _ in samples)
