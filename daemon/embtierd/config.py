"""Configuration: one TOML document, described once by the schema KEYS.

Each key is declared once in KEYS: its dotted name, its check (what it accepts and what Config
holds for it), its default as TOML writes it and its description.  From KEYS come the defaults
(the daemon starts with no file at all; DEFAULT_TOML is their text), the checks of load()
(types, ranges, choices, unknown keys; errors are one line naming the key and the value), the
defaults of the dataclasses below, and the sample deploy/systemd/embtierd.toml
(`python -m embtierd.config --write-sample PATH`).  A file and explicit overrides are merged key
by key; a key they leave out takes its default.  Sizes accept bytes (4294967296), human sizes
("512M", "4G", "1.5T") or a share of the memory available at start ("25%", or a float in
(0, 1]) measured with psutil.  README.md's Configuration table documents every key (a test holds
it to KEYS).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import sys
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from embtier.sizes import parse_bytes
from embtier.wire import (
    CHECKPOINT_KINDS,
    MEMORY_TIERS,
    OFFLOADS,
    POLICIES,
    QUANT_BITS,
    QUANTIZERS,
    ROLES,
    TABLE_NAME_RE,
    TENANT_NAME_RE,
    TENANT_PRIORITIES,
    TIERS,
)

from embtierd.durability.wal import FSYNC_POLICIES
from embtierd.errors import ConfigError
from embtierd.tiering.config import TableGroup, TableSettings, TieringConfig

# ---- checks: (value as TOML has it, dotted key, available memory or None) -> what Config holds ----

Check = Callable[[Any, str, "int | None"], Any]

_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


def _toml(value: Any) -> str:
    """value as a TOML literal; large floats in short exponent form (31.5e9 as 3.15e10)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return f"[{', '.join(map(_toml, value))}]"
    if isinstance(value, float) and abs(value) >= 1e6:
        short = re.sub(r"e\+0*", "e", f"{value:g}")
        if float(short) == value:
            return short
    return repr(value)


def _expected(name: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{name}: expected {what}, got {value!r}")


def _share(value: Any) -> float | None:
    """The fraction a float or a percentage ("25%") stands for, None for anything else."""
    if isinstance(value, float):
        return value
    if isinstance(value, str) and (m := _PERCENT_RE.match(value)):
        return float(m.group(1)) / 100
    return None


def parse_size(value: Any, field: str, available_bytes: int | None = None) -> int:
    """Bytes for a size value (embtier.sizes); percentages and fractions are of available memory."""
    fraction = _share(value)
    if fraction is None:
        try:
            return parse_bytes(value)
        except (ValueError, TypeError) as e:
            hint = " or a share of memory (\"25%\")" if "cannot read" in str(e) else ""
            raise ConfigError(f"{field}: {e}{hint}") from None
    if not 0 < fraction <= 1:
        raise ConfigError(f"{field}: a share of available memory must be in (0, 1], got {value!r}")
    avail = psutil.virtual_memory().available if available_bytes is None else available_bytes
    return int(avail * fraction)


def integer(lo: int, hi: int) -> Check:
    def check(value: Any, name: str, _available: int | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _expected(name, f"an integer in [{lo}, {hi}]", value)
        return value
    return check


def number(lo: float, hi: float | None = None) -> Check:
    """A float in [lo, hi] (hi None: no upper bound); TOML integers are taken as floats."""
    span = f"a number >= {_toml(lo)}" if hi is None else f"a number in [{_toml(lo)}, {_toml(hi)}]"
    top = math.inf if hi is None else hi

    def check(value: Any, name: str, _available: int | None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= top:
            raise _expected(name, span, value)
        return float(value)
    return check


def one_of(choices: Any) -> Check:
    """One of choices, of the same type (no 1 for True, 512.0 for 512 or "8" for 8)."""
    shown = ", ".join(str(c) or '""' for c in choices)

    def check(value: Any, name: str, _available: int | None) -> Any:
        if not any(type(value) is type(c) and value == c for c in choices):
            raise _expected(name, f"one of {shown}", value)
        return value
    return check


def boolean(value: Any, name: str, _available: int | None) -> bool:
    if not isinstance(value, bool):
        raise _expected(name, "true or false", value)
    return value


def _string(value: Any, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise _expected(name, what, value)
    return value


def string(what: str) -> Check:
    return lambda value, name, _available: _string(value, name, what)


def directory(value: Any, name: str, _available: int | None) -> Path:
    if not isinstance(value, str) or not value:
        raise _expected(name, "a directory path", value)
    return Path(value).expanduser()


def file_or_default(value: Any, name: str, _available: int | None) -> Path | None:
    """A file path, None for "" (the caller's default)."""
    path = _string(value, name, 'a file path or ""')
    return Path(path) if path else None


def pem_file(value: Any, name: str, _available: int | None) -> Path | None:
    """A PEM file path, or None for ""; the file must exist and be readable now."""
    path = _string(value, name, "a path to a PEM file")
    if not path:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"{name}: {path} {reason}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{name}: {path} is not readable by this user")
    return path


def listen_addresses(value: Any, name: str, _available: int | None) -> tuple[str, ...]:
    """A list of addresses; one address alone is a list of one."""
    addresses = [value] if isinstance(value, str) else value
    if not isinstance(addresses, list) or not all(isinstance(a, str) and a for a in addresses):
        raise _expected(name, 'a list of addresses ("unix:///path", "host:port")', value)
    return tuple(addresses)


def etcd_endpoints(value: Any, name: str, _available: int | None) -> tuple[str, ...]:
    """A list of etcd endpoints, each "host:port"."""
    endpoints = [value] if isinstance(value, str) else value
    if not isinstance(endpoints, list) or not all(
            isinstance(e, str) and e.rpartition(":")[0] and e.rpartition(":")[2].isdigit() for e in endpoints):
        raise _expected(name, 'a list of etcd endpoints ("host:port")', value)
    return tuple(endpoints)


def cluster_name(value: Any, name: str, _available: int | None) -> str:
    if not isinstance(value, str) or (value and not TABLE_NAME_RE.fullmatch(value)):
        raise _expected(name, 'a cluster name (letters, digits, "_", ".", "-") or ""', value)
    return value


def interface_name(value: Any, name: str, _available: int | None) -> str:
    if (not isinstance(value, str) or len(value) > 15  # IFNAMSIZ - 1
            or any(c.isspace() or c == "/" for c in value)):
        raise _expected(name, 'a network interface name ("eth0") or ""', value)
    return value


def numa_nodes(value: Any, name: str, _available: int | None) -> tuple[int, ...] | None:
    """None for "auto", else the node ids of one id or a non-empty list of distinct ids, in order."""
    if isinstance(value, str) and value == "auto":
        return None
    ids = list(value) if isinstance(value, list | tuple) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise _expected(name, '"auto", a NUMA node id or a non-empty list of node ids (ids >= 0)', value)
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{name}: node id(s) {', '.join(map(str, duplicates))} listed more than once "
                          f"in {value!r}")
    return tuple(ids)


def tier_limit(value: Any, name: str, _available: int | None) -> int | float:
    """A table's own limit in a tier: bytes (an int), or a share of the tier's capacity (a float in [0, 1])."""
    share = _share(value)
    if share is None:
        return parse_size(value, name)
    if not 0 <= share <= 1:
        raise ConfigError(f"{name}: a share of the tier's capacity must be in [0, 1] (0% to 100%), got {value!r}")
    return share


def _sub_tables(value: Any, name: str, available: int | None, keys: tuple[Key, ...], what: str,
                name_re: re.Pattern | None = None) -> dict[str, dict[str, Any]]:
    """A table of tables (tiering.tables, tenants): NAME -> its keys, checked, those it leaves out at
    their defaults; name_re, when given, is what NAME must match."""
    if not isinstance(value, dict):
        raise _expected(name, f"a table of {what}", value)
    checked = {}
    for sub, settings in value.items():
        where = f"{name}.{sub}"
        if name_re is not None and not name_re.fullmatch(sub):
            raise ConfigError(f"{where}: a name of 1-64 characters of [A-Za-z0-9_.-] is needed, got {sub!r}")
        if not isinstance(settings, dict):
            raise _expected(where, f"a table of {', '.join(k.name for k in keys)}", settings)
        _refuse_unknown(settings, {k.name for k in keys}, where)
        checked[sub] = {k.name: k.check(settings[k.name], f"{where}.{k.name}", available) if k.name in settings
                        else k.default for k in keys}
    return checked


def table_names(value: Any, name: str, _available: int | None) -> tuple[str, ...]:
    """A list of table names, each once."""
    if not isinstance(value, list) or not all(isinstance(v, str) and TABLE_NAME_RE.fullmatch(v) for v in value):
        raise _expected(name, "a list of table names (1-128 characters of [A-Za-z0-9_.-])", value)
    if len(set(value)) != len(value):
        raise ConfigError(f"{name}: {min(v for v in set(value) if value.count(v) > 1)!r} is listed twice")
    return tuple(value)


def tables(value: Any, name: str, available: int | None) -> dict[str, dict[str, Any]]:
    """tiering.tables: table name -> its TABLE_KEYS."""
    return _sub_tables(value, name, available, TABLE_KEYS, "per-table settings")


def tenants(value: Any, name: str, available: int | None) -> dict[str, dict[str, Any]]:
    """tenants: tenant name -> its TENANT_KEYS."""
    return _sub_tables(value, name, available, TENANT_KEYS, "tenants", TENANT_NAME_RE)


def tenant_names(value: Any, name: str, _available: int | None) -> tuple[str, ...]:
    """A list of tenant names."""
    if not isinstance(value, list) or not all(isinstance(v, str) and TENANT_NAME_RE.fullmatch(v) for v in value):
        raise _expected(name, "a list of tenant names (1-64 characters of [A-Za-z0-9_.-])", value)
    return tuple(dict.fromkeys(value))


def grants(value: Any, name: str, available: int | None) -> dict[str, dict[str, Any]]:
    """auth.grants: grant name -> its GRANT_KEYS (every grant names an identity)."""
    checked = _sub_tables(value, name, available, GRANT_KEYS, "grants", TENANT_NAME_RE)
    for sub, grant in checked.items():
        if not grant["identity"]:
            raise ConfigError(f"{name}.{sub}.identity: every grant names an identity "
                              '("uid:N", "user:NAME", "gid:N", "group:NAME" or "cert:NAME")')
    return checked


# ---- the schema ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One configuration key.  default is as TOML writes it (None: no value of its own, TABLE_KEYS
    only); attr is the Config attribute it fills when that is not the name's last part."""

    name: str
    check: Check
    default: Any
    doc: str
    attr: str = ""

    @property
    def section(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def attribute(self) -> str:
        return self.attr or self.leaf


KEYS: tuple[Key, ...] = (
    Key("state_dir", directory, ".state",
        "Directory of the write-ahead log (wal/), the checkpoints (checkpoints/) and, unless "
        "tiers.scm.path says otherwise, the SCM file."),

    Key("server.listen", listen_addresses, [],
        'gRPC listen addresses ("unix:///path", "host:port"). An empty list means the default socket '
        "(/run/embtier/embtierd.sock when running as root, else $XDG_RUNTIME_DIR/embtier or the state "
        "directory) and 127.0.0.1:50051."),
    Key("server.metrics_listen", string('"host:port" or ""'), "127.0.0.1:9464",
        'Prometheus /metrics endpoint ("" turns it off).'),
    Key("server.max_message_bytes", parse_size, "256M", "Largest gRPC message in either direction."),
    Key("server.max_ids_per_request", integer(1, 1 << 31), 4194304,
        "More ids in one request is RESOURCE_EXHAUSTED, refused before any work."),
    Key("server.grace_seconds", number(0), 10.0, "How long a shutdown waits for calls in flight."),
    Key("server.worker_threads", integer(1, 1024), 8, "Threads serving gRPC calls."),
    Key("server.listen_interface", interface_name, "",
        'Also listen on every address of this network interface (e.g. "eth0"; IPv6 link-local '
        "addresses left out) at listen_port, resolved when the daemon starts."),
    Key("server.listen_port", integer(1, 65535), 50051, "The port for the listen_interface addresses."),
    Key("server.idle_timeout_seconds", number(0, 86400), 300.0,
        "A connection with no call for this long is closed (clients reconnect on their next call); "
        "0: never."),
    Key("server.keepalive_seconds", number(1, 86400), 60.0,
        "Ping a connection quiet this long; one whose peer does not answer within 20 s is closed."),
    Key("server.handshake_timeout_seconds", number(0.1, 3600), 10.0,
        "A connection that has not finished its TLS and HTTP/2 setup by then is closed."),
    Key("server.shared_memory", boolean, False,
        "Same-host shared memory for LookupPooled: clients on the Unix socket register memfd regions over "
        'its side socket (the socket\'s path + ".shm", same mode) and pass ids and results through them '
        "(daemon/embtierd/rpc/shm.py); the client library uses it on its own when it is on."),
    Key("server.shared_memory_max_bytes", parse_size, "1G", "The largest shared-memory region a client may register."),
    Key("server.tls.cert", pem_file, "",
        "PEM server certificate chain; with key, TCP listeners speak TLS (Unix sockets stay plaintext)."),
    Key("server.tls.key", pem_file, "",
        "PEM private key of cert (unencrypted: protect it with file permissions)."),
    Key("server.tls.client_ca", pem_file, "",
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."),

    Key("tiers.dram.capacity", parse_size, "25%",
        "DRAM tier size; bound (mbind) to the NUMA nodes that have CPUs.", attr="capacity_bytes"),
    Key("tiers.dram.huge_pages", boolean, True, "Ask for transparent huge pages (madvise)."),
    Key("tiers.cxl.capacity", parse_size, "10%", "CXL tier size.", attr="capacity_bytes"),
    Key("tiers.cxl.node", numa_nodes, "auto",
        "NUMA node(s) of the CXL memory, one port of the CXL fabric each: a node id, a list of "
        'CPU-less node ids (node = [2, 3], kept in that order, no repeats), or "auto", every CPU-less '
        "node with memory in id order; on a host without one the tier is emulated in DRAM and "
        "reported as emulated.", attr="nodes"),
    Key("tiers.cxl.huge_pages", boolean, True, "As for DRAM."),
    Key("tiers.cxl.emulated_latency_ns", integer(0, 1_000_000), 0,
        "When the CXL tier is emulated, latency in ns injected per CXL row a lookup serves, for "
        "benchmarks; 0 is off, ignored on real CXL."),
    Key("tiers.scm.capacity", parse_size, "16G",
        "SCM tier size (a sparse file; each chunk's blocks are reserved when a table first puts rows "
        "there).", attr="capacity_bytes"),
    Key("tiers.scm.path", file_or_default, "",
        'The SCM file; "" puts it in state_dir (scm.dat). Must be on a file system with O_DIRECT '
        "(not tmpfs); it is emptied at start."),
    Key("tiers.scm.read_align_bytes", one_of((0, 512, 1024, 2048, 4096)), 0,
        "O_DIRECT read granularity; 0 probes the smallest the device accepts (512 or 4096)."),

    Key("tiering.enabled", boolean, True, "Run the tiering engine (tracker -> policy -> mover)."),
    Key("tiering.interval_seconds", number(0.01, 3600), 1.0,
        "One plan and its moves per interval; moves not done within it wait for the next (the backlog)."),
    Key("tiering.bandwidth", parse_size, "256M",
        "Migration budget in bytes per second (rows moved x row bytes), shared by all tables.",
        attr="bandwidth_bytes_per_second"),
    Key("tiering.hysteresis", number(0, 100), 0.25,
        "LFU: a hot row displaces a cold one only when its heat exceeds the cold row's by this factor."),
    Key("tiering.aging_intervals", integer(1, 1000), 4, "LFU: heat is halved every this many intervals."),
    Key("tiering.policy", one_of(POLICIES), "lfu",
        'Policy of the tables tiering.tables does not name: "lfu" (LFU with aging) or "lru" (promote '
        "on access, evict the least recently used)."),
    Key("tiering.tables", tables, {},
        "Per-table settings: a [tiering.tables.NAME] table for each table that needs its own, e.g. "
        '[tiering.tables.user_ids] with policy = "lfu", dram = "40%", cxl = "4G". Its keys:'),

    Key("durability.wal", boolean, True,
        "Log table creations, drops, row writes and SetPolicy changes to state_dir/wal and replay them at start."),
    Key("durability.fsync", one_of(FSYNC_POLICIES), "always",
        '"always": a write is acknowledged once the log is fsynced (concurrent writers share one '
        'fsync); "interval": fsync every fsync_interval_seconds (a crash loses at most that window); '
        '"off": the OS flushes when it likes.'),
    Key("durability.fsync_interval_seconds", number(0.001, 60), 0.05, 'The window of "interval".'),
    Key("durability.checkpoints.interval_seconds", number(0, 86400 * 7), 600,
        "Time between scheduled checkpoints; 0 = only on request (`embtier checkpoint`)."),
    Key("durability.checkpoints.kind", one_of(CHECKPOINT_KINDS), "auto",
        'Kind of the scheduled ones: "full", "incremental" (changes since the last checkpoint), '
        '"differential" (since the last full) or "auto" (differential until auto_full_ratio says full).'),
    Key("durability.checkpoints.quant_bits", one_of(QUANT_BITS), 0,
        "Bits per value of the scheduled ones: 0 (exact; the only kind recovery uses), 8, 4, 3, 2 "
        "(row-wise asymmetric)."),
    Key("durability.checkpoints.quantizer", one_of(QUANTIZERS), "adaptive",
        'How quantized checkpoints pick each row\'s range: "adaptive" or "minmax".'),
    Key("durability.checkpoints.keep", integer(1, 1000), 2,
        "The newest checkpoints kept, and as many exact ones, and the fallback (the newest exact one "
        "that shares no file with the newest exact one's chain); the log is kept back to the fallback, "
        "so one damaged checkpoint file never loses an acknowledged write."),
    Key("durability.checkpoints.auto_full_ratio", number(0.01, 100), 1.0,
        '"auto" writes a full checkpoint once the bytes written since the last full would pass this '
        "times a full one's, or the log kept would."),

    Key("fabric.offload", one_of(OFFLOADS), "switch",
        'Where LookupPooled pools when a request does not say: "host" (the client pools the rows), '
        '"device" (each CXL port pools its rows, the client adds the partials) or "switch" (the daemon '
        "adds them)."),
    Key("fabric.cxl_ports", integer(1, 64), 4,
        "Ports an emulated CXL tier is split into (a real tier has one per CPU-less node it uses)."),
    Key("fabric.rebalance_tolerance", number(0, 100), 0.1,
        "How far above the mean the busiest CXL port's heat may be before the tiering engine moves "
        "rows between ports to level it (0.1 = 10 %)."),
    Key("fabric.device_link_bytes_per_second", number(1e6, 1e13), 31.5e9,
        "Modelled (never measured) bandwidth of a CXL port's link to the switch: CXL 2.0 over PCIe 5.0 "
        "x8, 32 GT/s x 8 lanes x 128/130 = 31.5 GB/s."),
    Key("fabric.host_link_bytes_per_second", number(1e6, 1e13), 63.0e9,
        "Modelled bandwidth of the switch's link to the host (x16: 63 GB/s)."),
    Key("fabric.hop_latency_ns", number(0, 1e7), 40,
        "Modelled latency of each hop: a CXL memory access through a pool costs 70-90 ns more than "
        "local DRAM (Pond, ASPLOS'23), two hops of 40 ns."),

    Key("kernels.kernel_threads", integer(1, 256), 1,
        "Threads that split the bags of one lookup (the caller plus a pool)."),
    Key("kernels.prefetch_distance", integer(0, 256), 16,
        "Rows ahead that the lookup loops prefetch (0 turns prefetch off)."),
    Key("kernels.heat_sample_shift", integer(0, 16), 3,
        "Count 1 in 2^shift row accesses in the heat counters (0 counts all)."),
    Key("kernels.scm_queue_depth", integer(1, 256), 64, "SCM reads in flight per lookup."),

    Key("scheduler.enabled", boolean, True,
        "Serve Lookup and LookupPooled from one queue in front of the kernels, highest tenant priority "
        "first, then earliest deadline, refusing (DEADLINE_EXCEEDED) a request predicted to miss its "
        "deadline; false: each runs on its gRPC thread as it arrives, deadlines only counted."),
    Key("scheduler.kernel_workers", integer(1, 256), 2,
        "Lookups that run at once, each on its own gRPC thread (about one per core the kernels may use); the "
        "others wait in the queue."),
    Key("scheduler.max_queued", integer(1, 65536), 512,
        "Lookups waiting in the queue at most; one more is RESOURCE_EXHAUSTED."),
    Key("cluster.name", cluster_name, "",
        "The cluster this daemon is a host of (tables sharded over several daemons, coordinated through "
        'etcd; embtierd --cluster NAME@HOST:PORT sets it and the endpoints); "" (the default): none.'),
    Key("cluster.endpoints", etcd_endpoints, ["127.0.0.1:2379"], "The cluster's etcd endpoints (host:port)."),
    Key("cluster.node_id", string("a node id or \"\""), "",
        'This daemon\'s id in the cluster (stable across restarts); "": the host name.'),
    Key("cluster.advertise", string('"host:port" or ""'), "",
        'The address the cluster\'s clients reach this daemon at; "": the first TCP listen address.'),
    Key("cluster.lease_seconds", integer(1, 300), 5,
        "The registration's lease: a daemon not heard from for this long leaves the plan's live set."),
    Key("tenants", tenants, {},
        "Tenants (one per model or service), each a [tenants.NAME] table, named per request by the gRPC "
        'metadata key "embtier-tenant" (a request without it is tenant "default", which a [tenants.default] '
        "table may configure; another name not configured is INVALID_ARGUMENT). Its keys:"),

    Key("auth.enabled", boolean, True,
        "Check each call's role against its method (daemon/embtierd/rpc/auth.py): reader (lookups, describe, "
        "list, tiers, heat), writer (also WriteRows, CreateTable), admin (also DropTable, SetPolicy, Checkpoint, "
        "RestoreCheckpoint, RecordTrace). false: every peer is admin."),
    Key("auth.anonymous", one_of(ROLES), "reader",
        "The role of a peer with no identity (plaintext TCP, TLS without a client certificate, a Unix peer "
        "that sent no credential), and every peer's floor; \"none\" allows health checks only."),
    Key("auth.group", one_of(ROLES), "writer",
        "The role of Unix socket peers in the daemon's group (the socket's group; mode 0660 lets them "
        "connect), and of Unix peers that send no credential (all the socket's mode says of them is that "
        "much). Root and the daemon's own user are admin."),
    Key("auth.grants", grants, {},
        "Roles granted to identities, each an [auth.grants.NAME] table; a peer's role is the highest it is "
        "granted. Its keys:"),
)

TABLE_KEYS: tuple[Key, ...] = (
    Key("policy", one_of(POLICIES), None, "This table's policy; default tiering.policy."),
    Key("pin", one_of(("", *TIERS)), "",
        '"dram", "cxl" or "scm": every row of the table lives there (creation fails if it cannot) and '
        'the policy leaves it alone; "" (the default): none.'),
    *(Key(tier, tier_limit, None, f"The table's own limit in {tier.upper()}: a size, or a share of the "
          'tier ("25%", 0.25); none by default.') for tier in MEMORY_TIERS),
)
"""The keys of one [tiering.tables.NAME] table."""

TENANT_KEYS: tuple[Key, ...] = (
    Key("priority", integer(*TENANT_PRIORITIES), 1,
        "0-9: the queue serves a higher priority first; under overload lower ones are shed first."),
    Key("deadline_ms", number(0.01, 3_600_000), 1000.0,
        "The deadline of a request that sets none (a gRPC deadline wins), in milliseconds."),
    Key("max_in_flight", integer(1, 1 << 20), 64,
        "Lookups of the tenant queued or running at once; one more is RESOURCE_EXHAUSTED."),
    Key("tables", table_names, [], "The tables the tenant owns (a table belongs to one tenant at most)."),
    *(Key(tier, tier_limit, None, f"The most of {tier.upper()} the tenant's tables hold together, given to "
          'their hottest rows whichever table they are in: a size or a share of the tier ("30%", 0.3); none '
          "by default.") for tier in MEMORY_TIERS),
)
"""The keys of one [tenants.NAME] table."""

GRANT_KEYS: tuple[Key, ...] = (
    Key("identity", string("an identity"), "",
        '"uid:N", "user:NAME", "gid:N" or "group:NAME" (a Unix socket peer, or a member of the group), or '
        '"cert:NAME" (a client certificate with NAME as its common name or a subject alternative name).'),
    Key("role", one_of(ROLES), "reader", "The role granted."),
    Key("tenants", tenant_names, [],
        "The tenants it is granted as; none: every tenant. An identity whose grants all name tenants may act "
        "as those tenants only."),
)
"""The keys of one [auth.grants.NAME] table."""

SUB_TABLES = {"tiering.tables": TABLE_KEYS, "tenants": TENANT_KEYS, "auth.grants": GRANT_KEYS}
"""The keys that hold a table of tables, and the keys of each."""

def key_names() -> list[str]:
    """Every key's dotted name, a table's as tiering.tables.NAME.KEY (a tenant's tenants.NAME.KEY)."""
    return [name for key in KEYS for name in
            ([f"{key.name}.NAME.{k.name}" for k in SUB_TABLES[key.name]] if key.name in SUB_TABLES else [key.name])]


def _default(name: str) -> Any:
    """Key name's default as Config holds it: the defaults of the dataclasses below."""
    key = next(key for key in KEYS if key.name == name)
    return key.check(key.default, name, None)


# ---- what the daemon reads: frozen dataclasses, filled from KEYS by build() -----------------------


@dataclass(frozen=True)
class MemoryTierConfig:
    """A DRAM or CXL tier ([tiers.dram], [tiers.cxl]): anonymous memory bound to NUMA nodes.

    nodes is None for auto-detection (and for DRAM); emulated_latency_ns is CXL's only."""

    capacity_bytes: int
    huge_pages: bool
    nodes: tuple[int, ...] | None = None
    emulated_latency_ns: int = 0


@dataclass(frozen=True)
class ScmTierConfig:
    """The SCM tier ([tiers.scm]): one O_DIRECT file."""

    capacity_bytes: int
    path: Path
    read_align_bytes: int


@dataclass(frozen=True)
class ClusterConfig:
    """Membership of a cluster ([cluster], daemon/embtierd/cluster/)."""

    name: str = _default("cluster.name")
    endpoints: tuple[str, ...] = tuple(_default("cluster.endpoints"))
    node_id: str = _default("cluster.node_id")
    advertise: str = _default("cluster.advertise")
    lease_seconds: int = _default("cluster.lease_seconds")


@dataclass(frozen=True)
class KernelConfig:
    """Knobs of the native lookup kernels ([kernels])."""

    kernel_threads: int
    prefetch_distance: int
    heat_sample_shift: int
    scm_queue_depth: int


@dataclass(frozen=True)
class FabricConfig:
    """The emulated CXL fabric of LookupPooled ([fabric], daemon/fabric.py)."""

    offload: str = _default("fabric.offload")
    cxl_ports: int = _default("fabric.cxl_ports")
    rebalance_tolerance: float = _default("fabric.rebalance_tolerance")
    device_link_bytes_per_second: float = _default("fabric.device_link_bytes_per_second")
    host_link_bytes_per_second: float = _default("fabric.host_link_bytes_per_second")
    hop_latency_ns: float = _default("fabric.hop_latency_ns")


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the TCP listeners ([server.tls]; Unix sockets stay plaintext): PEM paths, None = not set.

    cert and key on: TLS; client_ca as well: mutual TLS (clients must present
    a certificate signed by a CA in that bundle).
    """

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC front ([server]): listeners, TLS, limits and how long idle or silent connections are kept."""

    listen: tuple[str, ...]
    metrics_listen: str
    max_message_bytes: int
    max_ids_per_request: int
    grace_seconds: float
    worker_threads: int
    listen_interface: str = _default("server.listen_interface")
    listen_port: int = _default("server.listen_port")
    tls: TlsConfig = TlsConfig()
    idle_timeout_seconds: float = _default("server.idle_timeout_seconds")
    keepalive_seconds: float = _default("server.keepalive_seconds")
    handshake_timeout_seconds: float = _default("server.handshake_timeout_seconds")
    shared_memory: bool = _default("server.shared_memory")
    shared_memory_max_bytes: int = _default("server.shared_memory_max_bytes")


@dataclass(frozen=True)
class CheckpointConfig:
    """Periodic checkpoints in <state_dir>/checkpoints ([durability.checkpoints], durability/checkpoint.py)."""

    interval_seconds: float = _default("durability.checkpoints.interval_seconds")
    kind: str = _default("durability.checkpoints.kind")
    quant_bits: int = _default("durability.checkpoints.quant_bits")
    quantizer: str = _default("durability.checkpoints.quantizer")
    keep: int = _default("durability.checkpoints.keep")
    auto_full_ratio: float = _default("durability.checkpoints.auto_full_ratio")


@dataclass(frozen=True)
class DurabilityConfig:
    """The write-ahead log of table creations, drops and row writes, in <state_dir>/wal ([durability])."""

    wal: bool = _default("durability.wal")
    fsync: str = _default("durability.fsync")
    fsync_interval_seconds: float = _default("durability.fsync_interval_seconds")
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass(frozen=True)
class SchedulerConfig:
    """The queue of Lookup and LookupPooled in front of the kernels ([scheduler], tenancy/scheduler.py)."""

    enabled: bool = _default("scheduler.enabled")
    kernel_workers: int = _default("scheduler.kernel_workers")
    max_queued: int = _default("scheduler.max_queued")


DEFAULT_TENANT = "default"
"""The tenant of a request that names none."""


@dataclass(frozen=True)
class TenantConfig:
    """One tenant ([tenants.NAME]): how its lookups are queued and limited."""

    name: str
    priority: int = 1
    deadline_seconds: float = 1.0
    max_in_flight: int = 64


def _groups(tenants: dict[str, dict[str, Any]], tier_bytes: dict[str, int]) -> tuple[TableGroup, ...]:
    """The tenants that own tables and have a share of a memory tier, as the tiering engine's groups;
    ConfigError for a table two tenants own."""
    owner: dict[str, str] = {}
    for name, t in tenants.items():
        for table in t["tables"]:
            if table in owner:
                raise ConfigError(f"tenants.{name}.tables: table {table!r} is tenant {owner[table]!r}'s already "
                                  f"(a table belongs to one tenant at most)")
            owner[table] = name
    return tuple(TableGroup(name, t["tables"], {tier: int(tier_bytes[tier] * t[tier]) if isinstance(t[tier], float)
                                                else t[tier] for tier in MEMORY_TIERS})
                 for name, t in tenants.items() if t["tables"] and any(t[tier] is not None for tier in MEMORY_TIERS))


def _tenants(tables: dict[str, dict[str, Any]]) -> dict[str, TenantConfig]:
    """The checked [tenants.NAME] tables, and the default tenant (at its defaults unless configured)."""
    out = {name: TenantConfig(name, t["priority"], t["deadline_ms"] / 1000.0, t["max_in_flight"])
           for name, t in tables.items()}
    out.setdefault(DEFAULT_TENANT, TenantConfig(DEFAULT_TENANT))
    return out


@dataclass(frozen=True)
class AuthConfig:
    """Who may do what ([auth], rpc/auth.py): grants are NAME -> its GRANT_KEYS."""

    enabled: bool = _default("auth.enabled")
    anonymous: str = _default("auth.anonymous")
    group: str = _default("auth.group")
    grants: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """The daemon's configuration, as build() makes it from a TOML document."""

    state_dir: Path
    server: ServerConfig
    tiering: TieringConfig
    dram: MemoryTierConfig
    cxl: MemoryTierConfig
    scm: ScmTierConfig
    kernels: KernelConfig
    durability: DurabilityConfig = DurabilityConfig()
    fabric: FabricConfig = FabricConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    cluster: ClusterConfig = ClusterConfig()
    tenants: dict[str, TenantConfig] = field(default_factory=lambda: _tenants({}))
    auth: AuthConfig = AuthConfig()


# ---- loading --------------------------------------------------------------------------------------


def merge(base: dict, override: dict) -> dict:
    """Recursive merge of two TOML tables; override wins key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _sections() -> dict[str, set[str]]:
    """Each table of the document ("" is the top level) -> the names it may hold."""
    known: dict[str, set[str]] = {}
    for key in KEYS:
        parts = key.name.split(".")
        for depth, part in enumerate(parts):
            known.setdefault(".".join(parts[:depth]), set()).add(part)
    return known


def _refuse_unknown(table: dict, known: set[str] | dict, where: str) -> None:
    unknown = set(table) - set(known)
    if unknown:
        head = f"{where}: unknown key(s)" if where else "unknown top-level key(s):"
        raise ConfigError(f"{head} {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")


def _table(doc: dict, path: str) -> dict:
    """The table at dotted path in doc ({} where the document has none)."""
    parts = path.split(".") if path else []
    for depth, part in enumerate(parts):
        doc = doc.get(part, {})
        if not isinstance(doc, dict):
            raise _expected(".".join(parts[:depth + 1]), "a table", doc)
    return doc


def _checked(doc: dict, available_bytes: int | None) -> dict[str, Any]:
    """Every key's value in doc (or its default), checked: dotted name -> what Config holds."""
    for section, names in _sections().items():
        _refuse_unknown(_table(doc, section), names, section)
    return {key.name: key.check(_table(doc, key.section).get(key.leaf, key.default), key.name, available_bytes)
            for key in KEYS}


def _tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsConfig:
    if (cert is None) != (key is None):
        given, missing = ("cert", "key") if key is None else ("key", "cert")
        raise ConfigError(f"server.tls.{given} is set but server.tls.{missing} is not: "
                          f"TLS needs both the certificate chain and its private key")
    if client_ca is not None and cert is None:
        raise ConfigError("server.tls.client_ca needs server.tls.cert and server.tls.key: "
                          "mutual TLS is TLS with client certificates")
    return TlsConfig(cert=cert, key=key, client_ca=client_ca)


def _table_settings(table: dict[str, Any], policy: str, tier_bytes: dict[str, int]) -> TableSettings:
    """A checked [tiering.tables.NAME]: its policy or the default one, shares of a tier in bytes."""
    limits = {tier: int(tier_bytes[tier] * table[tier]) if isinstance(table[tier], float) else table[tier]
              for tier in MEMORY_TIERS}
    return TableSettings(policy=table["policy"] or policy, pin=table["pin"], capacity_bytes=limits)


def build(doc: dict, available_bytes: int | None = None) -> Config:
    """Checks a TOML document (a key it leaves out takes its default) into a Config."""
    values = _checked(doc, available_bytes)

    def section(path: str) -> dict[str, Any]:
        """The checked keys of the table at path, by the name of the attribute each fills."""
        return {key.attribute: values[key.name] for key in KEYS if key.section == path}

    top, dram, cxl = section(""), MemoryTierConfig(**section("tiers.dram")), MemoryTierConfig(**section("tiers.cxl"))
    tenant_tables = top.pop("tenants")
    scm, tiering = section("tiers.scm"), section("tiering")
    tier_bytes = {"dram": dram.capacity_bytes, "cxl": cxl.capacity_bytes}
    tiering["tables"] = {name: _table_settings(table, tiering["policy"], tier_bytes)
                         for name, table in tiering["tables"].items()}
    tiering["groups"] = _groups(tenant_tables, tier_bytes)
    return Config(
        **top,
        server=ServerConfig(**section("server"), tls=_tls(**section("server.tls"))),
        dram=dram,
        cxl=cxl,
        scm=ScmTierConfig(**{**scm, "path": scm["path"] or top["state_dir"] / "scm.dat"}),
        tiering=TieringConfig(**tiering),
        durability=DurabilityConfig(**section("durability"),
                                    checkpoints=CheckpointConfig(**section("durability.checkpoints"))),
        fabric=FabricConfig(**section("fabric")),
        kernels=KernelConfig(**section("kernels")),
        scheduler=SchedulerConfig(**section("scheduler")),
        cluster=ClusterConfig(**section("cluster")),
        tenants=_tenants(tenant_tables),
        auth=AuthConfig(**section("auth")),
    )


def load(path: str | Path | None = None, overrides: dict | None = None,
         available_bytes: int | None = None) -> Config:
    """The defaults, under the file at path (if any), under overrides."""
    doc: dict = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from e
    return build(merge(doc, overrides or {}), available_bytes)


# ---- interfaces and addresses (resolved when the daemon starts) ------------------------------------


def interface_addresses(ifname: str) -> list[str]:
    """The IPv4 then IPv6 addresses of network interface ifname, as strings ("127.0.0.1", "::1").

    IPv6 link-local addresses (fe80::/10) are left out: they cannot be listened
    on without a zone.  Raises ConfigError for an unknown interface (naming the
    ones that exist) and for an interface without a usable address.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            links = ipr.get_links(ifname=ifname)
        except NetlinkError:  # older pyroute2 raises ENODEV, newer ones return nothing
            links = ()
        if not links:
            names = sorted(str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links())
            raise ConfigError(f"server.listen_interface: no network interface {ifname!r}; "
                              f"interfaces: {', '.join(names) or '(none)'}")
        records = ipr.get_addr(index=links[0]["index"])
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for record in records:
        # IFA_LOCAL is this end of a point-to-point link, where IFA_ADDRESS is the peer
        text = record.get_attr("IFA_LOCAL") or record.get_attr("IFA_ADDRESS")
        if not text:
            continue
        address = ipaddress.ip_address(text)
        if address.version == 6 and address.is_link_local:
            continue
        if address not in found:
            found.append(address)
    if not found:
        raise ConfigError(f"server.listen_interface: interface {ifname!r} has no IPv4 or (non link-local) "
                          f"IPv6 address to listen on")
    return [str(a) for a in sorted(found, key=lambda a: a.version)]


def tcp_address(host: str, port: int) -> str:
    """host:port for gRPC, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- TOML text: the embedded default and the sample ------------------------------------------------


def _comment(text: str, indent: str = "# ") -> list[str]:
    return textwrap.wrap(text, 100, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def render_toml(values: dict[str, Any] | None = None, notes: dict[str, str] | None = None) -> str:
    """TOML text setting every key of KEYS, in order, to values[name] or else its default, each under
    its description (and notes[name]) as a comment."""
    values, notes = values or {}, notes or {}
    lines: list[str] = []
    current = ""
    for key in KEYS:
        doc = _comment(f"{key.doc} {notes.get(key.name, '')}".rstrip())
        if key.name in SUB_TABLES:  # a table of tables: described, none by default
            lines += ["", *doc, *(line for k in SUB_TABLES[key.name] for line in _comment(f"{k.name}: {k.doc}",
                                                                                           "#   ")),
                      f"[{key.name}]"]
            current = key.name
            continue
        if key.section != current:
            lines += ["", f"[{key.section}]"]
            current = key.section
        lines += [*doc, f"{key.leaf} = {_toml(values.get(key.name, key.default))}"]
    return "\n".join(lines).lstrip("\n") + "\n"


DEFAULT_TOML = render_toml()
"""The embedded default as TOML text: every key at its default, described."""

SAMPLE_VALUES = {
    "state_dir": "/var/lib/embtier",
    "server.listen": ["unix:///run/embtier/embtierd.sock", "127.0.0.1:50051"],
    "tiers.scm.path": "/srv/embtier-scm/scm.dat",
}
"""Where the sample for embtierd.service differs from the defaults: the unit's directories."""

SAMPLE_NOTES = {
    "state_dir": "Here: the unit's StateDirectory=.",
    "server.listen": "Here: the socket in the unit's RuntimeDirectory= (members of group embtier may "
                     "connect) and loopback TCP. Addresses beyond loopback also need the unit's "
                     "IPAddressAllow= widened.",
    "server.metrics_listen": "deploy/prometheus/prometheus.yml scrapes it.",
    "server.grace_seconds": "Keep it below the unit's TimeoutStopSec=.",
    "server.listen_interface": "Needs AF_NETLINK in the unit's RestrictAddressFamilies=.",
    "server.tls.cert": "Files must be readable by user embtier, e.g. in /etc/embtier.",
    "server.tls.key": "Mode 0640, group embtier.",
    "tiers.scm.path": "Here: on the NVMe device mounted at /srv/embtier-scm (the unit's ReadWritePaths=).",
}
"""What the sample adds to a key's description for embtierd.service."""

SAMPLE_HEADER = (
    ("/etc/embtier/embtierd.toml: the configuration of embtierd run by embtierd.service, generated from "
     "the schema in daemon/embtierd/config.py by `python -m embtierd.config --write-sample PATH` (change the "
     "schema, not this file)."),
    (f"Every key is here with its default, except {', '.join(SAMPLE_VALUES)}, which follow the unit's "
     "directories. A key left out takes its default (`embtierd --config FILE --print-config` shows the "
     "effective configuration)."),
    ('Sizes are bytes (4294967296), human sizes ("512M", "4G") or a share of the memory available at '
     'start ("25%", or a float in (0, 1]).'),
)


def sample_toml() -> str:
    """deploy/systemd/embtierd.toml: every key with its description, at SAMPLE_VALUES or its default."""
    header = "\n#\n".join("\n".join(_comment(paragraph)) for paragraph in SAMPLE_HEADER)
    return f"{header}\n\n{render_toml(SAMPLE_VALUES, SAMPLE_NOTES)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embtierd.config",
                                     description="Write the sample configuration generated from the schema.")
    parser.add_argument("--write-sample", metavar="PATH", required=True,
                        help="where to write it (the repository's copy: deploy/systemd/embtierd.toml)")
    Path(parser.parse_args(argv).write_sample).write_text(sample_toml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
