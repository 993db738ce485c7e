"""The EmbeddingStore servicer: translates wire messages to store calls.

Arrays arrive and leave as raw little-endian bytes and become numpy views
without copies; nothing here loops over elements.  Errors are raised as
EmbtierError and mapped to status codes by rpc/interceptor.py; limits and
deadlines are checked before any work.
"""

from __future__ import annotations

import functools
import time

import numpy as np
from embtier.v1 import embtier_pb2 as pb
from embtier.v1 import embtier_pb2_grpc as pb_grpc
from embtier.wire import (
    CHECKPOINT_KINDS,
    DTYPES,
    ID_ARRAYS,
    ID_TYPES,
    INITIALIZERS,
    KEY_SPACES,
    MEMORY_TIERS,
    OFFLOADS,
    POOL_MODES,
    QUANTIZERS,
    WIRE_ARRAYS,
    WIRE_DTYPES,
    WRITE_MODES,
    TablePolicy,
    name_of,
)

from embtierd import fabric
from embtierd.config import ServerConfig
from embtierd.durability.checkpoint import CheckpointInfo, check_request
from embtierd.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    RequestTooLargeError,
)
from embtierd.keys.space import KeySpace
from embtierd.rpc import shm
from embtierd.rpc.metrics import Metrics
from embtierd.rpc.trace import TraceRecorder
from embtierd.store.catalog import HEAT_BIN_NAMES, Store
from embtierd.tenancy.scheduler import Scheduler
from embtierd.tenancy.tenants import Tenants
from embtierd.tiering.config import TableSettings
from embtierd.tiering.engine import TieringEngine

REPLY_OVERHEAD_BYTES = 4096       # what a reply carries besides its arrays (names, counts, fabric accounting)
RESULT_OVERHEAD_BYTES = 1024      # and per pooled result, at most


def enum_value(enum, mapping: dict[str, int], value: int, field: str) -> str:
    """The name mapping (one of embtier.wire's) gives an enum field's value, else InvalidArgumentError
    naming the field, the value (by name where the enum has it) and the values allowed."""
    if value in mapping.values():
        return name_of(mapping, value)
    names = [enum.Name(v) for v in mapping.values()]
    allowed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    if value in enum.values():
        raise InvalidArgumentError(f"{field} = {enum.Name(value)} ({value}) is not allowed here; use {allowed}")
    raise InvalidArgumentError(f"{field} = {value} is not a value of {enum.DESCRIPTOR.name}; use {allowed}")


SHM_FIELDS = ("ids_shm", "lengths_shm", "weights_shm", "out_shm")  # FeatureBags' shared-memory slices


def array(buf: bytes, dtype: str, field: str) -> np.ndarray:
    """A read-only view of buf as a 1-D little-endian array."""
    dt = np.dtype(dtype)
    if len(buf) % dt.itemsize:
        raise InvalidArgumentError(f"{field} has {len(buf)} bytes, not a whole number of {dt.name} values")
    return np.frombuffer(buf, dtype=dt)


def id_array(buf: bytes, id_type: int, prefix: str = "") -> np.ndarray:
    """The ids field of a message as int64: a view of int64 bytes, a widened copy of int32 ones."""
    ids = array(buf, ID_ARRAYS[enum_value(pb.IdType, ID_TYPES, id_type, f"{prefix}id_type")], f"{prefix}ids")
    return ids if ids.dtype == np.int64 else ids.astype(np.int64)


def table_policy(current: TableSettings, request) -> TableSettings:
    """current with the fields request sets (CreateTableRequest or SetPolicyRequest) replaced."""
    capacity = dict(current.capacity_bytes)
    for tier in MEMORY_TIERS:
        field = f"{tier}_capacity_bytes"
        if request.HasField(field):
            value = getattr(request, field)
            if value < -1:
                raise InvalidArgumentError(f"{field} must be >= 0, or -1 for no limit; got {value}")
            capacity[tier] = None if value == -1 else value
    return TableSettings(policy=request.policy if request.HasField("policy") else current.policy,
                       pin=request.pin_tier if request.HasField("pin_tier") else current.pin,
                       capacity_bytes=capacity)


def check_bags(ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, prefix: str) -> None:
    """Bags that every offload mode can pool: lengths >= 0 summing to the ids, a weight per id."""
    if lengths.size and lengths.min() < 0:
        bad = int(np.argmin(lengths))
        raise InvalidArgumentError(f"{prefix}lengths[{bad}] = {int(lengths[bad])} is negative")
    total = int(lengths.sum(dtype=np.int64))
    if total != ids.size:
        raise InvalidArgumentError(f"{prefix}lengths sum to {total} but {ids.size} ids were given")
    if weights is not None and weights.size != ids.size:
        raise InvalidArgumentError(f"{prefix}weights has {weights.size} entries but ids has {ids.size}")


def wire(values: np.ndarray, dt: np.dtype) -> bytes:
    return (values if values.dtype == dt else values.astype(dt)).tobytes()


def checkpoint_info(info: CheckpointInfo) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        id=info.id, parent_id=info.parent_id, kind=CHECKPOINT_KINDS[info.kind], rows_written=info.rows_written,
        bytes_written=info.bytes_written, duration_seconds=info.duration_seconds, lsn=info.lsn, base_id=info.base_id,
        quant_bits=info.quant_bits, quantizer=QUANTIZERS.get(info.quantizer, QUANTIZERS["adaptive"]),
        created_unix_seconds=info.created_unix_seconds, tables=list(info.tables), exact_chain=info.exact_chain,
        snapshot_seconds=info.snapshot_seconds, damage=info.damage)


class EmbeddingStoreServicer(pb_grpc.EmbeddingStoreServicer):
    def __init__(self, store: Store, limits: ServerConfig, metrics: Metrics, tiering: TieringEngine,
                 tenants: Tenants, scheduler: Scheduler):
        self.store = store
        self.tenants = tenants
        self.scheduler = scheduler  # Lookup and LookupPooled run through it; other calls do not
        self.max_ids = limits.max_ids_per_request
        self.metrics = metrics
        self.tiering = tiering
        self.checkpoints = None  # the daemon's checkpoint.Checkpointer, when it has a write-ahead log
        self.shm: shm.Registry | None = None  # the shared-memory regions, when server.shared_memory is on
        self.traces = TraceRecorder()
        self.max_trace_ids = (limits.max_message_bytes - 4096) // 8  # a recorded trace travels in one reply
        self.max_message_bytes = limits.max_message_bytes

    def _admit(self, context, n_ids: int) -> None:
        if n_ids > self.max_ids:
            raise RequestTooLargeError(f"request has {n_ids} ids; the limit is {self.max_ids} "
                                       "(server.max_ids_per_request)")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("the request's deadline passed before it was served")

    @staticmethod
    def _deadline(context, tenant) -> float:
        """Seconds left to the call's deadline: its gRPC deadline, or its tenant's default."""
        remaining = context.time_remaining()
        return tenant.deadline_seconds if remaining is None else remaining

    def _check_reply(self, nbytes: int, what: str, results: int = 0) -> None:
        """RESOURCE_EXHAUSTED before anything is allocated for a reply that could not be sent: nbytes
        of arrays in a reply of that many pooled results."""
        limit = self.max_message_bytes - REPLY_OVERHEAD_BYTES - RESULT_OVERHEAD_BYTES * results
        if nbytes > limit:
            raise RequestTooLargeError(f"the reply would carry {nbytes} bytes of values ({what}); the limit is "
                                       f"{max(0, limit)} (server.max_message_bytes = {self.max_message_bytes} less "
                                       f"room for the rest of the reply): ask for less per call")

    def CreateTable(self, request, context):
        self._admit(context, 0)
        keys = KeySpace(enum_value(pb.KeySpace, KEY_SPACES, request.key_space, "key_space"), request.key_seed,
                        request.default_value, request.mapping_hash_from)
        mapping = None
        if request.mapping_from:
            keys, mapping = self._mapping_from(request, keys)
        elif keys.mapped or request.mapping_ids or request.mapping_rows:
            mapping = (array(request.mapping_ids, "<i8", "mapping_ids"), array(request.mapping_rows, "<i8", "mapping_rows"))
        info = self.store.create_table(
            request.name, request.num_rows, request.dim, enum_value(pb.DType, DTYPES, request.dtype, "dtype"),
            enum_value(pb.Initializer, INITIALIZERS, request.initializer, "initializer"), request.seed,
            request.init_scale, table_policy(self.tiering.config.table_policy(request.name), request), keys=keys,
            mapping=mapping, receiving=request.receiving)
        return info.to_message()

    def _mapping_from(self, request, keys: KeySpace) -> tuple[KeySpace, tuple[np.ndarray, np.ndarray]]:
        """The key space and mapping of a CreateTable that names mapping_from: the source table's."""
        source = request.mapping_from
        if not keys.mapped:
            raise InvalidArgumentError(f"mapping_from = {source!r} makes a mapped table; key_space is {keys.kind}")
        if request.mapping_ids or request.mapping_rows:
            raise InvalidArgumentError(f"give mapping_from = {source!r} or mapping_ids and mapping_rows, not both")
        mapping = self.store.mapping_of(source)
        info = self.store.describe(source)
        if mapping is None:
            raise InvalidArgumentError(f"mapping_from = {source!r} is a {info.key_space} table: it has no mapping")
        for field, given, theirs in (("key_seed", keys.seed, info.key_seed),
                                     ("mapping_hash_from", keys.hash_from, info.mapping_hash_from)):
            if given and given != theirs:
                raise InvalidArgumentError(f"{field} = {given} differs from the {theirs} of table {source!r} (mapping_from "
                                           f"takes its mapping whole; leave {field} 0)")
        return (KeySpace("mapped", info.key_seed, keys.default_value, info.mapping_hash_from),
                (mapping[0].copy(), mapping[1].astype(np.int64)))

    def ExportMapping(self, request, context):
        mapping = self.store.mapping_of(request.table)
        if mapping is None:
            kind = self.store.describe(request.table).key_space
            raise FailedPreconditionError(f"table {request.table!r} is {kind}, not mapped: it has no mapping to export")
        ids, rows = mapping
        if not 0 <= request.offset <= ids.size:
            raise InvalidArgumentError(f"offset = {request.offset} is outside [0, {ids.size}] (the mapping lists "
                                       f"{ids.size} ids)")
        if request.max_ids < 0:
            raise InvalidArgumentError(f"max_ids must be >= 0 (0: as many as a reply holds), got {request.max_ids}")
        fits = max(1, (self.max_message_bytes - REPLY_OVERHEAD_BYTES) // 16)
        count = min(ids.size - request.offset, request.max_ids or fits, fits)
        page = slice(request.offset, request.offset + count)
        info = self.store.describe(request.table)
        return pb.ExportMappingResponse(
            table=request.table, ids=ids[page].astype("<i8").tobytes(), rows=rows[page].astype("<i8").tobytes(),
            count=count, offset=request.offset, total=ids.size, num_rows=info.num_rows,
            hash_from=info.mapping_hash_from, key_seed=info.key_seed)

    def DropTable(self, request, context):
        self.store.drop_table(request.name)
        self.metrics.forget_gone_tables()
        return pb.DropTableResponse()

    def ListTables(self, request, context):
        return pb.ListTablesResponse(tables=[t.to_message() for t in self.store.tables()])

    def DescribeTable(self, request, context):
        return self.store.describe(request.name).to_message()

    def GetTiers(self, request, context):
        return pb.GetTiersResponse(tiers=[t.to_message() for t in self.store.tier_infos()])

    def GetHeat(self, request, context):
        histograms = self.store.heat_histogram(request.table)
        return pb.GetHeatResponse(table=request.table, bins=HEAT_BIN_NAMES, tiers=[
            pb.TierHeat(tier=tier, rows=int(counts.sum()), histogram=counts.tolist())
            for tier, counts in histograms.items()])

    def _policy_reply(self, table: str, policy: TableSettings) -> pb.TablePolicy:
        state = self.tiering.state(table)
        config = self.tiering.config
        limits = {tier: -1 if v is None else v for tier, v in policy.capacity_bytes.items()}
        return TablePolicy(
            table=table, policy=policy.policy, pin_tier=policy.pin,
            dram_capacity_bytes=limits["dram"], cxl_capacity_bytes=limits["cxl"],
            rows_moved=state.moved_rows if state else 0,
            migration_backlog_rows=state.backlog_rows if state else 0,
            interval_seconds=config.interval_seconds, bandwidth_bytes_per_second=config.bandwidth_bytes_per_second,
            tiering_enabled=config.enabled).to_message()

    def GetPolicy(self, request, context):
        return self._policy_reply(request.table, self.store.table_policy(request.table))

    def SetPolicy(self, request, context):
        policy = table_policy(self.store.table_policy(request.table), request)
        return self._policy_reply(request.table, self.store.set_policy(request.table, policy))

    def RecordTrace(self, request, context):
        num_rows = self.store.describe(request.table).num_rows  # NOT_FOUND before waiting
        recording = self.traces.record(request.table, request.max_ids, request.timeout_seconds or 60.0,
                                       self.max_trace_ids)
        info = self.store.describe(request.table)
        ids, lengths = recording.ids(), recording.lengths()
        config = self.tiering.config
        return pb.RecordTraceResponse(
            lengths=lengths.astype("<i4", copy=False).tobytes(), bags=lengths.size,
            table=request.table, ids=ids.astype("<i8", copy=False).tobytes(), count=ids.size,
            seconds=recording.seconds, num_rows=num_rows, row_bytes=self.store.geometry(request.table)[2],
            dram_rows=info.rows_by_tier["dram"], cxl_rows=info.rows_by_tier["cxl"],
            interval_seconds=config.interval_seconds, bandwidth_bytes_per_second=config.bandwidth_bytes_per_second,
            heat_sample_shift=self.store.config.kernels.heat_sample_shift,
            policy=self.store.table_policy(request.table).policy, key_space=KEY_SPACES[info.key_space],
            key_seed=info.key_seed)

    def Checkpoint(self, request, context):
        kind = enum_value(pb.CheckpointKind, CHECKPOINT_KINDS, request.kind, "kind")
        quantizer = enum_value(pb.Quantizer, QUANTIZERS, request.quantizer, "quantizer")
        check_request(kind, request.quant_bits, quantizer)
        info = self._checkpointer().take(kind, request.quant_bits, quantizer, list(request.tables))
        return checkpoint_info(info)

    def ListCheckpoints(self, request, context):
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_info(i) for i in self._checkpointer().list()])

    def RestoreCheckpoint(self, request, context):
        if request.id == 0:
            raise InvalidArgumentError("id must name a checkpoint (see ListCheckpoints); got 0")
        start = time.perf_counter()
        restored, saved = self._checkpointer().restore(request.id)
        self.metrics.forget_gone_tables()  # the tables created since
        return pb.RestoreCheckpointResponse(restored=checkpoint_info(restored),
                                            saved=checkpoint_info(saved) if saved else None,
                                            tables=list(restored.tables), duration_seconds=time.perf_counter() - start)

    def _checkpointer(self):
        if self.checkpoints is None:
            raise FailedPreconditionError("checkpoints need the write-ahead log (durability.wal = true)")
        return self.checkpoints

    def WriteRows(self, request, context):
        ids = id_array(request.ids, request.id_type)
        self._admit(context, ids.size)
        values = array(request.values, "<f4", "values")
        mode = enum_value(pb.WriteMode, WRITE_MODES, request.mode, "mode")
        if request.fill:
            if mode != "assign" or request.by_row:
                raise InvalidArgumentError(f"fill copies rows with mode assign (by row is implied); got mode {mode}"
                                           f"{' and by_row' if request.by_row else ''}")
            version, written = self.store.fill_rows(request.table, ids, values)
            return pb.WriteRowsResponse(rows_written=written, version=version)
        version = self.store.write_rows(request.table, ids, values, mode, request.scale or 1.0, by_row=request.by_row)
        return pb.WriteRowsResponse(rows_written=ids.size, version=version)

    def Lookup(self, request, context):
        tenant = self.tenants.of(context)
        ids = id_array(request.ids, request.id_type)
        dt = np.dtype(WIRE_ARRAYS[enum_value(pb.DType, WIRE_DTYPES, request.wire_dtype, "wire_dtype")])
        self._admit(context, ids.size)
        dim = self.store.geometry(request.table)[0]
        self._check_reply(ids.size * dim * dt.itemsize, f"{ids.size} rows x dim {dim} x {dt.itemsize} bytes")
        index = b""
        gathered = ids
        if request.distinct:
            gathered, inverse = np.unique(ids, return_inverse=True)
            index = inverse.astype("<i4").tobytes()
        tier_rows, unknown = np.zeros(3, dtype=np.int64), np.zeros(1, dtype=np.int64)

        def run():
            return self.store.lookup(request.table, gathered, tier_rows, unknown=unknown), {request.table: tier_rows}
        rows = self.scheduler.run(tenant, self._deadline(context, tenant), [(request.table, gathered.size)], run,
                                  context)
        self.traces.observe(request.table, ids)
        values = wire(rows, dt)
        self.metrics.served("Lookup", request.table, tier_rows, self.store.geometry(request.table)[2],
                            len(values) + len(index))
        return pb.LookupResponse(values=values, dim=rows.shape[1], count=gathered.size, unknown_ids=int(unknown[0]),
                                 index=index)

    def _check_pooled_reply(self, features, offload: str, itemsize: int, outs: list | None = None) -> None:
        """Checks every feature's bags, then the reply's size, before any table is read: per feature,
        one vector per bag (switch), one per id (host), or one per bag and fabric part with rows of
        the request (device, which also keeps a length per bag and part while it pools).  A feature
        whose values go to shared memory (outs[i]) needs an out_shm slice of their size instead."""
        nbytes, parts = [], len(self.store.part_names)
        for i, (table, ids, lengths, weights) in enumerate(features):
            check_bags(ids, lengths, weights, f"features[{i}].")
            dim = self.store.geometry(table)[0]
            vectors = {"switch": lengths.size, "host": ids.size, "device": min(parts, ids.size) * lengths.size}[offload]
            work = parts * lengths.size * 4 if offload == "device" else 0
            if outs and outs[i] is not None:
                where, ref, region = outs[i]
                if shm.check_slice(where, ref, region, itemsize)[1] < vectors * dim:
                    raise InvalidArgumentError(f"{where}: size {ref.size} bytes; the pooled values take "
                                               f"{vectors} bags x dim {dim} x {itemsize} = {vectors * dim * itemsize}")
                continue
            nbytes.append((vectors * dim * itemsize + work, f"features[{i}]: {vectors} vectors x dim {dim}"))
        if nbytes:
            self._check_reply(sum(n for n, _ in nbytes), f"{offload} offload, {itemsize}-byte values; the largest "
                              f"is {max(nbytes)[1]}", len(nbytes))

    def LookupPooled(self, request, context):
        slices = [(f"features[{i}].{name}", getattr(f, name)) for i, f in enumerate(request.features)
                  for name in SHM_FIELDS if f.HasField(name)]
        if not slices:
            return self._lookup_pooled(request, context, {})
        if self.shm is None:
            raise FailedPreconditionError(f"{slices[0][0]}: shared memory is off on this daemon "
                                          "(server.shared_memory, --shared-memory)")
        with self.shm.using(slices) as regions:
            return self._lookup_pooled(request, context, regions)

    def _lookup_pooled(self, request, context, regions: dict[str, shm.Region]):
        """LookupPooled, with regions the shared-memory regions its slices name, held in use ({} for none)."""
        tenant = self.tenants.of(context)
        features = [self._feature_bags(i, f, regions) for i, f in enumerate(request.features)]
        self._admit(context, sum(ids.size for _, ids, _, _ in features))
        mode = enum_value(pb.PoolingMode, POOL_MODES, request.mode, "mode")
        dt = np.dtype(WIRE_ARRAYS[enum_value(pb.DType, WIRE_DTYPES, request.wire_dtype, "wire_dtype")])
        config = self.store.config.fabric
        offload = (enum_value(pb.Offload, OFFLOADS, request.offload, "offload") if request.HasField("offload")
                   else config.offload)
        traffic = fabric.Traffic(offload)
        names = self.store.part_names
        outs = [(f"features[{i}].out_shm", f.out_shm, regions[f"features[{i}].out_shm"])
                if f.HasField("out_shm") else None for i, f in enumerate(request.features)]
        if offload != "switch" and any(outs):
            raise InvalidArgumentError(f"out_shm takes the pooled values of offload SWITCH; this request's offload is "
                                       f"{offload.upper()}")
        self._check_pooled_reply(features, offload, dt.itemsize, outs)
        run = functools.partial(self._pooled, features, mode, dt, offload, names, traffic, outs, request.distinct)
        results = self.scheduler.run(tenant, self._deadline(context, tenant),
                                     [(table, ids.size) for table, ids, _, _ in features], run, context)
        modelled = traffic.modelled_seconds(config)
        self.metrics.fabric(traffic, modelled)
        return pb.LookupPooledResponse(results=results, fabric=pb.FabricAccounting(
            offload=OFFLOADS[offload], device_link_bytes=traffic.device_link_bytes,
            host_link_bytes=traffic.host_link_bytes, modelled_seconds=modelled))

    @staticmethod
    def _feature_bags(i: int, f, regions: dict[str, shm.Region]) -> tuple:
        """(table, ids, lengths, weights) of request.features[i], from its bytes or its shared-memory slices."""
        def field(name: str, dtype: str) -> np.ndarray | None:
            where = f"features[{i}].{name}"
            if not f.HasField(f"{name}_shm"):
                data = getattr(f, name)
                if name == "ids":
                    return id_array(data, f.id_type, f"features[{i}].")
                return array(data, dtype, where) if data or name == "lengths" else None
            if getattr(f, name):
                raise InvalidArgumentError(f"{where} and {where}_shm are both set; send one")
            if name == "ids":
                dtype = ID_ARRAYS[enum_value(pb.IdType, ID_TYPES, f.id_type, f"features[{i}].id_type")]
            values = shm.read_slice(f"{where}_shm", getattr(f, f"{name}_shm"), regions[f"{where}_shm"], dtype)
            return values.astype(np.int64) if name == "ids" and values.dtype != np.int64 else values
        return f.table, field("ids", "<i8"), field("lengths", "<i4"), field("weights", "<f4")

    def _pooled(self, features, mode: str, dt: np.dtype, offload: str, names: list[str], traffic: fabric.Traffic,
                outs: list | None = None, distinct: bool = False):
        """The work of a LookupPooled (checked): its results, and the rows per tier read from each table.
        outs[i]: (field, slice, region) where feature i's pooled values go, or None (into the reply);
        distinct: HOST sends each distinct id's row once, with an index."""
        results, read = [], {}
        for k, (table, ids, lengths, weights) in enumerate(features):
            tier_rows, unknown = np.zeros(3, dtype=np.int64), np.zeros(1, dtype=np.int64)
            part_rows = np.zeros(len(names), dtype=np.int64)  # counted by the kernels as they resolve rows
            dim, _, row_bytes = self.store.geometry(table)
            result = pb.PooledResult(table=table, dim=dim, num_bags=lengths.size)
            if offload == "switch":
                pooled = self.store.lookup_pooled(table, ids, lengths, weights, mode, tier_rows, part_rows, unknown)
                if outs and outs[k] is not None:
                    shm.write_slice(*outs[k], pooled.astype(dt, copy=False))
                    result.in_shm = True
                else:
                    result.values = wire(pooled, dt)
            elif offload == "host":
                gathered = ids
                if distinct and self.store.key_space(table) != "managed":
                    gathered, inverse = np.unique(ids, return_inverse=True)
                    result.index = inverse.astype("<i4").tobytes()
                result.rows = wire(self.store.lookup(table, gathered, tier_rows, part_rows, unknown), dt)
            else:
                present, partials = self.store.pool_partials(table, ids, lengths, weights, mode, tier_rows, part_rows,
                                                             unknown)
                result.parts.extend(names[p] for p in present)
                result.partials = wire(partials, dt)
            result.unknown_ids = int(unknown[0])
            self.traces.observe(table, ids, lengths)
            self.metrics.served("LookupPooled", table, tier_rows, row_bytes,
                                len(result.values) + len(result.rows) + len(result.partials) + len(result.index))
            traffic.add_table(names, part_rows, lengths.size, dim, row_bytes, dt.itemsize)
            results.append(result)
            read[table] = read[table] + tier_rows if table in read else tier_rows
        return results, read
