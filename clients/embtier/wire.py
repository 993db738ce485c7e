"""The vocabulary of the wire contract, defined once for the client and the daemon.

The daemon imports this module and the generated stubs (embtier.v1) from the
client package and nothing else of it; the client builds its requests and
reads its replies with the same names.  Each mapping is ordered as its enum
(or the kernels' numbering), name -> wire value; `name_of` reads the other way.

Also here: the info types both sides use (TableInfo, TierInfo, PortInfo,
TablePolicy), each converted to and from its message in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from embtier.v1 import embtier_pb2 as pb

TIERS = ("dram", "cxl", "scm")      # fastest first; a tier's index is its id in the kernels' placement entries
MEMORY_TIERS = TIERS[:2]            # the tiers a table may have a limit of its own in
DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "int8": pb.INT8}  # how a table stores its rows
WIRE_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16}             # how values travel
WIRE_ARRAYS = {"float32": "<f4", "float16": "<f2"}                       # ... as numpy dtypes
ID_TYPES = {"int64": pb.INT64, "int32": pb.INT32}
ID_ARRAYS = {"int64": "<i8", "int32": "<i4"}
INITIALIZERS = {"zeros": pb.ZEROS, "uniform": pb.UNIFORM}
POOL_MODES = {"sum": pb.SUM, "mean": pb.MEAN, "max": pb.MAX}
WRITE_MODES = {"assign": pb.ASSIGN, "add": pb.ADD}
# Same-host shared memory: the side socket where a client registers regions is the daemon's gRPC Unix
# socket's path + SHM_SOCKET_SUFFIX (SOCK_SEQPACKET; JSON messages of at most SHM_MESSAGE_BYTES, a
# region's memfd passed with SCM_RIGHTS).
SHM_SOCKET_SUFFIX = ".shm"
SHM_MESSAGE_BYTES = 4096
OFFLOADS = {"host": pb.HOST, "device": pb.DEVICE, "switch": pb.SWITCH}
KEY_SPACES = {"dense": pb.KEY_SPACE_DENSE, "hashed": pb.KEY_SPACE_HASHED, "managed": pb.KEY_SPACE_MANAGED,
              "mapped": pb.KEY_SPACE_MAPPED}
POLICIES = ("lfu", "lru")           # tiering policies (a string on the wire)
CHECKPOINT_KINDS = {"full": pb.FULL, "incremental": pb.INCREMENTAL, "differential": pb.DIFFERENTIAL,
                    "auto": pb.AUTO}  # what a request asks for; a checkpoint written is one of the first three
QUANTIZERS = {"adaptive": pb.ADAPTIVE, "minmax": pb.MINMAX}
QUANT_BITS = (0, 2, 3, 4, 8)        # bits per value of a checkpoint; 0 = exact
TENANT_METADATA_KEY = "embtier-tenant"  # gRPC metadata naming a request's tenant (none: the default tenant)
# gRPC metadata of a call on the Unix socket: the credential the side socket gave this client (a token
# standing for its uid, gid and groups, which the daemon read with SO_PEERCRED).
CREDENTIAL_METADATA_KEY = "embtier-credential"
ROLES = ("none", "reader", "writer", "admin")  # what a peer may do ([auth]), each role allowing the one before it
# gRPC metadata of a cluster client's request: the shard plan version it routed by.  A daemon whose plan
# is newer answers FAILED_PRECONDITION with its version in the trailing metadata under the same key.
PLAN_METADATA_KEY = "embtier-plan-version"
TABLE_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # what a table's name may be
TENANT_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # what a tenant's name may be
TENANT_PRIORITIES = (0, 9)          # a tenant's priority, lowest to highest (served first)


def name_of(mapping: dict[str, int], value: int) -> str:
    """The name a mapping above gives value (KeyError for a value it does not have)."""
    for name, code in mapping.items():
        if code == value:
            return name
    raise KeyError(value)


@dataclass(frozen=True)
class PortInfo:
    """One port of the CXL tier: a CPU-less NUMA node, or a segment of an emulated tier."""

    name: str
    numa_node: int  # -1 when emulated
    capacity_bytes: int
    used_bytes: int

    def to_message(self) -> pb.PortInfo:
        return pb.PortInfo(name=self.name, numa_node=self.numa_node, capacity_bytes=self.capacity_bytes,
                           used_bytes=self.used_bytes)

    @classmethod
    def from_message(cls, m: pb.PortInfo) -> PortInfo:
        return cls(m.name, m.numa_node, m.capacity_bytes, m.used_bytes)


@dataclass(frozen=True)
class TierInfo:
    name: str
    capacity_bytes: int
    used_bytes: int
    numa_node: int  # -1 when not bound to one node (emulated CXL, SCM)
    emulated: bool
    path: str       # the SCM file, "" for memory tiers
    ports: tuple[PortInfo, ...] = ()  # the CXL tier's ports

    def to_message(self) -> pb.TierInfo:
        return pb.TierInfo(name=self.name, capacity_bytes=self.capacity_bytes, used_bytes=self.used_bytes,
                           numa_node=self.numa_node, emulated=self.emulated, path=self.path,
                           ports=[p.to_message() for p in self.ports])

    @classmethod
    def from_message(cls, m: pb.TierInfo) -> TierInfo:
        return cls(m.name, m.capacity_bytes, m.used_bytes, m.numa_node, m.emulated, m.path,
                   tuple(PortInfo.from_message(p) for p in m.ports))


@dataclass(frozen=True)
class TableInfo:
    name: str
    num_rows: int
    dim: int
    dtype: str
    rows_by_tier: dict[str, int]
    bytes_by_tier: dict[str, int]
    version: int                    # bumped by every write
    metadata_bytes: int             # placement map, counters, chunk tables
    emulated_by_tier: dict[str, bool]
    rows_by_port: dict[str, int] = field(default_factory=dict)  # CXL rows per fabric port
    key_space: str = "dense"
    key_seed: int = 0                # hashed and mapped
    default_value: float = 0.0       # managed: what unknown ids read
    live_ids: int = 0                # managed: ids with a row now
    key_evictions: int = 0           # managed: so far
    map_bytes: int = 0               # managed and mapped: the id -> row map
    unknown_ids: int = 0             # managed: ids lookups found unknown, so far
    recent_key_evictions: int = 0    # managed: evictions of ids written within the hour before, so far
    mapped_ids: int = 0              # mapped: the ids its mapping lists
    mapping_hash_from: int = 0       # mapped: unlisted ids hash into rows [mapping_hash_from, num_rows)

    @property
    def metadata_bytes_per_row(self) -> float:
        return self.metadata_bytes / self.num_rows

    def to_message(self) -> pb.TableInfo:
        return pb.TableInfo(name=self.name, num_rows=self.num_rows, dim=self.dim, dtype=DTYPES[self.dtype],
                            rows_by_tier=self.rows_by_tier, bytes_by_tier=self.bytes_by_tier, version=self.version,
                            metadata_bytes=self.metadata_bytes, emulated_by_tier=self.emulated_by_tier,
                            rows_by_port=self.rows_by_port, key_space=KEY_SPACES[self.key_space],
                            key_seed=self.key_seed, default_value=self.default_value, live_ids=self.live_ids,
                            key_evictions=self.key_evictions, map_bytes=self.map_bytes, unknown_ids=self.unknown_ids,
                            recent_key_evictions=self.recent_key_evictions, mapped_ids=self.mapped_ids,
                            mapping_hash_from=self.mapping_hash_from)

    @classmethod
    def from_message(cls, m: pb.TableInfo) -> TableInfo:
        dtype = name_of(DTYPES, m.dtype) if m.dtype in DTYPES.values() else str(m.dtype)
        key_space = name_of(KEY_SPACES, m.key_space) if m.key_space in KEY_SPACES.values() else str(m.key_space)
        return cls(m.name, m.num_rows, m.dim, dtype, dict(m.rows_by_tier), dict(m.bytes_by_tier), m.version,
                   m.metadata_bytes, dict(m.emulated_by_tier), dict(sorted(m.rows_by_port.items())), key_space,
                   m.key_seed, m.default_value, m.live_ids, m.key_evictions, m.map_bytes, m.unknown_ids,
                   m.recent_key_evictions, m.mapped_ids, m.mapping_hash_from)


@dataclass(frozen=True)
class TablePolicy:
    """A table's tiering settings and the engine's last interval for it (GetPolicy, SetPolicy)."""

    table: str
    policy: str
    pin_tier: str                 # "" = not pinned
    dram_capacity_bytes: int      # -1 = no limit of the table's own
    cxl_capacity_bytes: int
    rows_moved: int               # in the engine's last interval
    migration_backlog_rows: int
    interval_seconds: float
    bandwidth_bytes_per_second: int
    tiering_enabled: bool

    def to_message(self) -> pb.TablePolicy:
        return pb.TablePolicy(**{name: getattr(self, name) for name in self.__dataclass_fields__})

    @classmethod
    def from_message(cls, m: pb.TablePolicy) -> TablePolicy:
        return cls(**{name: getattr(m, name) for name in cls.__dataclass_fields__})
