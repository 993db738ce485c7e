"""The servicer's admission checks, called directly (the e2e tests cover the
rest through a real daemon)."""

from __future__ import annotations

import numpy as np
import pytest
from embtier.v1 import embtier_pb2 as pb
from embtierd.config import load
from embtierd.errors import DeadlineExceededError, RequestTooLargeError
from embtierd.rpc.metrics import Metrics
from embtierd.rpc.service import EmbeddingStoreServicer
from embtierd.tenancy.scheduler import Scheduler
from embtierd.tenancy.tenants import Tenants
from embtierd.tiering.engine import TieringEngine


class Deadline:
    """The parts of grpc.ServicerContext that admission and the scheduler read: the time left, no
    metadata (the default tenant), and a call that never ends early."""

    def __init__(self, remaining: float | None):
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self):
        return ()

    def add_callback(self, callback) -> bool:
        return True


@pytest.fixture
def servicer(store_factory):
    store = store_factory(dram="1M")
    store.create_table("t", 100, 4)
    config = load(overrides={"server": {"max_ids_per_request": 10}})
    metrics = Metrics(store)
    scheduler = Scheduler(config.scheduler, metrics.tenant_outcome)
    yield EmbeddingStoreServicer(store, config.server, metrics, TieringEngine(store, config.tiering, metrics),
                                 Tenants(config.tenants), scheduler)
    scheduler.stop()


def lookup(n: int) -> pb.LookupRequest:
    return pb.LookupRequest(table="t", ids=np.zeros(n, dtype="<i8").tobytes())


def test_expired_deadline_is_not_computed(servicer):
    with pytest.raises(DeadlineExceededError, match="deadline passed"):
        servicer.Lookup(lookup(3), Deadline(0.0))
    assert servicer.Lookup(lookup(3), Deadline(5.0)).count == 3
    assert servicer.Lookup(lookup(3), Deadline(None)).count == 3  # no deadline set


def test_too_many_ids_is_refused(servicer):
    with pytest.raises(RequestTooLargeError, match="11 ids; the limit is 10"):
        servicer.Lookup(lookup(11), Deadline(None))
    request = pb.LookupPooledRequest(features=[
        pb.FeatureBags(table="t", ids=np.zeros(6, "<i8").tobytes(), lengths=np.array([6], "<i4").tobytes())] * 2)
    with pytest.raises(RequestTooLargeError, match="12 ids"):
        servicer.LookupPooled(request, Deadline(None))
