"""Atheris harness of every RPC of embtier.v1.EmbeddingStore, called in process on the servicer of a
real Store (tiers, write-ahead log and checkpoints in a temporary state directory, built as the
daemon builds them), with a context that records what aborts the call.

Each input picks a method, then either parses the rest of its bytes as the method's request message
(protobuf decoding: what a client can send; bytes that do not parse are gRPC's to refuse), or builds
a request field by field with atheris.FuzzedDataProvider so that validation gets past the parsing:
table names that exist (dense float32, hashed float16, managed int8, mapped, one mostly on SCM) and
others, ids in range, at the bounds and anywhere in int64, as int64 or int32, lengths that add up or
not, weights of the wrong count, NaN and float16's limits in values, enum values out of range, sizes
near the limits, checkpoint ids listed or not, shared-memory slices of a registered region (right or
wrong token, offsets and sizes in and out of it).  A finding (common.py) is any outcome but a reply
of the method's type within server.max_message_bytes whose arrays have the sizes the reply's counts
say, or an EmbtierError with a message and a status other than INTERNAL.  The store keeps its state
from one input to the next, as a daemon does; the fixture tables are made again when a call dropped
them, and tables the fuzzer made are dropped once there are more than two.

  python -m tests.fuzz.rpc_harness [libFuzzer flags: -runs=N, -max_total_time=S, CORPUS_DIR, ...]
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import atheris
import numpy as np
from google.protobuf.message import DecodeError

from tests.fuzz.common import (
    INT32_MAX,
    UINT64_MAX,
    Finding,
    bags,
    count,
    floats,
    ids,
    main,
    pick,
    small_int,
    split,
    trim,
)

with atheris.instrument_imports(include=["embtierd", "embtier"]):
    from embtier.v1 import embtier_pb2 as pb
    from embtier.wire import TENANT_METADATA_KEY
    from embtierd.config import load
    from embtierd.durability import recovery
    from embtierd.errors import EmbtierError
    from embtierd.keys.space import KeySpace
    from embtierd.rpc import shm
    from embtierd.rpc.metrics import Metrics
    from embtierd.rpc.service import EmbeddingStoreServicer
    from embtierd.store.catalog import Store
    from embtierd.tenancy.scheduler import Scheduler
    from embtierd.tenancy.tenants import Tenants
    from embtierd.tiering.engine import TieringEngine

MAX_MESSAGE_BYTES = 256 << 10     # small, so that the reply-size checks are within reach
MAX_IDS = 4096
REGION_BYTES = 4096
MAPPING = (np.array([10, 20, 30, -5], np.int64), np.array([0, 1, 2, 2], np.int64))
# name: (num_rows, dim, dtype, key space, key seed)
FIXTURES = {
    "d32": (64, 4, "float32", "dense", 0),
    "h16": (40, 8, "float16", "hashed", 7),
    "m8": (16, 3, "int8", "managed", 0),
    "p32": (32, 5, "float32", "mapped", 3),
    "scm": (1000, 16, "float32", "dense", 0),   # 62.5 KiB: most of it on SCM
}
OTHER_NAMES = ("x0", "x1", "", "no-such-table", "a" * 129)
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods]
REQUESTS = {m.name: m.input_type.name for m in pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods}
REPLIES = {m.name: m.output_type.name for m in pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods}


class Aborted(Exception):
    """What context.abort raises (as grpc's does) after recording the code and details."""


class FuzzContext:
    """The parts of grpc.ServicerContext the servicer and the scheduler use."""

    def __init__(self, remaining: float | None, metadata: tuple):
        self.remaining, self.metadata = remaining, metadata
        self.code, self.details = None, None

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def add_callback(self, callback) -> bool:
        return True

    def is_active(self) -> bool:
        return True

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def abort(self, code, details: str):
        self.code, self.details = code, details
        raise Aborted(details)


class Service:
    """The servicer on a store in its own state directory, with a registered shared-memory region."""

    def __init__(self, work: Path) -> None:
        self.dir = work
        config = load(overrides={
            "state_dir": str(self.dir),
            "tiers": {"dram": {"capacity": "16K"}, "cxl": {"capacity": "16K"}, "scm": {"capacity": "1M"}},
            "server": {"max_message_bytes": MAX_MESSAGE_BYTES, "max_ids_per_request": MAX_IDS,
                       "shared_memory": True},
            "tiering": {"enabled": False},
            "durability": {"fsync": "interval", "checkpoints": {"interval_seconds": 0, "keep": 2}},
            "tenants": {"gold": {"priority": 5, "deadline_ms": 5000}},
        })
        self.store = Store(config)
        metrics = Metrics(self.store)
        tiering = TieringEngine(self.store, config.tiering, metrics)
        durable = recovery.open_durable(self.store, self.dir, config.durability, metrics)
        self.scheduler = Scheduler(config.scheduler, metrics.tenant_outcome)
        self.servicer = EmbeddingStoreServicer(self.store, config.server, metrics, tiering,
                                               Tenants(config.tenants), self.scheduler)
        self.servicer.checkpoints = durable.checkpoints
        self.servicer.shm = shm.Registry(config.server.shared_memory_max_bytes)
        fd = os.memfd_create("embtier-fuzz", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, REGION_BYTES)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.region = self.servicer.shm.register(1, os.getuid(), "fz", fd)
        os.close(fd)
        self.ensure_fixtures()

    def ensure_fixtures(self) -> None:
        """Makes the fixture tables that are missing; drops all but two of the others."""
        names = {t.name for t in self.store.tables()}
        for name, (rows, dim, dtype, kind, seed) in FIXTURES.items():
            if name not in names:
                keys = KeySpace(kind, seed, 0.5 if kind == "managed" else 0.0, 3 if kind == "mapped" else 0)
                self.store.create_table(name, rows, dim, dtype, "uniform" if kind != "managed" else "zeros",
                                        seed=1, keys=keys, mapping=MAPPING if kind == "mapped" else None)
        for extra in sorted(names - set(FIXTURES))[2:]:
            self.store.drop_table(extra)

    def geometry(self, name: str) -> tuple[int, int]:
        rows, dim, *_ = FIXTURES.get(name, (8, 4))
        return rows, dim


def table_name(fdp: atheris.FuzzedDataProvider) -> str:
    k = fdp.ConsumeIntInRange(0, 15)
    if k < 12:
        return pick(fdp, list(FIXTURES))
    if k < 15:
        return pick(fdp, OTHER_NAMES)
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 140))


def in_range(fdp: atheris.FuzzedDataProvider, n: int, low: int, high: int, dtype: str = "<i8") -> np.ndarray:
    """n integers in [low, high] (0 where the input runs out), as an array of dtype."""
    return np.array((fdp.ConsumeIntListInRange(n, low, high) + [0] * n)[:n], dtype)


def enum_value(fdp: atheris.FuzzedDataProvider, valid: int) -> int:
    return fdp.ConsumeIntInRange(0, valid - 1)


def enum(fdp: atheris.FuzzedDataProvider, valid: int) -> int:
    """A value of an enum of valid values (0 .. valid - 1), now and then one outside it."""
    return fdp.ConsumeIntInRange(0, valid - 1) if fdp.ConsumeIntInRange(0, 7) else pick(fdp, [valid, -1, 99,
                                                                                               INT32_MAX])


def many(fdp: atheris.FuzzedDataProvider, bound: int) -> int:
    """A count of ids: up to bound, now and then at or past server.max_ids_per_request."""
    return count(fdp, bound) if fdp.ConsumeIntInRange(0, 31) else pick(fdp, [MAX_IDS, MAX_IDS + 1, 70000])


def id_bytes(fdp: atheris.FuzzedDataProvider, values: list[int], id_type: int) -> bytes:
    """values as the ids field of id_type (int32 ones wrap, as a careless client's would)."""
    dtype = "<i4" if id_type == pb.INT32 else "<i8"
    arr = np.array(values, dtype=np.int64)
    return trim(fdp, arr.astype(dtype).tobytes())


def float_bytes(fdp: atheris.FuzzedDataProvider, n: int) -> bytes:
    return trim(fdp, np.array(floats(fdp, max(0, n)), dtype=np.float64).astype("<f4").tobytes())


def capacity(fdp: atheris.FuzzedDataProvider) -> int:
    return pick(fdp, [-2, -1, 0, 1, 4096, 65536, 2**40, 2**63 - 1, -2**63])


def build_policy(fdp: atheris.FuzzedDataProvider, request) -> None:
    """The optional tiering fields of CreateTableRequest and SetPolicyRequest."""
    if fdp.ConsumeBool():
        request.policy = pick(fdp, ["lfu", "lru", "", "LFU", "random", "lfu\x00"])
    if fdp.ConsumeBool():
        request.pin_tier = pick(fdp, ["dram", "cxl", "scm", "", "nvme", "DRAM"])
    if fdp.ConsumeBool():
        request.dram_capacity_bytes = capacity(fdp)
    if fdp.ConsumeBool():
        request.cxl_capacity_bytes = capacity(fdp)


class Builder:
    """Structured requests, one method each."""

    def __init__(self, service: Service):
        self.service = service

    def CreateTable(self, fdp):
        if fdp.ConsumeBool():
            return self._plausible_table(fdp)
        r = pb.CreateTableRequest(name=pick(fdp, ["x0", "x1", "d32", "m8", "", "bad name", "p32"]))
        r.num_rows = pick(fdp, [1, 2, 3, 17, 100, 1000, 0, -1, 2**30, 2**30 + 1, 2**62])
        r.dim = pick(fdp, [1, 3, 8, 16384, 16385, 0, -1, INT32_MAX])
        r.dtype, r.initializer, r.key_space = enum(fdp, 3), enum(fdp, 2), enum(fdp, 4)
        r.seed = fdp.ConsumeIntInRange(0, UINT64_MAX)
        r.init_scale = pick(fdp, [0.0, 0.1, -1.0, float("nan"), float("inf"), 3e38])
        r.default_value = pick(fdp, [0.0, 1.5, float("nan"), float("inf"), 70000.0, -3e38])
        r.key_seed = pick(fdp, [0, 1, 7, UINT64_MAX])
        if fdp.ConsumeBool():
            n = count(fdp, 6)
            rows = max(1, min(r.num_rows, 1000))
            r.mapping_ids = trim(fdp, np.array(ids(fdp, n, 1000), np.int64).tobytes())
            r.mapping_rows = trim(fdp, np.array(ids(fdp, n, rows), np.int64).tobytes())
        r.mapping_hash_from = small_int(fdp, 4, -1)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            r.mapping_from = pick(fdp, ["p32", "d32", "m8", "x9"])
        r.receiving = fdp.ConsumeIntInRange(0, 5) == 0
        build_policy(fdp, r)
        return r

    @staticmethod
    def _plausible_table(fdp):
        """A CreateTableRequest that every check passes, unless the name is taken or the tiers are full."""
        r = pb.CreateTableRequest(name=pick(fdp, ["x0", "x1"]), num_rows=fdp.ConsumeIntInRange(1, 300),
                                  dim=fdp.ConsumeIntInRange(1, 16), dtype=enum_value(fdp, 3), key_space=enum_value(fdp, 4),
                                  seed=fdp.ConsumeIntInRange(0, 9), init_scale=pick(fdp, [0.0, 0.5]))
        r.initializer = pb.ZEROS if r.key_space == pb.KEY_SPACE_MANAGED else enum_value(fdp, 2)
        r.default_value = pick(fdp, [0.0, 1.5]) if r.key_space == pb.KEY_SPACE_MANAGED else 0.0
        if r.key_space == pb.KEY_SPACE_MAPPED:
            n = count(fdp, 6)
            r.mapping_ids = np.arange(100, 100 + n, dtype="<i8").tobytes()
            r.mapping_rows = in_range(fdp, n, 0, r.num_rows - 1).tobytes()
            r.mapping_hash_from = fdp.ConsumeIntInRange(0, r.num_rows - 1)
        return r

    def DropTable(self, fdp):
        return pb.DropTableRequest(name=pick(fdp, ["x0", "x1", "x0", "x1", "zz", ""]) if fdp.ConsumeIntInRange(0, 7)
                                   else table_name(fdp))

    def ListTables(self, fdp):
        return pb.ListTablesRequest()

    def DescribeTable(self, fdp):
        return pb.DescribeTableRequest(name=table_name(fdp))

    def WriteRows(self, fdp):
        table = table_name(fdp)
        rows, dim = self.service.geometry(table)
        n = many(fdp, 24)
        if fdp.ConsumeBool():  # a write every check passes (unless a managed table is full)
            values = in_range(fdp, n * dim, -8, 8, "<f4")
            row_ids = in_range(fdp, n, 0, rows - 1)
            return pb.WriteRowsRequest(table=table, ids=row_ids.tobytes(), values=values.tobytes(),
                                       mode=enum_value(fdp, 2), scale=pick(fdp, [0.0, 2.0]))
        id_type = enum(fdp, 2)
        r = pb.WriteRowsRequest(table=table, mode=enum(fdp, 2), id_type=id_type,
                                ids=id_bytes(fdp, ids(fdp, n, rows), id_type))
        r.values = float_bytes(fdp, n * dim + pick(fdp, [0, 0, 0, 0, 1, -1, dim, -dim]))
        r.scale = pick(fdp, [0.0, 1.0, -2.0, float("nan"), float("inf"), 1e30])
        r.by_row = fdp.ConsumeIntInRange(0, 5) == 0
        r.fill = fdp.ConsumeIntInRange(0, 7) == 0
        return r

    def Lookup(self, fdp):
        table = table_name(fdp)
        rows, _ = self.service.geometry(table)
        n = many(fdp, 40)
        id_type = enum(fdp, 2)
        return pb.LookupRequest(table=table, ids=id_bytes(fdp, ids(fdp, n, rows), id_type), id_type=id_type,
                                wire_dtype=enum(fdp, 2), distinct=fdp.ConsumeBool())

    def _slice(self, fdp, data: bytes | None) -> pb.SharedSlice:
        """A slice of the registered region (or of none), with data written at its offset when given."""
        region = self.service.region
        offset = small_int(fdp, REGION_BYTES // 2)
        size = small_int(fdp, REGION_BYTES // 2) if data is None or fdp.ConsumeIntInRange(0, 5) == 0 else len(data)
        if data is not None and 0 <= offset and offset + len(data) <= REGION_BYTES:
            region.mapping[offset:offset + len(data)] = data
        name, token = region.name, region.token
        k = fdp.ConsumeIntInRange(0, 15)
        if k == 0:
            token = "0" * 32
        elif k == 1:
            name = "other"
        return pb.SharedSlice(region=name, token=token, offset=offset, size=size)

    def LookupPooled(self, fdp):
        r = pb.LookupPooledRequest(mode=enum(fdp, 3), wire_dtype=enum(fdp, 2), distinct=fdp.ConsumeBool())
        if fdp.ConsumeBool():
            r.offload = enum(fdp, 3)
        shared = fdp.ConsumeIntInRange(0, 3) == 0
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            table = table_name(fdp)
            rows, _dim = self.service.geometry(table)
            n = many(fdp, 32)
            id_type = enum(fdp, 2)
            f = r.features.add(table=table, id_type=id_type)
            if fdp.ConsumeBool():  # bags every check passes
                f.id_type = pb.INT64
                fields = {"ids": in_range(fdp, n, 0, rows - 1).tobytes(),
                          "lengths": np.array(split(fdp, n), "<i4").tobytes(),
                          "weights": np.ones(n, "<f4").tobytes() if fdp.ConsumeBool() else b""}
            else:
                fields = {"ids": id_bytes(fdp, ids(fdp, n, rows), id_type),
                          "lengths": trim(fdp, np.array(bags(fdp, n), np.int64).astype("<i4").tobytes()),
                          "weights": float_bytes(fdp, n + pick(fdp, [0, 0, 0, 1, -1])) if fdp.ConsumeBool() else b""}
            for name, data in fields.items():
                if shared and fdp.ConsumeBool():
                    getattr(f, f"{name}_shm").CopyFrom(self._slice(fdp, data))
                    if fdp.ConsumeIntInRange(0, 7) == 0:
                        setattr(f, name, data)  # both: refused
                else:
                    setattr(f, name, data)
            if shared and fdp.ConsumeBool():
                f.out_shm.CopyFrom(self._slice(fdp, None))
        return r

    def GetTiers(self, fdp):
        return pb.GetTiersRequest()

    def GetHeat(self, fdp):
        return pb.GetHeatRequest(table=table_name(fdp))

    def GetPolicy(self, fdp):
        return pb.GetPolicyRequest(table=table_name(fdp))

    def SetPolicy(self, fdp):
        r = pb.SetPolicyRequest(table=table_name(fdp))
        build_policy(fdp, r)
        return r

    def RecordTrace(self, fdp):
        return pb.RecordTraceRequest(table=table_name(fdp), max_ids=small_int(fdp, 100),
                                     timeout_seconds=pick(fdp, [0.001, 0.0, -1.0, float("nan"), float("inf"),
                                                                86401.0, 1e-9]))

    def ExportMapping(self, fdp):
        return pb.ExportMappingRequest(table=pick(fdp, ["p32", "p32", "d32", "m8", "x0"]), offset=small_int(fdp, 4),
                                       max_ids=small_int(fdp, 5))

    def Checkpoint(self, fdp):
        tables = [table_name(fdp) for _ in range(fdp.ConsumeIntInRange(0, 2))]
        return pb.CheckpointRequest(tables=tables, kind=enum(fdp, 4),
                                    quant_bits=pick(fdp, [0, 0, 8, 4, 3, 2, 1, 5, 9, -1, INT32_MAX]),
                                    quantizer=enum(fdp, 2))

    def ListCheckpoints(self, fdp):
        return pb.ListCheckpointsRequest()

    def RestoreCheckpoint(self, fdp):
        listed = [c.id for c in self.service.servicer.checkpoints.list()]
        choice = pick(fdp, [0, 1, UINT64_MAX] + listed + [i + 1 for i in listed[-1:]])
        return pb.RestoreCheckpointRequest(id=choice)


def bounded_trace(request) -> None:
    """RecordTrace waits up to its timeout for lookups that never come here: at most 2 ms (0 = 60 s)."""
    t = request.timeout_seconds
    if t == 0 or (0 < t <= 86400):
        request.timeout_seconds = min(t, 0.002) or 0.002


def check_reply(method: str, request, reply) -> None:
    """The sizes a reply's arrays must have by its own counts."""
    if method == "Lookup":
        item = 2 if request.wire_dtype == pb.FLOAT16 else 4
        if len(reply.values) != reply.count * reply.dim * item:
            raise Finding(f"Lookup: {len(reply.values)} bytes of values for count {reply.count} x dim {reply.dim}")
        if request.distinct and len(reply.index) != len(request.ids) // (4 if request.id_type == pb.INT32 else 8) * 4:
            raise Finding(f"Lookup: index of {len(reply.index)} bytes")
    elif method == "LookupPooled":
        item = 2 if request.wire_dtype == pb.FLOAT16 else 4
        if len(reply.results) != len(request.features):
            raise Finding(f"LookupPooled: {len(reply.results)} results for {len(request.features)} features")
        for res in reply.results:
            if res.values and len(res.values) != res.num_bags * res.dim * item:
                raise Finding(f"LookupPooled: {len(res.values)} bytes of values for {res.num_bags} bags x dim {res.dim}")
            if res.partials and len(res.partials) != len(res.parts) * res.num_bags * res.dim * item:
                raise Finding(f"LookupPooled: {len(res.partials)} bytes of partials for {len(res.parts)} parts")


class Harness:
    def __init__(self, work: Path) -> None:
        self.service = Service(work)
        self.builder = Builder(self.service)
        self.iterations = 0

    def context(self, fdp) -> FuzzContext:
        remaining = pick(fdp, [None] * 12 + [0.0, -1.0, 1e-9, 30.0])
        k = fdp.ConsumeIntInRange(0, 15)
        metadata = () if k < 12 else ((TENANT_METADATA_KEY, pick(fdp, ["gold", "default", "nobody", ""])),)
        return FuzzContext(remaining, metadata)

    def __call__(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        method = pick(fdp, METHODS)
        context = self.context(fdp)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            try:
                request = getattr(pb, REQUESTS[method]).FromString(fdp.ConsumeBytes(fdp.remaining_bytes()))
            except DecodeError:
                return
        else:
            request = getattr(self.builder, method)(fdp)
        if method == "RecordTrace":
            bounded_trace(request)
        self.call(method, request, context)
        if method in ("CreateTable", "DropTable", "RestoreCheckpoint"):
            self.service.ensure_fixtures()
        self.iterations += 1
        if self.iterations % 64 == 0:  # the store still serves
            reply = self.service.servicer.Lookup(pb.LookupRequest(table="d32", ids=np.arange(3, dtype="<i8").tobytes()),
                                                 FuzzContext(None, ()))
            assert reply.count == 3

    def call(self, method: str, request, context: FuzzContext) -> None:
        where = f"{method}({str(request)[:2000]!r})"
        try:
            reply = getattr(self.service.servicer, method)(request, context)
        except Aborted:
            if not context.details or context.code.name in ("INTERNAL", "UNKNOWN"):
                raise Finding(f"{where} aborted with {context.code} {context.details!r}") from None
            return
        except EmbtierError as e:
            if not str(e) or e.status == "INTERNAL":
                raise Finding(f"{where} raised {type(e).__name__} ({e.status}): {e!r}") from e
            return
        except Exception as e:
            raise Finding(f"{where} raised {type(e).__name__}: {e}") from e
        if type(reply).__name__ != REPLIES[method]:
            raise Finding(f"{where} answered a {type(reply).__name__}, not a {REPLIES[method]}")
        if reply.ByteSize() > MAX_MESSAGE_BYTES:
            raise Finding(f"{where} answered {reply.ByteSize()} bytes, over max_message_bytes {MAX_MESSAGE_BYTES}")
        check_reply(method, request, reply)


if __name__ == "__main__":
    main(Harness, "embtier-fuzz-rpc-")
