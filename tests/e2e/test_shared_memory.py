"""Same-host shared memory (server.shared_memory): a real daemon, its real side socket, real memfds.

The client uses it on its own on the Unix socket and gets what the wire gives; it is off unless
enabled; registrations are checked (a sealed memfd of the caller's own, of an allowed size), every
slice is checked (region, token, bounds, element size) with a message that names the field; a
region goes with its connection; the daemon keeps serving after every refusal."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import time

import grpc
import numpy as np
import pytest
from embtier import Client
from embtier.client import EmbtierClientError
from embtier.shm import SharedMemory, SharedMemoryError, side_socket
from embtier.v1 import embtier_pb2 as pb
from embtier.v1 import embtier_pb2_grpc as pb_grpc
from embtier.wire import SHM_MESSAGE_BYTES

from tests.support import start_daemon

ROWS, DIM = 1000, 16


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    state = tmp_path_factory.mktemp("shm")
    config = state / "embtierd.toml"
    config.write_text("[tiering]\nenabled = false\n[server]\nshared_memory_max_bytes = \"8M\"\n")
    d = start_daemon(state, "--shared-memory", config=config)
    values = np.random.default_rng(0).standard_normal((ROWS, DIM), dtype=np.float32)
    with Client(d.target, shared_memory=False) as c:
        c.create_table("f32", ROWS, DIM)
        c.write_rows("f32", np.arange(ROWS), values)
        c.create_table("f16", ROWS, DIM, dtype="float16")
        c.write_rows("f16", np.arange(ROWS), values)
    d.values = values
    yield d
    assert d.stop() == 0, d.log()


def reference(values: np.ndarray, ids, lengths, weights=None, mode="sum") -> np.ndarray:
    out, start = [], 0
    for n in lengths:
        rows = values[ids[start:start + n]].astype(np.float64)
        if weights is not None:
            rows = rows * weights[start:start + n, None]
        out.append(np.zeros(values.shape[1]) if n == 0 else
                   rows.max(axis=0) if mode == "max" else rows.sum(axis=0) / (n if mode == "mean" else 1))
        start += n
    return np.array(out, dtype=np.float32)


def test_the_client_uses_shared_memory_on_the_unix_socket_and_gets_what_the_wire_gives(daemon):
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 40, 300).astype(np.int32)
    ids = rng.integers(0, ROWS, int(lengths.sum()))
    weights = rng.random(ids.size, dtype=np.float32)
    f16 = daemon.values.astype(np.float16).astype(np.float32)
    with Client(daemon.target) as shared, Client(daemon.target, shared_memory=False) as wire:
        assert shared.shared_memory is not None and wire.shared_memory is None
        for mode in ("sum", "mean", "max"):
            features = {"f32": (ids, lengths, weights), "f16": (ids[::-1].copy(), lengths)}
            got, traffic, unknown = shared.lookup_pooled_counted(features, mode)
            want = wire.lookup_pooled(features, mode)
            np.testing.assert_array_equal(got["f32"], want["f32"])
            np.testing.assert_array_equal(got["f16"], want["f16"])
            np.testing.assert_allclose(got["f32"], reference(daemon.values, ids, lengths, weights, mode), rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(got["f16"], reference(f16, ids[::-1], lengths, None, mode), rtol=1e-5,
                                       atol=1e-5)
            assert traffic.offload == "switch" and unknown == {"f32": 0, "f16": 0}
        half = shared.lookup_pooled({"f32": (ids, lengths)}, wire_dtype="float16")["f32"]
        np.testing.assert_array_equal(half, wire.lookup_pooled({"f32": (ids, lengths)}, wire_dtype="float16")["f32"])
        regions = shared.shared_memory.status()
        assert len(regions) == 1 and regions[0]["in_use"] == 0 and regions[0]["bytes"] >= 1 << 20
        with pytest.raises(EmbtierClientError) as err:  # an error of the request itself, as on the wire
            shared.lookup_pooled({"f32": (np.array([ROWS]), np.array([1]))})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and str(ROWS) in err.value.message


def test_shared_memory_is_off_unless_enabled(tmp_path):
    d = start_daemon(tmp_path / "off")
    try:
        with Client(d.target) as c:
            assert c.shared_memory is None  # (the side socket is there for credentials: it registers nothing)
            side = SharedMemory(side_socket(d.target))
            try:
                assert side.credential()["shared_memory"] is False
                with pytest.raises(SharedMemoryError) as refused:
                    side.lease(1 << 20)
                assert refused.value.code == "FAILED_PRECONDITION" and "shared memory is off" in str(refused.value)
            finally:
                side.close()
            c.create_table("t", 10, 4)
            assert c.lookup_pooled({"t": (np.array([1, 2]), np.array([2]))})["t"].shape == (1, 4)
            request = pb.LookupPooledRequest(features=[pb.FeatureBags(
                table="t", lengths=np.array([1], "<i4").tobytes(), ids_shm=pb.SharedSlice(region="r", size=8))])
            with pytest.raises(grpc.RpcError) as err:
                c.stub.LookupPooled(request)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "features[0].ids_shm" in err.value.details() and "shared memory is off" in err.value.details()
        with Client(d.target, shared_memory=True) as c, pytest.raises(EmbtierClientError) as err:
            c.lookup_pooled({"t": (np.array([1]), np.array([1]))})
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(ValueError):
            Client(d.tcp, shared_memory=True)
    finally:
        assert d.stop() == 0, d.log()


def ask(sock: socket.socket, message: dict, fds=()) -> dict:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))
    return json.loads(sock.recv(SHM_MESSAGE_BYTES))


def memfd(nbytes: int, seal: bool = True) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def test_a_registration_is_checked(daemon, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(side_socket(daemon.target)))
    other_uid = memfd(4096)
    os.fchown(other_uid, 65534, 65534)
    plain = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(plain, 4096)
    cases = [({"op": "register", "name": "a"}, [memfd(4096, seal=False)], "INVALID_ARGUMENT", "F_SEAL_SHRINK"),
             ({"op": "register", "name": "a"}, [other_uid], "PERMISSION_DENIED", "uid 65534"),
             ({"op": "register", "name": "a"}, [plain], "INVALID_ARGUMENT", "not a memfd"),
             ({"op": "register", "name": "a"}, [memfd(9 << 20)], "INVALID_ARGUMENT", "8388608"),
             ({"op": "register", "name": "a"}, [memfd(0)], "INVALID_ARGUMENT", "0 bytes"),
             ({"op": "register", "name": "a"}, [], "INVALID_ARGUMENT", "one fd"),
             ({"op": "register", "name": ""}, [memfd(4096)], "INVALID_ARGUMENT", "name"),
             ({"op": "unregister", "name": "nothing"}, [], "NOT_FOUND", "'nothing'"),
             ({"op": "explode"}, [], "INVALID_ARGUMENT", "'explode'")]
    try:
        for message, fds, code, words in cases:
            reply = ask(sock, message, fds)
            assert not reply["ok"] and reply["code"] == code and words in reply["message"], (message, reply)
        good = memfd(4096)
        reply = ask(sock, {"op": "register", "name": "a"}, [good])
        assert reply["ok"] and reply["bytes"] == 4096 and len(reply["token"]) == 32
        again = ask(sock, {"op": "register", "name": "a"}, [memfd(4096)])
        assert again["code"] == "ALREADY_EXISTS"
        assert ask(sock, {"op": "status"})["regions"] == [{"region": "a", "bytes": 4096, "in_use": 0}]
        assert ask(sock, {"op": "unregister", "name": "a"}) == {"ok": True}
        assert ask(sock, {"op": "status"})["regions"] == []
    finally:
        sock.close()
        os.close(plain)
    with Client(daemon.target) as c:  # still serving
        assert c.lookup_pooled({"f32": (np.array([3]), np.array([1]))})["f32"].shape == (1, DIM)


def slice_of(region, offset: int, size: int, token: str | None = None) -> pb.SharedSlice:
    return pb.SharedSlice(region=region.name, token=region.token if token is None else token, offset=offset,
                          size=size)


def test_every_slice_is_checked_and_named(daemon):
    channel = SharedMemory(side_socket(daemon.target))
    region = channel.lease(1 << 20)
    view = np.frombuffer(region.mapping, dtype=np.int64, count=4)
    view[:] = [1, 2, 3, 4]
    del view
    lengths = np.array([4], "<i4").tobytes()
    out = slice_of(region, 4096, DIM * 4)

    def request(**fields) -> pb.LookupPooledRequest:
        bag = {"table": "f32", "lengths": lengths, "ids_shm": slice_of(region, 0, 32), "out_shm": out, **fields}
        return pb.LookupPooledRequest(features=[pb.FeatureBags(**{k: v for k, v in bag.items() if v is not None})])

    cases = [(request(ids_shm=pb.SharedSlice(region="nope", token=region.token, size=32)), "NOT_FOUND", "'nope'"),
             (request(ids_shm=slice_of(region, 0, 32, token="0" * 32)), "NOT_FOUND", "token"),
             (request(ids_shm=slice_of(region, region.size - 16, 32)), "INVALID_ARGUMENT", "past the end"),
             (request(ids_shm=slice_of(region, -8, 32)), "INVALID_ARGUMENT", "offset -8"),
             (request(ids_shm=slice_of(region, 0, 30)), "INVALID_ARGUMENT", "size 30"),
             (request(ids=np.arange(4, dtype="<i8").tobytes()), "INVALID_ARGUMENT", "both set"),
             (request(out_shm=slice_of(region, 4096, DIM * 4 - 4)), "INVALID_ARGUMENT", "the pooled values take"),
             (request(ids_shm=slice_of(region, 0, 24)), "INVALID_ARGUMENT", "lengths")]
    try:
        with grpc.insecure_channel(daemon.target) as ch:
            stub = pb_grpc.EmbeddingStoreStub(ch)
            for req, code, words in cases:
                with pytest.raises(grpc.RpcError) as err:
                    stub.LookupPooled(req)
                assert err.value.code().name == code and words in err.value.details(), (code, err.value.details())
                if code == "INVALID_ARGUMENT" and "lengths" not in words:
                    assert "features[0]." in err.value.details()
            host = request()
            host.offload = pb.HOST
            with pytest.raises(grpc.RpcError) as err:
                stub.LookupPooled(host)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SWITCH" in err.value.details()
            reply = stub.LookupPooled(request())
            assert reply.results[0].in_shm and not reply.results[0].values
            got = np.frombuffer(region.mapping, dtype=np.float32, count=DIM, offset=4096).copy()
            np.testing.assert_allclose(got, daemon.values[[1, 2, 3, 4]].sum(axis=0), rtol=1e-5, atol=1e-6)
            assert channel.status()[0]["in_use"] == 0
            # a region goes with its connection, once the daemon's side of it has seen the close
            token, name = region.token, region.name
            channel.close()
            gone = pb.LookupPooledRequest(features=[pb.FeatureBags(
                table="f32", lengths=lengths, ids_shm=pb.SharedSlice(region=name, token=token, size=32))])
            deadline = time.monotonic() + 10
            while True:
                try:
                    stub.LookupPooled(gone)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
                    break
                assert time.monotonic() < deadline, "the region outlived its connection by 10 s"
                time.sleep(0.01)
    finally:
        channel.close()


def test_a_region_cannot_be_unregistered_by_another_connection(daemon):
    first, second = SharedMemory(side_socket(daemon.target)), SharedMemory(side_socket(daemon.target))
    try:
        region = first.lease(1)
        with pytest.raises(SharedMemoryError) as err:
            second.unregister(region)
        assert err.value.code == "NOT_FOUND"
        assert [r["region"] for r in first.status()] == [region.name] and second.status() == []
        first.unregister(region)
        assert first.status() == []
        with pytest.raises(ValueError):  # unmapped here too
            mmap.mmap.read(region.mapping, 1)
    finally:
        first.close()
        second.close()


def test_the_client_gets_over_a_daemon_restart(tmp_path):
    """The regions die with the daemon: the next call goes on the wire and the one after it registers
    afresh with the new daemon (same state directory, same socket)."""
    state = tmp_path / "restart"
    d = start_daemon(state, "--shared-memory")
    ids, lengths = np.arange(8), np.array([3, 5], np.int32)
    with Client(d.target) as c:
        c.create_table("t", 16, 4, initializer="uniform", seed=3)
        want = c.lookup_pooled({"t": (ids, lengths)})["t"]
        first = c.shared_memory
        assert first is not None and first.status()
        assert d.stop() == 0, d.log()
        d = start_daemon(state, "--shared-memory")
        try:
            for _ in range(2):
                np.testing.assert_array_equal(c.lookup_pooled({"t": (ids, lengths)})["t"], want)
            assert c.shared_memory is not None and c.shared_memory is not first
            assert c.shared_memory.status()[0]["in_use"] == 0
        finally:
            assert d.stop() == 0, d.log()
