"""The embtier client: numpy in, numpy out, over gRPC.

Arrays go on the wire as raw little-endian bytes (no per-element Python
work); failures raise EmbtierClientError carrying the status code and the
daemon's message.  Calls that are safe to repeat are retried on UNAVAILABLE
with exponential backoff (a daemon restarting, a socket not there yet);
WriteRows with add=True is not, since a retry could apply the update twice.

On a Unix socket, the client connects to the daemon's side socket (embtier.shm) on its first call:
there it gets the credential that tells the daemon its uid and groups ([auth]; sent with every call
as metadata, renewed when the daemon no longer knows it), and, with server.shared_memory on,
lookup_pooled passes ids and pooled values through shared memory instead of the wire.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .shm import SharedMemory, SharedMemoryError, aligned, side_socket
from .v1 import embtier_pb2 as pb
from .v1 import embtier_pb2_grpc as pb_grpc
from .wire import (
    CHECKPOINT_KINDS,
    CREDENTIAL_METADATA_KEY,
    DTYPES,
    ID_ARRAYS,
    ID_TYPES,
    INITIALIZERS,
    KEY_SPACES,
    OFFLOADS,
    POOL_MODES,
    QUANTIZERS,
    TENANT_METADATA_KEY,
    WIRE_ARRAYS,
    WIRE_DTYPES,
    WRITE_MODES,
    TableInfo,
    TablePolicy,
    TierInfo,
    name_of,
)

MAX_MESSAGE_BYTES = 256 << 20
SHM_RETRY_SECONDS = 5.0  # after a failed connection to the side socket (credentials, shared memory)


class EmbtierClientError(Exception):
    """A failed call: code is the grpc.StatusCode, message the daemon's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str):
        super().__init__(f"{method}: {code.name}: {message}")
        self.code = code
        self.message = message
        self.method = method


@dataclass(frozen=True)
class TlsOptions:
    """PEM file paths: ca verifies the daemon; cert and key identify this client (mutual TLS)."""

    ca: str
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("TlsOptions: a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


@dataclass(frozen=True)
class Trace:
    """A recorded id trace and what `embtier simulate` needs to replay it."""

    ids: np.ndarray
    seconds: float
    num_rows: int
    row_bytes: int
    dram_rows: int
    cxl_rows: int
    interval_seconds: float
    bandwidth_bytes_per_second: int
    heat_sample_shift: int
    policy: str
    key_space: str = "dense"  # what the ids are: rows (dense), or keys the table hashes or maps (recorded raw)
    key_seed: int = 0
    lengths: np.ndarray | None = None  # int32: the bags the ids came in (a Lookup's ids are one bag)


@dataclass(frozen=True)
class TableMapping:
    """A MAPPED table's mapping: ids[i] -> rows[i]; any other id hashes into [hash_from, num_rows)
    with seed (embtier.keys.mapped_rows)."""

    table: str
    ids: np.ndarray
    rows: np.ndarray
    num_rows: int
    hash_from: int
    seed: int


@dataclass(frozen=True)
class FabricTraffic:
    """What one LookupPooled moved across the emulated fabric (FabricAccounting): bytes per link,
    and a MODELLED transfer time (from the daemon's configured link figures, not measured)."""

    offload: str
    device_link_bytes: dict[str, int]
    host_link_bytes: int
    modelled_seconds: float


def pool_rows(rows: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, mode: str) -> np.ndarray:
    """Host offload: the client pools the rows ([n, dim] -> [bags, dim]; empty bags are zeros)."""
    out = np.zeros((lengths.size, rows.shape[1]), dtype=np.float32)
    if weights is not None:
        rows = rows * weights[:, None]
    full = np.flatnonzero(lengths > 0)
    if not full.size:
        return out
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))[full]
    if mode == "max":
        out[full] = np.maximum.reduceat(rows, starts, axis=0)
    else:
        out[full] = np.add.reduceat(rows, starts, axis=0, dtype=np.float32)
        if mode == "mean":
            out[full] /= lengths[full, None].astype(np.float32)
    return out


def combine_partials(partials: np.ndarray, lengths: np.ndarray, mode: str) -> np.ndarray:
    """Device offload: the client adds the ports' partials ([parts, bags, dim] -> [bags, dim])."""
    if mode == "max":
        out = partials.max(axis=0)
        out[lengths == 0] = 0.0
        return out
    total = partials.sum(axis=0, dtype=np.float32)
    if mode == "mean":
        total /= np.maximum(lengths, 1)[:, None].astype(np.float32)
    return total


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint (CheckpointInfo)."""

    id: int
    parent_id: int
    base_id: int
    kind: str               # "full", "incremental", "differential"
    quant_bits: int         # 0 = exact
    quantizer: str          # "exact", "adaptive", "minmax"
    lsn: int
    rows_written: int
    bytes_written: int
    duration_seconds: float
    snapshot_seconds: float
    created_unix_seconds: float
    tables: tuple[str, ...]
    exact_chain: bool       # exact and intact: a restart can recover from it
    damage: str = ""        # why it cannot be restored ("" when its files check out)


def _checkpoint(m: pb.CheckpointInfo) -> Checkpoint:
    return Checkpoint(
        id=m.id, parent_id=m.parent_id, base_id=m.base_id, kind=name_of(CHECKPOINT_KINDS, m.kind),
        quant_bits=m.quant_bits, quantizer=name_of(QUANTIZERS, m.quantizer) if m.quant_bits else "exact",
        lsn=m.lsn, rows_written=m.rows_written, bytes_written=m.bytes_written, duration_seconds=m.duration_seconds,
        snapshot_seconds=m.snapshot_seconds, created_unix_seconds=m.created_unix_seconds, tables=tuple(m.tables),
        exact_chain=m.exact_chain, damage=m.damage)


def _policy_fields(policy, pin_tier, dram_capacity_bytes, cxl_capacity_bytes) -> dict:
    fields = {"policy": policy, "pin_tier": pin_tier, "dram_capacity_bytes": dram_capacity_bytes,
              "cxl_capacity_bytes": cxl_capacity_bytes}
    return {k: v for k, v in fields.items() if v is not None}


def _ids(ids) -> tuple[bytes, int]:
    """(bytes, IdType): int32 when every id fits in it (half the bytes), else int64 as given."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    if ids.size and 0 <= ids.min() and ids.max() < 2**31:
        return _bytes(ids, ID_ARRAYS["int32"]), ID_TYPES["int32"]
    return _bytes(ids, ID_ARRAYS["int64"]), ID_TYPES["int64"]


def _bytes(arr, dtype: str) -> bytes:
    """arr as contiguous little-endian bytes of dtype (a copy only when it is not already that)."""
    return np.ascontiguousarray(arr, dtype=np.dtype(dtype)).tobytes()


class LookupShorthands:
    """The lookups every client offers in terms of its lookup_counted and lookup_pooled_counted (Client
    for one daemon, ClusterClient for a cluster)."""

    def lookup(self, table: str, ids, wire_dtype: str = "float32") -> np.ndarray:
        """[len(ids), dim] float32 rows (sent as float16 on the wire when asked)."""
        return self.lookup_counted(table, ids, wire_dtype)[0]

    def lookup_pooled(self, features: Mapping[str, tuple], mode: str = "sum", wire_dtype: str = "float32",
                      offload: str | None = None) -> dict[str, np.ndarray]:
        """{table: (ids, lengths[, weights])} -> {table: [bags, dim] float32}.

        offload: where pooling happens: "switch" (the daemon pools, one vector per bag travels),
        "device" (each fabric port pools its rows, the partials travel and are added here), "host"
        (the rows travel and are pooled here), None = the daemon's default.  The results are the same
        up to float summation order; lookup_pooled_fabric also returns the fabric accounting."""
        return self.lookup_pooled_fabric(features, mode, wire_dtype, offload)[0]

    def lookup_pooled_fabric(self, features: Mapping[str, tuple], mode: str = "sum", wire_dtype: str = "float32",
                             offload: str | None = None) -> tuple[dict[str, np.ndarray], FabricTraffic]:
        """lookup_pooled, and what the request moved across the emulated fabric (modelled)."""
        out, traffic, _ = self.lookup_pooled_counted(features, mode, wire_dtype, offload)
        return out, traffic


class Client(LookupShorthands):
    """A connection to one embtierd: `Client("unix:///run/embtier/embtierd.sock")` or `Client("host:50051")`."""

    def __init__(self, target: str, timeout: float | None = 30.0, tls: TlsOptions | None = None,
                 retries: int = 4, backoff_seconds: float = 0.1, tenant: str | None = None,
                 channel_options: Sequence[tuple[str, int]] = (), shared_memory: bool | None = None):
        """timeout: each call's gRPC deadline in seconds (None: none, and a lookup gets its tenant's
        default deadline); tenant: the tenant every call is made as (None: the default tenant);
        channel_options: more gRPC channel arguments; shared_memory: pass lookup_pooled's ids and
        results through shared memory on a Unix socket (None: when the daemon offers it; True: insist,
        FAILED_PRECONDITION when it cannot; False: never)."""
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *channel_options]
        self.channel = (grpc.secure_channel(target, tls.credentials(), options) if tls
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.EmbeddingStoreStub(self.channel)
        self.timeout = timeout
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self._tenant_metadata = () if tenant is None else ((TENANT_METADATA_KEY, tenant),)
        self.metadata = self._tenant_metadata  # and the credential, once the side socket gave one
        self._shm_path = side_socket(target)
        self._shm_wanted = shared_memory is not False
        self._shm_required = bool(shared_memory)
        if shared_memory and self._shm_path is None:
            raise ValueError(f"shared_memory needs a Unix socket target (unix:///path), not {target!r}")
        self._shm: SharedMemory | None = None  # the side connection
        self._shm_offered = False  # whether the daemon at the side connection has shared memory on
        self._shm_next_try = 0.0  # (monotonic seconds) when to try connecting to the side socket again
        self._shm_lock = threading.Lock()
        self._dims: dict[str, int] = {}

    def _side(self) -> SharedMemory | None:
        """The connection to the daemon's side socket, made on first use (with the credential it gives);
        None when the target is not a Unix socket or the daemon has no side socket (auth and shared
        memory off).  A failed connection is tried again SHM_RETRY_SECONDS later (the daemon may be
        restarting)."""
        if self._shm is None and self._shm_path is not None and time.monotonic() >= self._shm_next_try:
            with self._shm_lock:
                if self._shm is None and time.monotonic() >= self._shm_next_try:
                    try:
                        side = SharedMemory(self._shm_path)
                        try:
                            credential = side.credential()
                        except (OSError, ValueError):
                            side.close()
                            raise OSError("the side socket did not answer") from None
                    except OSError as e:
                        self._shm_next_try = time.monotonic() + SHM_RETRY_SECONDS
                        if self._shm_required:
                            raise EmbtierClientError(grpc.StatusCode.FAILED_PRECONDITION, f"shared memory: cannot "
                                                     f"connect to {self._shm_path}: {e}", "SharedMemory") from None
                        return None
                    if credential is None:  # auth off: the side socket is there for shared memory
                        self._shm_offered = True
                    else:
                        self._shm_offered = bool(credential.get("shared_memory"))
                        self.metadata = (*self._tenant_metadata, (CREDENTIAL_METADATA_KEY, credential["token"]))
                    self._shm = side
        return self._shm

    @property
    def shared_memory(self) -> SharedMemory | None:
        """The side connection when lookup_pooled may use shared memory through it: None when the target
        is not a Unix socket, shared memory is off there or the client was told not to use it."""
        side = self._side() if self._shm_wanted else None
        if side is not None and not self._shm_offered:
            if self._shm_required:
                raise EmbtierClientError(grpc.StatusCode.FAILED_PRECONDITION, "shared memory is off on the daemon "
                                         "at this socket (server.shared_memory = false)", "SharedMemory")
            return None
        return side

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, idempotent: bool = True):
        attempts = self.retries + 1 if idempotent else 1
        self._side()
        for attempt in range(attempts):
            try:
                return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    time.sleep(self.backoff_seconds * 2**attempt)
                    continue
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and self._shm is not None:
                    # the daemon restarted and knows our credential no more (the call was refused before
                    # it did anything, so it is safe to send again, idempotent or not): get a new one, once
                    self._forget_shared_memory(self._shm)
                    self._side()
                    try:
                        return getattr(self.stub, method)(request, timeout=self.timeout, metadata=self.metadata)
                    except grpc.RpcError as again:
                        e = again
                raise EmbtierClientError(e.code(), e.details() or "", method) from None
        raise AssertionError("unreachable")

    # ---- tables ------------------------------------------------------------

    def create_table(self, name: str, num_rows: int, dim: int, dtype: str = "float32",
                     initializer: str = "zeros", seed: int = 0, init_scale: float = 0.0, *,
                     policy: str | None = None, pin_tier: str | None = None, dram_capacity_bytes: int | None = None,
                     cxl_capacity_bytes: int | None = None, key_space: str = "dense", default_value: float = 0.0,
                     key_seed: int = 0, mapping_ids=None, mapping_rows=None, mapping_hash_from: int = 0,
                     mapping_from: str = "", receiving: bool = False) -> TableInfo:
        """A new table.  The keyword-only tiering settings are as for set_policy (None: the daemon's
        configuration for this name).  key_space: "dense" (ids are rows), "hashed" (any int64 id, the
        row embtier.keys.hashed_rows gives with key_seed), "managed" (any int64 id, a row of its own
        from its first write; unknown ids read default_value) or "mapped" (mapping_ids[i] ->
        mapping_rows[i], any other id hashed into [mapping_hash_from, num_rows) with key_seed:
        embtier.keys.mapped_rows; or mapping_from, the name of a mapped table whose mapping to take).
        receiving: a dense table that a shard move fills (write_rows with fill=True)."""
        mapping = {}
        if mapping_ids is not None or mapping_rows is not None:
            mapping = {"mapping_ids": np.ascontiguousarray(mapping_ids, dtype="<i8").tobytes(),
                       "mapping_rows": np.ascontiguousarray(mapping_rows, dtype="<i8").tobytes()}
        request = pb.CreateTableRequest(name=name, num_rows=num_rows, dim=dim, dtype=DTYPES[dtype],
                                        initializer=INITIALIZERS[initializer], seed=seed, init_scale=init_scale,
                                        key_space=KEY_SPACES[key_space], default_value=default_value,
                                        key_seed=key_seed, mapping_hash_from=mapping_hash_from,
                                        mapping_from=mapping_from, receiving=receiving, **mapping,
                                        **_policy_fields(policy, pin_tier, dram_capacity_bytes, cxl_capacity_bytes))
        return TableInfo.from_message(self._call("CreateTable", request, idempotent=False))

    def drop_table(self, name: str) -> None:
        self._call("DropTable", pb.DropTableRequest(name=name), idempotent=False)

    def tables(self) -> list[TableInfo]:
        return [TableInfo.from_message(t) for t in self._call("ListTables", pb.ListTablesRequest()).tables]

    def describe(self, name: str) -> TableInfo:
        return TableInfo.from_message(self._call("DescribeTable", pb.DescribeTableRequest(name=name)))

    def tiers(self) -> list[TierInfo]:
        return [TierInfo.from_message(t) for t in self._call("GetTiers", pb.GetTiersRequest()).tiers]

    def heat(self, table: str) -> tuple[list[str], dict[str, list[int]]]:
        """(heat bins, {tier: rows per bin}) of a table."""
        reply = self._call("GetHeat", pb.GetHeatRequest(table=table))
        return list(reply.bins), {t.tier: list(t.histogram) for t in reply.tiers}

    def policy(self, table: str) -> TablePolicy:
        """A table's tiering settings and the engine's last interval for it."""
        return TablePolicy.from_message(self._call("GetPolicy", pb.GetPolicyRequest(table=table)))

    def set_policy(self, table: str, policy: str | None = None, pin_tier: str | None = None,
                   dram_capacity_bytes: int | None = None, cxl_capacity_bytes: int | None = None) -> TablePolicy:
        """Changes the settings given (None leaves one as it is): policy "lfu" or "lru"; pin_tier "dram",
        "cxl", "scm" or "" (unpin); a capacity in bytes is the table's own limit in that tier, -1 none."""
        request = pb.SetPolicyRequest(table=table, **_policy_fields(policy, pin_tier, dram_capacity_bytes,
                                                                    cxl_capacity_bytes))
        return TablePolicy.from_message(self._call("SetPolicy", request))

    def record_trace(self, table: str, max_ids: int, timeout_seconds: float = 60.0) -> Trace:
        """The ids of the table's next lookups (up to max_ids, or what arrived within timeout_seconds)."""
        request = pb.RecordTraceRequest(table=table, max_ids=max_ids, timeout_seconds=timeout_seconds)
        reply = self._call("RecordTrace", request, idempotent=False)
        return Trace(ids=np.frombuffer(reply.ids, dtype="<i8").astype(np.int64), seconds=reply.seconds,
                     num_rows=reply.num_rows, row_bytes=reply.row_bytes, dram_rows=reply.dram_rows,
                     cxl_rows=reply.cxl_rows, interval_seconds=reply.interval_seconds,
                     bandwidth_bytes_per_second=reply.bandwidth_bytes_per_second,
                     heat_sample_shift=reply.heat_sample_shift, policy=reply.policy,
                     key_space=name_of(KEY_SPACES, reply.key_space), key_seed=reply.key_seed,
                     lengths=np.frombuffer(reply.lengths, dtype="<i4").astype(np.int32))

    def export_mapping(self, table: str, page_ids: int = 0) -> TableMapping:
        """A MAPPED table's mapping, read a page (page_ids listed ids; 0: as many as a reply holds) at a
        time."""
        ids, rows, offset, total = [], [], 0, None
        while total is None or offset < total:
            reply = self._call("ExportMapping", pb.ExportMappingRequest(table=table, offset=offset, max_ids=page_ids))
            ids.append(np.frombuffer(reply.ids, dtype="<i8").astype(np.int64))
            rows.append(np.frombuffer(reply.rows, dtype="<i8").astype(np.int64))
            offset, total = offset + reply.count, reply.total
            if reply.count == 0 and offset < total:
                raise EmbtierClientError(grpc.StatusCode.INTERNAL, f"ExportMapping returned no ids at offset "
                                         f"{offset} of {total}", "ExportMapping")
        return TableMapping(table, np.concatenate(ids), np.concatenate(rows), reply.num_rows, reply.hash_from,
                            reply.key_seed)

    def checkpoint(self, kind: str = "full", quant_bits: int = 0, quantizer: str = "adaptive") -> Checkpoint:
        """Writes a checkpoint of every table: kind "full", "incremental", "differential" or "auto";
        quant_bits 0 (exact), 8, 4, 3 or 2; quantizer "adaptive" or "minmax"."""
        if kind not in CHECKPOINT_KINDS or quantizer not in QUANTIZERS:
            raise ValueError(f"kind must be one of {', '.join(CHECKPOINT_KINDS)} and quantizer one of "
                             f"{', '.join(QUANTIZERS)}; got {kind!r}, {quantizer!r}")
        request = pb.CheckpointRequest(kind=CHECKPOINT_KINDS[kind], quant_bits=quant_bits,
                                       quantizer=QUANTIZERS[quantizer])
        return _checkpoint(self._call("Checkpoint", request, idempotent=False))

    def checkpoints(self) -> list[Checkpoint]:
        """The published checkpoints, oldest first."""
        reply = self._call("ListCheckpoints", pb.ListCheckpointsRequest(), idempotent=True)
        return [_checkpoint(m) for m in reply.checkpoints]

    def restore(self, checkpoint_id: int) -> tuple[Checkpoint, Checkpoint | None]:
        """Replaces every table by checkpoint checkpoint_id's; returns (it, the full exact checkpoint
        the daemon published of the result, or None when it could not write one: the restore stands,
        its log holds it)."""
        reply = self._call("RestoreCheckpoint", pb.RestoreCheckpointRequest(id=checkpoint_id), idempotent=False)
        return _checkpoint(reply.restored), _checkpoint(reply.saved) if reply.HasField("saved") else None

    # ---- rows --------------------------------------------------------------

    def write_rows(self, table: str, ids, values, add: bool = False, scale: float = 1.0, by_row: bool = False) -> int:
        """Assigns values[i] to the row of ids[i], or adds scale * values[i] with add=True; returns the table
        version.  by_row: ids are rows of a hashed or mapped table, not its keys (importing rows trained offline)."""
        return self._write(table, ids, values, add, scale, by_row, False).version

    def fill_rows(self, table: str, ids, values) -> int:
        """Copies rows into a receiving table (create_table receiving=True): values[i] lands on row ids[i]
        only where no plain write has set it since the table was made; returns how many rows it wrote."""
        return self._write(table, ids, values, False, 1.0, False, True).rows_written

    def _write(self, table: str, ids, values, add: bool, scale: float, by_row: bool, fill: bool):
        id_bytes, id_type = _ids(ids)
        request = pb.WriteRowsRequest(table=table, ids=id_bytes, id_type=id_type, values=_bytes(values, "<f4"),
                                      mode=WRITE_MODES["add" if add else "assign"], scale=scale, by_row=by_row,
                                      fill=fill)
        return self._call("WriteRows", request, idempotent=not add)

    def lookup_distinct(self, table: str, ids, wire_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
        """(rows, index): the rows of the distinct ids in ascending id order, [k, dim] float32, each sent
        once, and for each of ids its row in them (int32 [len(ids)]): rows[index] is lookup(table, ids).
        Pool them with index as the bags' ids (torch's embedding_bag(index, rows, offsets))."""
        request, _ = self._lookup_request(table, ids, wire_dtype)
        request.distinct = True
        reply = self._call("Lookup", request)
        dt = np.dtype(WIRE_ARRAYS[wire_dtype])
        rows = np.frombuffer(reply.values, dtype=dt).reshape(reply.count, reply.dim).astype(np.float32, copy=False)
        return rows, np.frombuffer(reply.index, dtype="<i4")

    def lookup_counted(self, table: str, ids, wire_dtype: str = "float32") -> tuple[np.ndarray, int]:
        """lookup, and how many of the ids a managed table did not know (they read its default row)."""
        request, decode = self._lookup_request(table, ids, wire_dtype)
        return decode(self._call("Lookup", request))

    def lookup_counted_start(self, table: str, ids, wire_dtype: str = "float32") -> Callable[[], tuple[np.ndarray, int]]:
        """lookup_counted sent without waiting (no retries): the function that waits for its answer."""
        request, decode = self._lookup_request(table, ids, wire_dtype)
        return self._start("Lookup", request, decode)

    @staticmethod
    def _lookup_request(table: str, ids, wire_dtype: str):
        code, dt = WIRE_DTYPES[wire_dtype], np.dtype(WIRE_ARRAYS[wire_dtype])
        id_bytes, id_type = _ids(ids)

        def decode(reply) -> tuple[np.ndarray, int]:
            rows = np.frombuffer(reply.values, dtype=dt).reshape(reply.count, reply.dim).astype(np.float32, copy=False)
            return rows, reply.unknown_ids
        return pb.LookupRequest(table=table, ids=id_bytes, id_type=id_type, wire_dtype=code), decode

    def _start(self, method: str, request, decode: Callable):
        """The call sent, not waited for: a function that waits and returns decode(reply), or raises
        EmbtierClientError."""
        self._side()
        future = getattr(self.stub, method).future(request, timeout=self.timeout, metadata=self.metadata)

        def finish():
            try:
                reply = future.result()
            except grpc.RpcError as e:
                raise EmbtierClientError(e.code(), e.details() or "", method) from None
            return decode(reply)
        return finish

    def lookup_pooled_counted(self, features: Mapping[str, tuple], mode: str = "sum", wire_dtype: str = "float32",
                              offload: str | None = None) -> tuple[dict[str, np.ndarray], FabricTraffic, dict[str, int]]:
        """lookup_pooled_fabric, and per table how many ids a managed table did not know (each
        pooled its default row)."""
        channel = self.shared_memory if offload in (None, "switch") else None
        if channel is not None:
            done = self._pooled_shared(channel, features, mode, wire_dtype)
            if done is not None:
                return done
        request, decode = self._pooled_request(features, mode, wire_dtype, offload)
        return decode(self._call("LookupPooled", request))

    def _dim(self, table: str) -> int:
        if table not in self._dims:
            self._dims[table] = self.describe(table).dim
        return self._dims[table]

    def _pooled_shared(self, channel: SharedMemory, features: Mapping[str, tuple], mode: str, wire_dtype: str):
        """lookup_pooled_counted through shared memory (offload SWITCH); None when it cannot be used for this
        request (a table it cannot describe, a region the daemon refuses): the caller sends it on the wire."""
        dt = np.dtype(WIRE_ARRAYS[wire_dtype])
        try:
            dims = {table: self._dim(table) for table in features}
        except EmbtierClientError:
            return None  # (the wire request reports what is wrong)
        arrays, end = [], 0
        for table, (ids, lengths, *rest) in features.items():
            weights = rest[0] if rest and rest[0] is not None else None
            parts = {"ids": np.ascontiguousarray(ids, dtype="<i8"), "lengths": np.ascontiguousarray(lengths, "<i4"),
                     "weights": None if weights is None else np.ascontiguousarray(weights, "<f4")}
            placed = {}
            for name, arr in parts.items():
                if arr is not None:
                    placed[name] = (end, arr)
                    end = aligned(end + arr.nbytes)
            out_bytes = parts["lengths"].size * dims[table] * dt.itemsize
            placed["out"] = (end, out_bytes)
            end = aligned(end + out_bytes)
            arrays.append((table, placed))
        try:
            region = channel.lease(end)
        except SharedMemoryError:  # refused (a region too large for the daemon): this request goes on the wire
            return None
        except OSError:  # the side connection is gone (the daemon restarted): reconnect on the next call
            self._forget_shared_memory(channel)
            return None
        try:
            view = np.frombuffer(region.mapping, dtype=np.uint8)
            bags = []
            for table, placed in arrays:
                bag = pb.FeatureBags(table=table, id_type=ID_TYPES["int64"])
                for name, (offset, arr) in placed.items():
                    size = arr if name == "out" else arr.nbytes
                    if name != "out":
                        view[offset:offset + size] = arr.view(np.uint8).reshape(-1)
                    getattr(bag, f"{name}_shm").CopyFrom(pb.SharedSlice(region=region.name, token=region.token,
                                                                        offset=offset, size=size))
                bags.append(bag)
            del view
            request = pb.LookupPooledRequest(features=bags, mode=POOL_MODES[mode], wire_dtype=WIRE_DTYPES[wire_dtype],
                                             offload=OFFLOADS["switch"])
            reply = self._call("LookupPooled", request)
            out = {}
            for r, (_, placed) in zip(reply.results, arrays, strict=True):
                values = (np.frombuffer(region.mapping, dtype=dt, count=r.num_bags * r.dim, offset=placed["out"][0])
                          if r.in_shm else np.frombuffer(r.values, dtype=dt))
                out[r.table] = values.reshape(r.num_bags, r.dim).astype(np.float32, copy=True)
                del values
            f = reply.fabric
            traffic = FabricTraffic(name_of(OFFLOADS, f.offload), dict(f.device_link_bytes), f.host_link_bytes,
                                    f.modelled_seconds)
            return out, traffic, {r.table: r.unknown_ids for r in reply.results}
        except EmbtierClientError as e:
            if e.code == grpc.StatusCode.INVALID_ARGUMENT and "out_shm" in e.message:
                self._dims.clear()  # a table was made again with another dim: ask afresh next time
            if e.code == grpc.StatusCode.NOT_FOUND and "shared-memory region" in e.message:
                self._forget_shared_memory(channel)  # a daemon that restarted knows no region of ours
                return None
            raise
        except ValueError:  # the region was unmapped under us (another call found the connection gone)
            return None
        finally:
            channel.release(region)

    def _forget_shared_memory(self, channel: SharedMemory) -> None:
        """Drops a side connection that stopped working, and its credential; the next call connects afresh."""
        with self._shm_lock:
            if self._shm is channel:
                self._shm, self._shm_next_try = None, 0.0
                self.metadata = self._tenant_metadata
                self._dims.clear()
        channel.close()

    def lookup_pooled_start(self, features: Mapping[str, tuple], mode: str = "sum", wire_dtype: str = "float32",
                            offload: str | None = None) -> Callable[[], tuple[dict, FabricTraffic, dict[str, int]]]:
        """lookup_pooled_counted sent without waiting (no retries): the function that waits for its answer."""
        request, decode = self._pooled_request(features, mode, wire_dtype, offload)
        return self._start("LookupPooled", request, decode)

    @staticmethod
    def _pooled_request(features: Mapping[str, tuple], mode: str, wire_dtype: str, offload: str | None):
        code, dt = WIRE_DTYPES[wire_dtype], np.dtype(WIRE_ARRAYS[wire_dtype])
        if offload is not None and offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {', '.join(OFFLOADS)} or None; got {offload!r}")
        bags, inputs = [], {}
        for table, arrays in features.items():
            ids, lengths, *rest = arrays
            weights = rest[0] if rest and rest[0] is not None else None
            id_bytes, id_type = _ids(ids)
            bags.append(pb.FeatureBags(table=table, ids=id_bytes, id_type=id_type, lengths=_bytes(lengths, "<i4"),
                                       weights=b"" if weights is None else _bytes(weights, "<f4")))
            inputs[table] = (np.asarray(lengths, dtype=np.int64),
                             None if weights is None else np.asarray(weights, dtype=np.float32))
        # distinct: under HOST offload each distinct id's row travels once (the daemon ignores it otherwise)
        request = pb.LookupPooledRequest(features=bags, mode=POOL_MODES[mode], wire_dtype=code, distinct=True)
        if offload is not None:
            request.offload = OFFLOADS[offload]

        def decode(reply) -> tuple[dict[str, np.ndarray], FabricTraffic, dict[str, int]]:
            out = {}
            for r in reply.results:
                lengths, weights = inputs[r.table]
                if r.values:  # switch: pooled by the daemon
                    out[r.table] = np.frombuffer(r.values, dtype=dt).reshape(r.num_bags, r.dim).astype(
                        np.float32, copy=False)
                elif r.parts:  # device: add the ports' partials here
                    partials = np.frombuffer(r.partials, dtype=dt).reshape(len(r.parts), r.num_bags, r.dim)
                    out[r.table] = combine_partials(partials.astype(np.float32, copy=False), lengths, mode)
                else:  # host: pool the rows here (none at all when every bag is empty)
                    rows = np.frombuffer(r.rows, dtype=dt).reshape(-1, r.dim).astype(np.float32, copy=False)
                    if r.index:  # each distinct id's row came once
                        rows = rows[np.frombuffer(r.index, dtype="<i4")]
                    out[r.table] = pool_rows(rows, lengths, weights, mode)
            f = reply.fabric
            traffic = FabricTraffic(name_of(OFFLOADS, f.offload), dict(f.device_link_bytes), f.host_link_bytes,
                                    f.modelled_seconds)
            return out, traffic, {r.table: r.unknown_ids for r in reply.results}
        return request, decode


def wait_serving(target: str, proc=None, timeout: float = 60.0) -> None:
    """Polls the daemon's health service until it reports SERVING.  With proc (a Popen), a daemon
    that exits first raises RuntimeError; after timeout seconds, TimeoutError."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"embtierd exited with {proc.returncode} before serving")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"embtierd did not serve on {target} within {timeout} s")
