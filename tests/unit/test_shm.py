"""The daemon's registry of shared-memory regions: a region in use is neither unregistered nor unmapped."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest
from embtier.v1 import embtier_pb2 as pb
from embtierd.errors import FailedPreconditionError, NotFoundError
from embtierd.rpc import shm


def sealed_memfd(nbytes: int) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.fixture
def registry():
    r = shm.Registry(max_bytes=1 << 20)
    yield r
    r.close()


def register(registry: shm.Registry, owner: int, name: str, nbytes: int = 4096) -> shm.Region:
    fd = sealed_memfd(nbytes)
    try:
        return registry.register(owner, os.getuid(), name, fd)
    finally:
        os.close(fd)


def ref(region: shm.Region, offset: int = 0, size: int = 8, token: str | None = None) -> pb.SharedSlice:
    return pb.SharedSlice(region=region.name, token=region.token if token is None else token, offset=offset,
                          size=size)


def test_a_region_in_use_is_not_unregistered_until_its_requests_end(registry):
    region = register(registry, 1, "a")
    with registry.using([("ids_shm", ref(region))]) as found:
        assert found["ids_shm"] is region and region.in_use == 1
        with pytest.raises(FailedPreconditionError, match="in use by 1"):
            registry.unregister(1, "a")
    assert region.in_use == 0
    registry.unregister(1, "a")
    assert region.mapping.closed
    with pytest.raises(NotFoundError):
        registry.unregister(1, "a")


def test_a_closed_connection_s_region_goes_when_its_last_request_ends(registry):
    region = register(registry, 7, "a")
    other = register(registry, 8, "a")  # the same name on another connection is another region
    with registry.using([("ids_shm", ref(region)), ("out_shm", ref(region, 8))]):
        registry.drop_connection(7)
        assert not region.mapping.closed and region.in_use == 2
        with pytest.raises(NotFoundError), registry.using([("ids_shm", ref(region))]):  # no new request on it
            pass
    assert region.mapping.closed and not other.mapping.closed
    assert registry.status(7) == [] and registry.status(8) == [{"region": "a", "bytes": 4096, "in_use": 0}]


def test_a_wrong_token_is_refused_and_slices_are_bounded(registry):
    region = register(registry, 1, "a", 64)
    with pytest.raises(NotFoundError, match="token"), registry.using([("ids_shm", ref(region, token="f" * 32))]):
        pass
    assert region.in_use == 0
    np.frombuffer(region.mapping, dtype=np.int64)[:] = np.arange(8)
    np.testing.assert_array_equal(shm.read_slice("ids_shm", ref(region, 16, 24), region, "<i8"), [2, 3, 4])
    for offset, size in ((0, 72), (64, 8), (-8, 8), (2**62, 2**62), (0, -8)):
        with pytest.raises(Exception, match="ids_shm"):
            shm.read_slice("ids_shm", ref(region, offset, size), region, "<i8")
    shm.write_slice("out_shm", ref(region, 8, 16), region, np.array([7.0, 8.0], np.float32))
    np.testing.assert_array_equal(np.frombuffer(region.mapping, np.float32, 2, 8), [7.0, 8.0])
    with pytest.raises(Exception, match="out_shm"):
        shm.write_slice("out_shm", ref(region, 8, 4), region, np.array([7.0, 8.0], np.float32))
