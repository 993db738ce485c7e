"""Configuration: one TOML document with an embedded default.

The daemon starts with no file at all (DEFAULT_TOML); a file and explicit
overrides are merged over it key by key, then validated into frozen
dataclasses.  Sizes accept bytes (4294967296), human sizes ("512M", "4G",
"1.5T") or a share of the memory available at start ("25%", or a float in
(0, 1]) measured with psutil.  Every key is documented in README.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from embtier.sizes import parse_bytes
from embtier.wire import CHECKPOINT_KINDS, MEMORY_TIERS, OFFLOADS, POLICIES, QUANT_BITS, QUANTIZERS, TIERS

from embtierd.durability.wal import FSYNC_POLICIES
from embtierd.errors import ConfigError
from embtierd.tiering.config import TableSettings, TieringConfig

DEFAULT_TOML = """
state_dir = ".state"

[server]
listen = []
metrics_listen = "127.0.0.1:9464"
max_message_bytes = "256M"
max_ids_per_request = 4194304
grace_seconds = 10.0
worker_threads = 8
listen_interface = ""
listen_port = 50051
idle_timeout_seconds = 300.0
keepalive_seconds = 60.0
handshake_timeout_seconds = 10.0

[server.tls]
cert = ""
key = ""
client_ca = ""

[tiers.dram]
capacity = "25%"
huge_pages = true

[tiers.cxl]
capacity = "10%"
node = "auto"
huge_pages = true
emulated_latency_ns = 0

[tiers.scm]
capacity = "16G"
path = ""
read_align_bytes = 0

[tiering]
enabled = true
interval_seconds = 1.0
bandwidth = "256M"
hysteresis = 0.25
aging_intervals = 4
policy = "lfu"

[tiering.tables]

[durability]
wal = true
fsync = "always"
fsync_interval_seconds = 0.05

[durability.checkpoints]
interval_seconds = 600
kind = "auto"
quant_bits = 0
quantizer = "adaptive"
keep = 2
auto_full_ratio = 1.0

[fabric]
offload = "switch"
cxl_ports = 4
rebalance_tolerance = 0.1
device_link_bytes_per_second = 31.5e9
host_link_bytes_per_second = 63.0e9
hop_latency_ns = 40

[kernels]
kernel_threads = 1
prefetch_distance = 16
heat_sample_shift = 3
scm_queue_depth = 64
"""

_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")


def parse_size(value: Any, field: str, available_bytes: int | None = None) -> int:
    """Bytes for a size value (embtier.sizes); percentages and fractions are of available memory."""
    fraction = None
    if isinstance(value, float):
        fraction = value
    elif isinstance(value, str) and (m := _PERCENT_RE.match(value)):
        fraction = float(m.group(1)) / 100
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


@dataclass(frozen=True)
class MemoryTierConfig:
    """A DRAM or CXL tier: anonymous memory bound to NUMA nodes.

    nodes (TOML tiers.cxl.node: "auto", an id or a list of ids) is None for auto-detection: every
    CPU-less node with memory, or a tier emulated in DRAM when there is none."""

    capacity_bytes: int
    huge_pages: bool
    nodes: tuple[int, ...] | None = None  # CXL only: CPU-less nodes (one fabric port each); None = auto
    emulated_latency_ns: int = 0  # CXL only: latency injected per row when the tier is emulated in DRAM


@dataclass(frozen=True)
class ScmTierConfig:
    """The SCM tier: one O_DIRECT file."""

    capacity_bytes: int
    path: Path
    read_align_bytes: int  # 0 = probe (512 where the device allows it, else 4096)


@dataclass(frozen=True)
class KernelConfig:
    """Knobs of the native lookup kernels."""

    kernel_threads: int
    prefetch_distance: int
    heat_sample_shift: int
    scm_queue_depth: int


@dataclass(frozen=True)
class FabricConfig:
    """The emulated CXL fabric of LookupPooled (daemon/fabric.py).

    offload: where pooling happens when a request does not say ("host", "device", "switch").
    cxl_ports: devices an emulated CXL tier is split into (a real tier has one port per CPU-less
    node it uses).  rebalance_tolerance: how far above the mean the busiest port's heat may be
    before the tiering engine moves rows between ports (0.1 = 10 %).  The links are modelled,
    never measured: device_link_bytes_per_second is one port's link to the switch (CXL 2.0 over
    PCIe 5.0 x8: 32 GT/s x 8 lanes x 128/130 = 31.5 GB/s), host_link_bytes_per_second the switch's link to the host (x16: 63 GB/s), hop_latency_ns the
    latency of each hop (a CXL memory access through a pool costs 70-90 ns more than local DRAM,
    Pond, ASPLOS'23; two hops of 40 ns)."""

    offload: str = "switch"
    cxl_ports: int = 4
    rebalance_tolerance: float = 0.1
    device_link_bytes_per_second: float = 31.5e9
    host_link_bytes_per_second: float = 63.0e9
    hop_latency_ns: float = 40.0


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the TCP listeners (Unix sockets stay plaintext): PEM paths, None = not set.

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
    """The gRPC front: listeners (empty = the default socket and 127.0.0.1:50051), TLS, limits
    and how long idle or silent connections are kept.

    listen_interface names a network interface whose addresses are listened
    on at listen_port as well, resolved when the daemon starts.
    """

    listen: tuple[str, ...]
    metrics_listen: str
    max_message_bytes: int
    max_ids_per_request: int
    grace_seconds: float
    worker_threads: int
    listen_interface: str = ""
    listen_port: int = 50051
    tls: TlsConfig = TlsConfig()
    idle_timeout_seconds: float = 300.0      # a connection without a call for this long is closed (0: never)
    keepalive_seconds: float = 60.0          # ping a quiet client this often; one that does not answer is dropped
    handshake_timeout_seconds: float = 10.0  # a connection that has not finished its TLS / HTTP/2 setup is dropped


@dataclass(frozen=True)
class CheckpointConfig:
    """Periodic checkpoints in <state_dir>/checkpoints (daemon/checkpoint.py).

    interval_seconds: time between scheduled checkpoints (0 = only on request).
    kind: "full", "incremental" (changes since the last checkpoint), "differential" (since the last
    full) or "auto" (differential until the differentials written since the last full would pass
    auto_full_ratio times a full checkpoint's bytes, then a full).  quant_bits: 0 = exact, or 8, 4, 3,
    2 bits per value (row-wise asymmetric, quantizer "adaptive" or "minmax").  keep: the newest
    checkpoints kept (with every checkpoint their chains need), and as many exact ones: the
    write-ahead log is kept back to the oldest exact one kept."""

    interval_seconds: float = 600.0
    kind: str = "auto"
    quant_bits: int = 0
    quantizer: str = "adaptive"
    keep: int = 2
    auto_full_ratio: float = 1.0


@dataclass(frozen=True)
class DurabilityConfig:
    """The write-ahead log of table creations, drops and row writes, in <state_dir>/wal.

    fsync "always": a write is acknowledged once fsynced (concurrent writers share fsyncs);
    "interval": fsync every fsync_interval_seconds (a crash loses at most that window);
    "off": the OS flushes when it likes (a crash can lose any unflushed writes)."""

    wal: bool = True
    fsync: str = "always"
    fsync_interval_seconds: float = 0.05
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)



@dataclass(frozen=True)
class Config:
    state_dir: Path
    server: ServerConfig
    tiering: TieringConfig
    dram: MemoryTierConfig
    cxl: MemoryTierConfig
    scm: ScmTierConfig
    kernels: KernelConfig
    durability: DurabilityConfig = DurabilityConfig()
    fabric: FabricConfig = FabricConfig()


def merge(base: dict, override: dict) -> dict:
    """Recursive merge of two TOML tables; override wins key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _section(doc: dict, path: str, allowed: set[str]) -> dict:
    """The table at dotted path in doc, checked for unknown keys."""
    section = doc
    for key in path.split("."):
        section = section.get(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: expected a table, got {section!r}")
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}")
    return section


def _int(section: dict, key: str, field: str, lo: int, hi: int) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{field}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _bool(section: dict, key: str, field: str) -> bool:
    value = section[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    return value


def _nodes(value: Any, field: str) -> tuple[int, ...] | None:
    """None for "auto", else the node ids of one id or a non-empty list of distinct ids, in order."""
    if isinstance(value, str) and value == "auto":
        return None
    ids = list(value) if isinstance(value, list | tuple) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"{field}: expected \"auto\", a NUMA node id or a non-empty list of node ids "
                          f"(ids >= 0), got {value!r}")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{field}: node id(s) {', '.join(map(str, duplicates))} listed more than once "
                          f"in {value!r}")
    return tuple(ids)


def _pem_path(section: dict, key: str, field: str) -> Path | None:
    """A PEM file path, or None for ""; the file must exist and be readable now."""
    value = section[key]
    if not isinstance(value, str):
        raise ConfigError(f"{field}: expected a path to a PEM file, got {value!r}")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"{field}: {path} {reason}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{field}: {path} is not readable by this user")
    return path


def _tls(section: dict) -> TlsConfig:
    cert = _pem_path(section, "cert", "server.tls.cert")
    key = _pem_path(section, "key", "server.tls.key")
    client_ca = _pem_path(section, "client_ca", "server.tls.client_ca")
    if (cert is None) != (key is None):
        given, missing = ("cert", "key") if key is None else ("key", "cert")
        raise ConfigError(f"server.tls.{given} is set but server.tls.{missing} is not: "
                          f"TLS needs both the certificate chain and its private key")
    if client_ca is not None and cert is None:
        raise ConfigError("server.tls.client_ca needs server.tls.cert and server.tls.key: "
                          "mutual TLS is TLS with client certificates")
    return TlsConfig(cert=cert, key=key, client_ca=client_ca)


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


def _server(section: dict, tls: dict) -> ServerConfig:
    listen = section["listen"]
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not all(isinstance(a, str) and a for a in listen):
        raise ConfigError(f"server.listen: expected a list of addresses (\"unix:///path\", \"host:port\"), "
                          f"got {listen!r}")
    grace = section["grace_seconds"]
    if isinstance(grace, bool) or not isinstance(grace, int | float) or grace < 0:
        raise ConfigError(f"server.grace_seconds: expected a number >= 0, got {grace!r}")
    interface = section["listen_interface"]
    if (not isinstance(interface, str) or len(interface) > 15  # IFNAMSIZ - 1
            or any(c.isspace() or c == "/" for c in interface)):
        raise ConfigError(f"server.listen_interface: expected a network interface name (\"eth0\") "
                          f"or \"\", got {interface!r}")
    return ServerConfig(
        listen=tuple(listen),
        metrics_listen=str(section["metrics_listen"]),
        max_message_bytes=parse_size(section["max_message_bytes"], "server.max_message_bytes"),
        max_ids_per_request=_int(section, "max_ids_per_request", "server.max_ids_per_request", 1, 1 << 31),
        grace_seconds=float(grace),
        worker_threads=_int(section, "worker_threads", "server.worker_threads", 1, 1024),
        listen_interface=interface,
        listen_port=_int(section, "listen_port", "server.listen_port", 1, 65535),
        tls=_tls(tls),
        idle_timeout_seconds=_number(section, "idle_timeout_seconds", "server.idle_timeout_seconds", 0, 86400),
        keepalive_seconds=_number(section, "keepalive_seconds", "server.keepalive_seconds", 1, 86400),
        handshake_timeout_seconds=_number(section, "handshake_timeout_seconds", "server.handshake_timeout_seconds",
                                          0.1, 3600),
    )


def _number(section: dict, key: str, field: str, lo: float, hi: float) -> float:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ConfigError(f"{field}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _policy_name(value: Any, field: str) -> str:
    if value not in POLICIES:
        raise ConfigError(f"{field}: expected one of {', '.join(POLICIES)}, got {value!r}")
    return value


def _table_capacity(value: Any, field: str, tier_bytes: int) -> int:
    """A table's own limit in a tier: a size, or a share ("50%", 0.5) of the tier's capacity."""
    if isinstance(value, float) or (isinstance(value, str) and _PERCENT_RE.match(value)):
        share = value if isinstance(value, float) else float(_PERCENT_RE.match(value).group(1)) / 100
        if not 0 <= share <= 1:
            raise ConfigError(f"{field}: a share of the tier's capacity must be in [0, 1] (0% to 100%), "
                              f"got {value!r}")
        return int(tier_bytes * share)
    return parse_size(value, field)


def _table_policy(name: str, section: Any, default_policy: str, tier_bytes: dict[str, int]) -> TableSettings:
    path = f"tiering.tables.{name}"
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: expected a table of policy, pin, dram, cxl; got {section!r}")
    unknown = set(section) - {"policy", "pin", "dram", "cxl"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: cxl, dram, pin, policy")
    pin = section.get("pin", "")
    if pin not in ("", *TIERS):
        raise ConfigError(f"{path}.pin: expected \"\" or one of {', '.join(TIERS)}, got {pin!r}")
    capacity = {tier: _table_capacity(section[tier], f"{path}.{tier}", tier_bytes[tier]) if tier in section
                else None for tier in MEMORY_TIERS}
    return TableSettings(policy=_policy_name(section.get("policy", default_policy), f"{path}.policy"), pin=pin,
                       capacity_bytes=capacity)


def _tiering(section: dict, tier_bytes: dict[str, int]) -> TieringConfig:
    policy = _policy_name(section["policy"], "tiering.policy")
    tables = section["tables"]
    if not isinstance(tables, dict):
        raise ConfigError(f"tiering.tables: expected a table of per-table settings, got {tables!r}")
    return TieringConfig(
        enabled=_bool(section, "enabled", "tiering.enabled"),
        interval_seconds=_number(section, "interval_seconds", "tiering.interval_seconds", 0.01, 3600),
        bandwidth_bytes_per_second=parse_size(section["bandwidth"], "tiering.bandwidth"),
        hysteresis=_number(section, "hysteresis", "tiering.hysteresis", 0, 100),
        aging_intervals=_int(section, "aging_intervals", "tiering.aging_intervals", 1, 1000),
        policy=policy,
        tables={name: _table_policy(name, value, policy, tier_bytes) for name, value in tables.items()},
    )


def _durability(section: dict, checkpoints: dict) -> DurabilityConfig:
    fsync = section["fsync"]
    if fsync not in FSYNC_POLICIES:
        raise ConfigError(f"durability.fsync: expected one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
    return DurabilityConfig(
        wal=_bool(section, "wal", "durability.wal"),
        fsync=fsync,
        fsync_interval_seconds=_number(section, "fsync_interval_seconds", "durability.fsync_interval_seconds",
                                       0.001, 60),
        checkpoints=_checkpoints(checkpoints),
    )


def _fabric(section: dict) -> FabricConfig:
    offload = section["offload"]
    if offload not in OFFLOADS:
        raise ConfigError(f"fabric.offload: expected one of {', '.join(OFFLOADS)}, got {offload!r}")
    return FabricConfig(
        offload=offload,
        cxl_ports=_int(section, "cxl_ports", "fabric.cxl_ports", 1, 64),
        rebalance_tolerance=_number(section, "rebalance_tolerance", "fabric.rebalance_tolerance", 0, 100),
        device_link_bytes_per_second=_number(section, "device_link_bytes_per_second",
                                             "fabric.device_link_bytes_per_second", 1e6, 1e13),
        host_link_bytes_per_second=_number(section, "host_link_bytes_per_second",
                                           "fabric.host_link_bytes_per_second", 1e6, 1e13),
        hop_latency_ns=_number(section, "hop_latency_ns", "fabric.hop_latency_ns", 0, 1e7),
    )


def _checkpoints(section: dict) -> CheckpointConfig:
    kind = section["kind"]
    if kind not in CHECKPOINT_KINDS:
        raise ConfigError(f"durability.checkpoints.kind: expected one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
    bits = section["quant_bits"]
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ConfigError(f"durability.checkpoints.quant_bits: expected one of "
                          f"{', '.join(map(str, QUANT_BITS))}, got {bits!r}")
    quantizer = section["quantizer"]
    if quantizer not in QUANTIZERS:
        raise ConfigError(f"durability.checkpoints.quantizer: expected one of {', '.join(QUANTIZERS)}, "
                          f"got {quantizer!r}")
    return CheckpointConfig(
        interval_seconds=_number(section, "interval_seconds", "durability.checkpoints.interval_seconds", 0, 86400 * 7),
        kind=kind, quant_bits=bits, quantizer=quantizer,
        keep=_int(section, "keep", "durability.checkpoints.keep", 1, 1000),
        auto_full_ratio=_number(section, "auto_full_ratio", "durability.checkpoints.auto_full_ratio", 0.01, 100),
    )


def build(doc: dict, available_bytes: int | None = None) -> Config:
    """Validates a merged TOML document into a Config."""
    unknown = set(doc) - {"state_dir", "server", "tiers", "tiering", "kernels", "durability", "fabric"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    _section(doc, "tiers", set(TIERS))
    dram = _section(doc, "tiers.dram", {"capacity", "huge_pages"})
    cxl = _section(doc, "tiers.cxl", {"capacity", "huge_pages", "node", "emulated_latency_ns"})
    scm = _section(doc, "tiers.scm", {"capacity", "path", "read_align_bytes"})
    tiering = _section(doc, "tiering", {"enabled", "interval_seconds", "bandwidth", "hysteresis", "aging_intervals",
                                        "policy", "tables"})
    durability = _section(doc, "durability", {"wal", "fsync", "fsync_interval_seconds", "checkpoints"})
    checkpoints = _section(doc, "durability.checkpoints", {"interval_seconds", "kind", "quant_bits", "quantizer",
                                                           "keep", "auto_full_ratio"})
    fabric = _section(doc, "fabric", {"offload", "cxl_ports", "rebalance_tolerance",
                                      "device_link_bytes_per_second", "host_link_bytes_per_second",
                                      "hop_latency_ns"})
    kern = _section(doc, "kernels", {"kernel_threads", "prefetch_distance", "heat_sample_shift", "scm_queue_depth"})
    server = _section(doc, "server", {"listen", "metrics_listen", "max_message_bytes", "max_ids_per_request",
                                      "grace_seconds", "worker_threads", "listen_interface", "listen_port",
                                      "tls", "idle_timeout_seconds", "keepalive_seconds",
                                      "handshake_timeout_seconds"})
    tls = _section(doc, "server.tls", {"cert", "key", "client_ca"})
    state_dir = Path(str(doc["state_dir"])).expanduser()
    align = _int(scm, "read_align_bytes", "tiers.scm.read_align_bytes", 0, 4096)
    if align not in (0, 512, 1024, 2048, 4096):
        raise ConfigError(f"tiers.scm.read_align_bytes: expected 0 (probe), 512, 1024, 2048 or 4096, got {align}")
    dram_config = MemoryTierConfig(
        capacity_bytes=parse_size(dram["capacity"], "tiers.dram.capacity", available_bytes),
        huge_pages=_bool(dram, "huge_pages", "tiers.dram.huge_pages"),
    )
    cxl_config = MemoryTierConfig(
        capacity_bytes=parse_size(cxl["capacity"], "tiers.cxl.capacity", available_bytes),
        huge_pages=_bool(cxl, "huge_pages", "tiers.cxl.huge_pages"),
        nodes=_nodes(cxl["node"], "tiers.cxl.node"),
        emulated_latency_ns=_int(cxl, "emulated_latency_ns", "tiers.cxl.emulated_latency_ns",
                                 0, 1_000_000),
    )
    return Config(
        state_dir=state_dir,
        server=_server(server, tls),
        dram=dram_config,
        cxl=cxl_config,
        scm=ScmTierConfig(
            capacity_bytes=parse_size(scm["capacity"], "tiers.scm.capacity", available_bytes),
            path=Path(str(scm["path"])) if scm["path"] else state_dir / "scm.dat",
            read_align_bytes=align,
        ),
        tiering=_tiering(tiering, {"dram": dram_config.capacity_bytes, "cxl": cxl_config.capacity_bytes}),
        durability=_durability(durability, checkpoints),
        fabric=_fabric(fabric),
        kernels=KernelConfig(
            kernel_threads=_int(kern, "kernel_threads", "kernels.kernel_threads", 1, 256),
            prefetch_distance=_int(kern, "prefetch_distance", "kernels.prefetch_distance", 0, 256),
            heat_sample_shift=_int(kern, "heat_sample_shift", "kernels.heat_sample_shift", 0, 16),
            scm_queue_depth=_int(kern, "scm_queue_depth", "kernels.scm_queue_depth", 1, 256),
        ),
    )


def load(path: str | Path | None = None, overrides: dict | None = None,
         available_bytes: int | None = None) -> Config:
    """The embedded default, merged with the file at path (if any), then overrides."""
    doc = tomllib.loads(DEFAULT_TOML)
    if path is not None:
        try:
            doc = merge(doc, tomllib.loads(Path(path).read_text()))
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from e
    return build(merge(doc, overrides or {}), available_bytes)
