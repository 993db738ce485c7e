"""Regression tests of what the fuzz harnesses of tests/fuzz/ found, one per fix, each with the
input that found it (the servicer called in process on a store with its write-ahead log, as the
harness and the daemon build it)."""

from __future__ import annotations

import numpy as np
import pytest
from embtier.v1 import embtier_pb2 as pb
from embtierd.durability import recovery
from embtierd.errors import InvalidArgumentError, NotFoundError
from embtierd.keys.space import KeySpace
from embtierd.rpc.metrics import Metrics
from embtierd.rpc.service import EmbeddingStoreServicer
from embtierd.store.catalog import Store
from embtierd.tenancy.scheduler import Scheduler
from embtierd.tenancy.tenants import Tenants
from embtierd.tiering.engine import TieringEngine

from tests.support import make_config
from tests.unit.test_service import Deadline


@pytest.fixture
def logged(tmp_path):
    """(servicer, write-ahead log) on a store whose tables' changes are logged, as in the daemon."""
    config = make_config(tmp_path / "state", dram="4K", cxl="4K", scm="4M")
    store = Store(config)
    metrics = Metrics(store)
    durable = recovery.open_durable(store, config.state_dir, config.durability, metrics)
    scheduler = Scheduler(config.scheduler, metrics.tenant_outcome)
    servicer = EmbeddingStoreServicer(store, config.server, metrics, TieringEngine(store, config.tiering, metrics),
                                      Tenants(config.tenants), scheduler)
    servicer.checkpoints = durable.checkpoints
    yield servicer, durable.wal
    scheduler.stop()
    durable.wal.close()
    store.close()


@pytest.mark.parametrize("key_space", ["dense", "hashed", "managed"])
def test_an_empty_write_is_a_write_of_no_rows(logged, key_space, tmp_path):
    """rpc_harness: WriteRows(table: "scm", scale: 1e30, id_type: INT32) with no ids and no values raised
    TypeError (the log's record of zero rows: memoryview cannot cast a view with zeros in its shape), an
    INTERNAL error on every table.  It is a write like any other, of no rows: checked, logged, the
    version bumped (as every WriteRows does), the rows unchanged, and its record replays."""
    servicer, wal = logged
    initializer = "zeros" if key_space == "managed" else "uniform"
    servicer.store.create_table("t", 500, 4, "float16", initializer, keys=KeySpace(key_space))  # 4K DRAM + CXL: SCM too
    every = pb.LookupRequest(table="t", ids=np.arange(500, dtype="<i8").tobytes())
    before = servicer.Lookup(every, Deadline(None))
    version, lsn = servicer.store.describe("t").version, wal.last_lsn
    for i, request in enumerate((pb.WriteRowsRequest(table="t", scale=1e30, id_type=pb.INT32),
                                 pb.WriteRowsRequest(table="t", mode=pb.ADD))):
        reply = servicer.WriteRows(request, Deadline(None))
        assert (reply.rows_written, reply.version, wal.last_lsn) == (0, version + i + 1, lsn + i + 1)
    assert servicer.Lookup(every, Deadline(None)).values == before.values
    with pytest.raises(NotFoundError, match="'nope' does not exist"):
        servicer.WriteRows(pb.WriteRowsRequest(table="nope"), Deadline(None))
    with pytest.raises(InvalidArgumentError, match="values has 4 floats; expected 0 ids"):
        servicer.WriteRows(pb.WriteRowsRequest(table="t", values=np.ones(4, "<f4").tobytes()), Deadline(None))
    with pytest.raises(InvalidArgumentError, match="scale"):  # an empty write is still checked
        servicer.WriteRows(pb.WriteRowsRequest(table="t", mode=pb.ADD, scale=float("inf")), Deadline(None))
    ids = np.array([3], "<i8")
    reply = servicer.WriteRows(pb.WriteRowsRequest(table="t", ids=ids.tobytes(), values=np.ones(4, "<f4").tobytes()),
                               Deadline(None))
    assert (reply.rows_written, reply.version, wal.last_lsn) == (1, version + 3, lsn + 3)
    after = servicer.Lookup(every, Deadline(None)).values
    wal.close()  # the log replayed into a fresh store: the empty records are read back and applied
    config = servicer.store.config
    servicer.store.close()
    store = Store(config)
    durable = recovery.open_durable(store, config.state_dir, config.durability, Metrics(store))
    try:
        assert store.describe("t").version == version + 3
        np.testing.assert_array_equal(store.lookup("t", np.arange(500, dtype=np.int64)),
                                      np.frombuffer(after, "<f4").reshape(500, 4))
    finally:
        durable.wal.close()
        store.close()
