"""The daemon end to end: a real embtierd process, real gRPC over a Unix
socket and TCP, results against numpy, every bad input's status code."""

from __future__ import annotations

import re
import threading

import grpc
import numpy as np
import psutil
import pytest
from embtier import Client, EmbtierClientError
from embtier.v1 import embtier_pb2 as pb
from embtier.v1 import embtier_pb2_grpc as pb_grpc

from tests.support import credentialed_channel, start_daemon


@pytest.fixture(scope="module")
def client(daemon):
    with Client(daemon.target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(daemon):
    with credentialed_channel(daemon.target) as channel:
        yield pb_grpc.EmbeddingStoreStub(channel)


def pool_reference(rows, ids, lengths, weights, mode):
    out = np.zeros((len(lengths), rows.shape[1]))
    start = 0
    for b, n in enumerate(lengths):
        picked = rows[ids[start:start + n]].astype(np.float64)
        if weights is not None:
            picked *= weights[start:start + n, None]
        if n:
            out[b] = picked.max(0) if mode == "max" else picked.sum(0) / (n if mode == "mean" else 1)
        start += n
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_rows_and_pooling_match_numpy(client, dtype):
    name = f"t_{dtype}"
    info = client.create_table(name, 150_000, 24, dtype=dtype)  # larger than DRAM + CXL: all three tiers
    assert all(info.rows_by_tier[t] > 0 for t in ("dram", "cxl", "scm"))
    rng = np.random.default_rng(1)
    values = rng.standard_normal((150_000, 24), dtype=np.float32)
    version = client.write_rows(name, np.arange(150_000), values)
    stored = client.lookup(name, np.arange(150_000))
    tol = {"float32": 0, "float16": 2e-3, "int8": 0.02}[dtype]
    np.testing.assert_allclose(stored, values, atol=tol * 4, rtol=tol)
    ids = rng.integers(0, 150_000, 3000)
    lengths = rng.integers(0, 20, 300).astype(np.int32)
    lengths[-1] += 3000 - lengths.sum()
    weights = rng.uniform(0, 1, 3000).astype(np.float32)
    for mode in ("sum", "mean", "max"):
        got = client.lookup_pooled({name: (ids, lengths, weights)}, mode=mode)[name]
        np.testing.assert_allclose(got, pool_reference(stored, ids, lengths, weights, mode), rtol=1e-5, atol=1e-4)
    half = client.lookup(name, ids[:100], wire_dtype="float16")
    np.testing.assert_allclose(half, stored[ids[:100]], rtol=1e-3, atol=1e-3)
    assert client.describe(name).version == version
    client.drop_table(name)  # gives DRAM and CXL back to the next dtype


def test_several_tables_in_one_call(client):
    a = client.create_table("multi_a", 1000, 8, initializer="uniform", seed=1)
    b = client.create_table("multi_b", 500, 16, initializer="uniform", seed=2)
    rows_a, rows_b = client.lookup("multi_a", np.arange(1000)), client.lookup("multi_b", np.arange(500))
    ids_a, len_a = np.array([1, 2, 3, 999]), np.array([3, 1], np.int32)
    ids_b, len_b = np.array([7, 7, 400]), np.array([0, 3], np.int32)
    got = client.lookup_pooled({"multi_a": (ids_a, len_a), "multi_b": (ids_b, len_b)})
    assert list(got) == ["multi_a", "multi_b"] and a.dim == 8 and b.dim == 16
    np.testing.assert_allclose(got["multi_a"], pool_reference(rows_a, ids_a, len_a, None, "sum"), rtol=1e-6)
    np.testing.assert_allclose(got["multi_b"], pool_reference(rows_b, ids_b, len_b, None, "sum"), rtol=1e-6)


def test_table_lifecycle_and_tiers(client):
    client.create_table("life", 100, 4)
    assert "life" in [t.name for t in client.tables()]
    client.write_rows("life", [1, 2], np.ones((2, 4)), add=True, scale=2.0)
    np.testing.assert_array_equal(client.lookup("life", [1, 2, 3]), [[2] * 4, [2] * 4, [0] * 4])
    client.drop_table("life")
    assert "life" not in [t.name for t in client.tables()]
    tiers = {t.name: t for t in client.tiers()}
    assert tiers["cxl"].emulated and tiers["dram"].capacity_bytes == 2 << 20 and tiers["scm"].path.endswith(".dat")


def ids(*v):
    return np.array(v, dtype=np.int64).tobytes()


def floats(*v):
    return np.array(v, dtype=np.float32).tobytes()


BAD_REQUESTS = [
    ("Lookup", pb.LookupRequest(table="nope", ids=ids(1)), grpc.StatusCode.NOT_FOUND, "table 'nope' does not exist"),
    ("Lookup", pb.LookupRequest(table="bad", ids=ids(0, 100)), grpc.StatusCode.INVALID_ARGUMENT,
     r"ids\[1\] = 100 is out of range \[0, 100\)"),
    ("Lookup", pb.LookupRequest(table="bad", ids=ids(-3)), grpc.StatusCode.INVALID_ARGUMENT, r"ids\[0\] = -3"),
    ("Lookup", pb.LookupRequest(table="bad", ids=b"\x01\x02\x03"), grpc.StatusCode.INVALID_ARGUMENT,
     "ids has 3 bytes, not a whole number of int64"),
    ("Lookup", pb.LookupRequest(table="bad", ids=ids(1), wire_dtype=pb.INT8), grpc.StatusCode.INVALID_ARGUMENT,
     r"wire_dtype = INT8 \(2\) is not allowed here; use FLOAT32 or FLOAT16"),
    ("Lookup", pb.LookupRequest(table="bad", ids=ids(1), id_type=5), grpc.StatusCode.INVALID_ARGUMENT,
     "id_type = 5 is not a value of IdType; use INT64 or INT32"),
    ("Checkpoint", pb.CheckpointRequest(kind=42), grpc.StatusCode.INVALID_ARGUMENT,
     "kind = 42 is not a value of CheckpointKind; use FULL, INCREMENTAL, DIFFERENTIAL or AUTO"),
    ("Checkpoint", pb.CheckpointRequest(quantizer=42), grpc.StatusCode.INVALID_ARGUMENT,
     "quantizer = 42 is not a value of Quantizer; use ADAPTIVE or MINMAX"),
    ("LookupPooled", pb.LookupPooledRequest(offload=7, features=[pb.FeatureBags(
        table="bad", ids=ids(1), lengths=np.array([1], np.int32).tobytes())]),
     grpc.StatusCode.INVALID_ARGUMENT, "offload = 7 is not a value of Offload; use HOST, DEVICE or SWITCH"),
    ("WriteRows", pb.WriteRowsRequest(table="bad", ids=ids(1), values=b"\0" * 16, mode=3),
     grpc.StatusCode.INVALID_ARGUMENT, "mode = 3 is not a value of WriteMode; use ASSIGN or ADD"),
    ("CreateTable", pb.CreateTableRequest(name="k", num_rows=10, dim=4, key_space=7), grpc.StatusCode.INVALID_ARGUMENT,
     ("key_space = 7 is not a value of KeySpace; use KEY_SPACE_DENSE, KEY_SPACE_HASHED, KEY_SPACE_MANAGED or "
      "KEY_SPACE_MAPPED")),
    ("CreateTable", pb.CreateTableRequest(name="k", num_rows=10, dim=4, key_space=pb.KEY_SPACE_MANAGED,
                                          default_value=float("nan")), grpc.StatusCode.INVALID_ARGUMENT,
     "default_value must be finite, got nan"),
    ("CreateTable", pb.CreateTableRequest(name="k", num_rows=10, dim=4, key_space=pb.KEY_SPACE_MANAGED,
                                          default_value=float("-inf")), grpc.StatusCode.INVALID_ARGUMENT,
     "default_value must be finite, got -inf"),
    ("CreateTable", pb.CreateTableRequest(name="k", num_rows=10, dim=4, key_space=pb.KEY_SPACE_MANAGED, key_seed=5),
     grpc.StatusCode.INVALID_ARGUMENT, "key_seed = 5 applies to hashed and mapped tables only; this one is managed"),
    ("CreateTable", pb.CreateTableRequest(name="k", num_rows=10, dim=4, default_value=2.5),
     grpc.StatusCode.INVALID_ARGUMENT, r"default_value = 2.5 applies to managed tables only"),
    ("CreateTable", pb.CreateTableRequest(name="init", num_rows=10, dim=4, initializer=9),
     grpc.StatusCode.INVALID_ARGUMENT, "initializer = 9 is not a value of Initializer; use ZEROS or UNIFORM"),
    ("LookupPooled", pb.LookupPooledRequest(features=[pb.FeatureBags(
        table="bad", ids=ids(1, 2), lengths=np.array([3], np.int32).tobytes())]),
     grpc.StatusCode.INVALID_ARGUMENT, "lengths sum to 3 but 2 ids"),
    ("LookupPooled", pb.LookupPooledRequest(features=[pb.FeatureBags(
        table="bad", ids=ids(1, 2), lengths=np.array([2], np.int32).tobytes(), weights=b"\0" * 4)]),
     grpc.StatusCode.INVALID_ARGUMENT, "weights has 1 entries but ids has 2"),
    ("LookupPooled", pb.LookupPooledRequest(mode=9, features=[pb.FeatureBags(
        table="bad", ids=ids(1), lengths=np.array([1], np.int32).tobytes())]),
     grpc.StatusCode.INVALID_ARGUMENT, "mode = 9"),
    ("WriteRows", pb.WriteRowsRequest(table="bad", ids=ids(1, 2), values=b"\0" * 12), grpc.StatusCode.INVALID_ARGUMENT,
     r"values has 3 floats; expected 2 ids x dim 4 = 8"),
    ("WriteRows", pb.WriteRowsRequest(table="bad", ids=ids(100), values=b"\0" * 16), grpc.StatusCode.INVALID_ARGUMENT,
     r"ids\[0\] = 100 is out of range"),
    ("WriteRows", pb.WriteRowsRequest(table="bad", ids=ids(1, 2), values=floats(0, 1, 2, 3, 4, 5, np.nan, np.inf)),
     grpc.StatusCode.INVALID_ARGUMENT, r"^values\[1, 2\] = nan is not finite$"),
    ("WriteRows", pb.WriteRowsRequest(table="bad", ids=ids(1), values=floats(1, -np.inf, 0, 0), mode=pb.ADD),
     grpc.StatusCode.INVALID_ARGUMENT, r"^values\[0, 1\] = -inf is not finite$"),
    ("CreateTable", pb.CreateTableRequest(name="bad", num_rows=10, dim=4), grpc.StatusCode.ALREADY_EXISTS,
     "table 'bad' already exists"),
    ("CreateTable", pb.CreateTableRequest(name="zero", num_rows=0, dim=4), grpc.StatusCode.INVALID_ARGUMENT,
     "num_rows must be in"),
    ("CreateTable", pb.CreateTableRequest(name="dt", num_rows=10, dim=4, dtype=5), grpc.StatusCode.INVALID_ARGUMENT,
     "dtype = 5"),
    ("CreateTable", pb.CreateTableRequest(name="huge", num_rows=1 << 29, dim=64),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "table 'huge' needs about"),
    ("DropTable", pb.DropTableRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "does not exist"),
]


@pytest.fixture(scope="module")
def bad_table(client):
    client.create_table("bad", 100, 4, initializer="uniform", seed=9)
    return client.lookup("bad", np.arange(100))


@pytest.mark.parametrize("method, request_, code, message", BAD_REQUESTS,
                         ids=[f"{m}-{c.name}-{i}" for i, (m, _, c, _) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_its_status_and_the_daemon_serves_on(client, stub, bad_table, method, request_, code,
                                                            message):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert err.value.details() and re.search(message, err.value.details()), err.value.details()
    np.testing.assert_array_equal(client.lookup("bad", np.arange(100)), bad_table)  # nothing written, still up


UNSTORABLE = [  # (table dtype, values of a write of rows 3 and 7, dim 4, the message)
    ("float16", [[0, 1, 2, 65504], [-65504, 70000, 2, 3]],
     r"^values\[1, 1\] = 70000.0 does not fit float16 \(largest 65504\)$"),
    ("float16", [[0, 1, 2, 3], [0, 1, np.inf, 70000]], r"^values\[1, 2\] = inf is not finite$"),
    ("int8", [[0, 1, 2, 3], [-2e38, 0, 2e38, 1]],
     (r"^values\[1\] ranges from -2e\+38 \(values\[1, 0\]\) to 2e\+38 \(values\[1, 2\]\): "
      r"an int8 row's max - min must be finite in float32")),
    ("int8", [[0, np.nan, 2, 3], [0, 0, 0, 0]], r"^values\[0, 1\] = nan is not finite$"),
    ("float32", [[0, 1, 2, 3], [3e38, -3e38, -np.inf, 0]], r"^values\[1, 2\] = -inf is not finite$"),
]


@pytest.fixture(scope="module")
def unstorable_tables(client):
    for dtype in ("float32", "float16", "int8"):
        client.create_table(f"store_{dtype}", 10, 4, dtype=dtype, initializer="uniform", seed=4)


@pytest.mark.parametrize("dtype, values, message", UNSTORABLE, ids=[f"{d}-{i}" for i, (d, _, _) in
                                                                      enumerate(UNSTORABLE)])
def test_a_value_the_table_cannot_store_is_refused_and_nothing_is_written(daemon, client, stub, unstorable_tables,
                                                                         dtype, values, message):
    table = f"store_{dtype}"
    before, version = client.lookup(table, np.arange(10)), client.describe(table).version
    with pytest.raises(grpc.RpcError) as err:
        stub.WriteRows(pb.WriteRowsRequest(table=table, ids=ids(3, 7), values=floats(*np.ravel(values))), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert re.search(message, err.value.details()), err.value.details()
    np.testing.assert_array_equal(client.lookup(table, np.arange(10)), before)
    assert client.describe(table).version == version
    assert "RuntimeWarning" not in daemon.log() and "Traceback" not in daemon.log()


def test_values_at_the_edge_of_a_dtype_are_stored(daemon, client, unstorable_tables):
    """65504 into float16, a row spanning float32's largest into int8, and an ADD whose values are past
    float16's largest but whose scaled sum fits: written, read back finite."""
    client.write_rows("store_float16", [0], np.array([[65504, -65504, 0, 1]], np.float32))
    np.testing.assert_array_equal(client.lookup("store_float16", [0]), [[65504, -65504, 0, 1]])
    big = float(np.finfo(np.float32).max)
    client.write_rows("store_int8", [0], np.array([[big, 0, -1, 1e30]], np.float32))
    stored = client.lookup("store_int8", [0])
    assert np.isfinite(stored).all() and stored[0, 0] == pytest.approx(big, rel=1e-6)
    client.write_rows("store_float16", [1], np.zeros((1, 4), np.float32))
    client.write_rows("store_float16", [1], np.full((1, 4), 65536, np.float32), add=True, scale=0.5)
    np.testing.assert_array_equal(client.lookup("store_float16", [1]), np.full((1, 4), 32768))
    assert "RuntimeWarning" not in daemon.log()


def test_client_error_carries_code(client):
    with pytest.raises(EmbtierClientError) as err:
        client.describe("missing")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "does not exist" in err.value.message


def test_tcp_listener(daemon):
    with Client(daemon.tcp) as c:
        assert {t.name for t in c.tiers()} == {"dram", "cxl", "scm"}


def test_concurrent_clients_see_no_wrong_results(daemon, client):
    client.create_table("shared", 8 * 1000, 16)
    errors = []

    def worker(k: int):
        with Client(daemon.target) as c:
            own = np.arange(k * 1000, (k + 1) * 1000)
            rng = np.random.default_rng(k)
            for step in range(15):
                values = np.full((1000, 16), k * 100 + step, dtype=np.float32)
                c.write_rows("shared", own, values)
                got = c.lookup("shared", own)
                if not np.array_equal(got, values):
                    errors.append(f"client {k} step {step}: read back other values")
                picks = rng.integers(0, 8000, 256)  # other clients' rows, written meanwhile
                rows = c.lookup_pooled({"shared": (picks, np.ones(256, np.int32))})["shared"]  # bags of one
                owner, step = np.divmod(rows[:, 0], 100)
                whole = (rows == rows[:, :1]).all(axis=1)
                written = ((owner == picks // 1000) & (step < 15)) | (rows[:, 0] == 0)  # or not written yet
                if not (whole & written).all():
                    errors.append(f"client {k}: a row read whole as a value its writer never wrote")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    final = client.lookup("shared", np.arange(8000))
    np.testing.assert_array_equal(final[:, 0], np.repeat(np.arange(8) * 100 + 14, 1000))


def test_sigterm_under_load_finishes_calls_and_exits_zero(tmp_path):
    d = start_daemon(tmp_path / "s")
    results = {"ok": 0, "unavailable": 0, "other": []}
    lock = threading.Lock()
    with Client(d.target, retries=0) as c:
        c.create_table("load", 20_000, 32, initializer="uniform", seed=3)
        stop = threading.Event()

        def load():
            rng = np.random.default_rng()
            while not stop.is_set():
                try:
                    c.lookup_pooled({"load": (rng.integers(0, 20_000, 4096), np.full(128, 32, np.int32))})
                    key = "ok"
                except EmbtierClientError as e:
                    key = "unavailable" if e.code == grpc.StatusCode.UNAVAILABLE else None
                    if key is None:
                        with lock:
                            results["other"].append(str(e))
                        return
                    stop.set()
                with lock:
                    results[key] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        threading.Event().wait(1.0)
        code = d.stop()
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert code == 0, d.log()
    assert results["other"] == [] and results["ok"] > 0
    assert "stopped" in d.log()


def test_int32_and_int64_ids_give_the_same_rows(client, stub):
    client.create_table("idt", 1000, 8, initializer="uniform", seed=5)
    ids = np.array([3, 999, 3, 0])
    wide = stub.Lookup(pb.LookupRequest(table="idt", ids=ids.astype("<i8").tobytes()), timeout=30)
    narrow = stub.Lookup(pb.LookupRequest(table="idt", ids=ids.astype("<i4").tobytes(), id_type=pb.INT32),
                         timeout=30)
    assert wide.values == narrow.values and narrow.count == 4
    with pytest.raises(grpc.RpcError) as err:  # int32 bytes read as int64: 16 bytes = 2 ids, id 2**32*999+3 too big
        stub.Lookup(pb.LookupRequest(table="idt", ids=ids.astype("<i4").tobytes()), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(pb.LookupRequest(table="idt", ids=b"\0" * 4, id_type=7), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "id_type = 7" in err.value.details()
    np.testing.assert_array_equal(client.lookup("idt", ids), client.lookup("idt", ids.astype(np.int64) + 0))
    with pytest.raises(EmbtierClientError, match=r"ids\[1\] = -1 is out of range"):
        client.lookup("idt", np.array([1, -1]))  # negative ids go as int64, so the daemon names them


def test_a_reply_too_large_to_send_is_refused_before_it_is_built(daemon, client, stub):
    """80 KB of empty bags on a dim-16384 table asked for 1.3 GB of reply: refused up front, the
    daemon's memory untouched."""
    client.create_table("wide", 4, 16384)
    process = psutil.Process(daemon.proc.pid)
    rss = process.memory_info().rss
    empty_bags = np.zeros(20_000, np.int32).tobytes()
    cases = [
        (stub.LookupPooled, pb.LookupPooledRequest(features=[pb.FeatureBags(table="wide", lengths=empty_bags)]),
         "1310720000 bytes of values (switch offload, 4-byte values; the largest is features[0]: 20000 vectors"),
        (stub.LookupPooled, pb.LookupPooledRequest(wire_dtype=pb.FLOAT16, offload=pb.HOST, features=[
            pb.FeatureBags(table="wide", ids=np.zeros(5000, np.int64).tobytes(),
                           lengths=np.array([5000], np.int32).tobytes())] * 2),  # each under the limit, not both
         "327680000 bytes of values (host offload, 2-byte values"),
        (stub.Lookup, pb.LookupRequest(table="wide", ids=np.zeros(5000, np.int64).tobytes()),
         "327680000 bytes of values (5000 rows x dim 16384 x 4 bytes)"),
    ]
    for call, request, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert message in err.value.details() and "server.max_message_bytes = 268435456" in err.value.details()
    assert process.memory_info().rss - rss < 64 << 20
    pooled = client.lookup_pooled({"wide": (np.arange(4), np.array([2, 2], np.int32))})["wide"]  # still serving
    assert pooled.shape == (2, 16384)
    client.drop_table("wide")


def test_distinct_lookup_sends_each_row_once(client, stub):
    client.create_table("distinct", 5000, 8, initializer="uniform", seed=3)
    table = client.lookup("distinct", np.arange(5000))
    ids = np.random.default_rng(4).zipf(1.3, 4000) % 5000
    rows, index = client.lookup_distinct("distinct", ids)
    want = np.unique(ids)
    assert rows.shape == (want.size, 8) and index.dtype == np.int32 and index.shape == ids.shape
    np.testing.assert_array_equal(rows, table[want])  # ascending id order
    np.testing.assert_array_equal(rows[index], table[ids])
    reply = stub.Lookup(pb.LookupRequest(table="distinct", ids=ids.astype("<i8").tobytes(), distinct=True))
    plain = stub.Lookup(pb.LookupRequest(table="distinct", ids=ids.astype("<i8").tobytes()))
    assert reply.count == want.size and len(reply.values) == want.size * 8 * 4 < len(plain.values) / 2
    empty = stub.Lookup(pb.LookupRequest(table="distinct", ids=b"", distinct=True))
    assert (empty.count, empty.values, empty.index) == (0, b"", b"")
    with pytest.raises(EmbtierClientError) as e:
        client.lookup_distinct("distinct", [1, 5000])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "5000" in e.value.message
    client.drop_table("distinct")
