"""Configuration: the embedded default, sizes, merging, and errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest
from embtierd import config
from embtierd.errors import ConfigError
from embtierd.rpc import server
from embtierd.tiering.config import TableSettings

GiB = 1 << 30


@pytest.mark.parametrize("value, expected", [
    (4096, 4096), ("4096", 4096), ("512M", 512 << 20), ("4G", 4 * GiB), ("1.5G", 3 * GiB // 2),
    ("2GiB", 2 * GiB), ("64k", 64 << 10), ("1T", 1 << 40), ("0", 0),
    ("25%", 25 * GiB // 100), (0.5, GiB // 2), ("100%", GiB),
])
def test_parse_size(value, expected):
    assert config.parse_size(value, "f", available_bytes=GiB) == expected


@pytest.mark.parametrize("value, message", [
    ("4X", "f: cannot read '4X' as a size"), ("-1", "cannot read"), (True, "expected a size"),
    (1.5, r"must be in \(0, 1\]"), ("0%", r"must be in \(0, 1\]"), (-5, "cannot be negative"),
])
def test_parse_size_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        config.parse_size(value, "f", available_bytes=GiB)


def test_embedded_default_loads():
    cfg = config.load(available_bytes=8 * GiB)
    assert cfg.dram.capacity_bytes == 2 * GiB and cfg.cxl.capacity_bytes == 8 * GiB // 10
    assert cfg.scm.capacity_bytes == 16 * GiB and cfg.scm.path == cfg.state_dir / "scm.dat"
    assert cfg.cxl.nodes is None and cfg.kernels.kernel_threads == 1 and cfg.kernels.heat_sample_shift == 3


def test_file_then_overrides(tmp_path):
    path = tmp_path / "embtierd.toml"
    path.write_text('state_dir = "/var/lib/x"\n[tiers.cxl]\nnode = 2\ncapacity = "1G"\n[kernels]\nkernel_threads = 2\n')
    cfg = config.load(path, overrides={"kernels": {"kernel_threads": 4}}, available_bytes=GiB)
    assert str(cfg.state_dir) == "/var/lib/x" and cfg.cxl.nodes == (2,) and cfg.cxl.capacity_bytes == GiB
    assert cfg.kernels.kernel_threads == 4 and cfg.dram.huge_pages is True


@pytest.mark.parametrize("doc, message", [
    ({"tiers": {"dram": {"capacty": "1G"}}}, r"tiers.dram: unknown key\(s\) capacty"),
    ({"bogus": 1}, (r"unknown top-level key\(s\): bogus; known: auth, cluster, durability, fabric, kernels, scheduler, server, "
                    r"state_dir, tenants, ")),
    ({"kernels": {"kernel_threads": 0}}, r"kernels.kernel_threads: expected an integer in \[1, 256\], got 0"),
    ({"kernels": {"prefetch_distance": "far"}}, "kernels.prefetch_distance"),
    ({"tiers": {"cxl": {"node": -1}}}, 'tiers.cxl.node: expected "auto", a NUMA node id or a non-empty list'),
    ({"tiers": {"dram": {"huge_pages": "yes"}}}, "tiers.dram.huge_pages: expected true or false"),
    ({"tiers": {"scm": {"read_align_bytes": 100}}}, "read_align_bytes: expected one of 0, 512, 1024, 2048, 4096, got 100$"),
    ({"tiers": {"scm": {"read_align_bytes": 512.0}}}, "tiers.scm.read_align_bytes: .* got 512.0$"),
    ({"tiering": {"interval_seconds": 0}}, r"^tiering.interval_seconds: expected a number in \[0.01, 3600\], got 0$"),
    ({"fabric": {"hop_latency_ns": float("nan")}}, r"^fabric.hop_latency_ns: expected a number in \[0, 1e7\], got nan$"),
    ({"server": {"grace_seconds": -1}}, r"^server.grace_seconds: expected a number >= 0, got -1$"),
    ({"durability": {"checkpoints": {"quant_bits": False}}}, "quant_bits: expected one of 0, 2, 3, 4, 8, got False$"),
    ({"state_dir": 5}, "^state_dir: expected a directory path, got 5$"),
    ({"server": {"metrics_listen": 9464}}, '^server.metrics_listen: expected "host:port" or "", got 9464$'),
    ({"tiers": {"scm": {"path": 5}}}, '^tiers.scm.path: expected a file path or "", got 5$'),
])
def test_bad_values_name_the_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=doc, available_bytes=GiB)


@pytest.mark.parametrize("value, expected", [("auto", None), (0, (0,)), (3, (3,)), ([2, 3], (2, 3)),
                                             ([3, 2], (3, 2)), ([5], (5,))])
def test_cxl_nodes(value, expected):
    cfg = config.load(overrides={"tiers": {"cxl": {"node": value}}}, available_bytes=GiB)
    assert cfg.cxl.nodes == expected and cfg.dram.nodes is None


def test_cxl_node_list_from_file(tmp_path):
    path = tmp_path / "embtierd.toml"
    path.write_text("[tiers.cxl]\nnode = [4, 2, 3]\n")
    assert config.load(path, available_bytes=GiB).cxl.nodes == (4, 2, 3)


@pytest.mark.parametrize("value, shown", [
    ([], r"\[\]"), (True, "True"), ([2, True], r"\[2, True\]"), ([2, -1], r"\[2, -1\]"), ("2", "'2'"),
    ([2.0], r"\[2.0\]"), ("AUTO", "'AUTO'"), ([2, "auto"], r"\[2, 'auto'\]"),
])
def test_cxl_node_bad_values(value, shown):
    with pytest.raises(ConfigError, match=rf'^tiers.cxl.node: expected "auto", a NUMA node id or a non-empty '
                                          rf"list of node ids \(ids >= 0\), got {shown}$"):
        config.load(overrides={"tiers": {"cxl": {"node": value}}}, available_bytes=GiB)


def test_cxl_node_duplicates_refused():
    with pytest.raises(ConfigError, match=r"^tiers.cxl.node: node id\(s\) 2, 3 listed more than once in "
                                          r"\[2, 3, 4, 3, 2\]$"):
        config.load(overrides={"tiers": {"cxl": {"node": [2, 3, 4, 3, 2]}}}, available_bytes=GiB)


def test_cxl_emulated_latency():
    assert config.load(available_bytes=GiB).cxl.emulated_latency_ns == 0
    cfg = config.load(overrides={"tiers": {"cxl": {"emulated_latency_ns": 250}}}, available_bytes=GiB)
    assert cfg.cxl.emulated_latency_ns == 250 and cfg.dram.emulated_latency_ns == 0


@pytest.mark.parametrize("value, shown", [(-1, "-1"), (2.5, "2.5"), ("200", "'200'"), (True, "True"),
                                          (1_000_001, "1000001")])
def test_cxl_emulated_latency_errors(value, shown):
    with pytest.raises(ConfigError, match=rf"tiers.cxl.emulated_latency_ns: expected an integer in "
                                          rf"\[0, 1000000\], got {shown}$"):
        config.load(overrides={"tiers": {"cxl": {"emulated_latency_ns": value}}}, available_bytes=GiB)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load(bad)
    bad.write_bytes(b"state_dir = '\xff'\n")
    with pytest.raises(ConfigError, match=f"^configuration file {bad} is not valid TOML: 'utf-8' codec can't"):
        config.load(bad)


# ---- [server.tls] ----------------------------------------------------------


@pytest.fixture
def pem_files(tmp_path):
    """Placeholder cert, key and CA files: load checks presence and readability, not contents."""
    paths = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    for path in paths.values():
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
    return paths


def test_tls_off_by_default():
    tls = config.load(available_bytes=GiB).server.tls
    assert tls == config.TlsConfig() and not tls.enabled and not tls.mutual


def test_tls_and_mutual_tls(pem_files):
    pair = {"cert": str(pem_files["cert"]), "key": str(pem_files["key"])}
    tls = config.load(overrides={"server": {"tls": pair}}, available_bytes=GiB).server.tls
    assert tls.enabled and not tls.mutual and tls.cert == pem_files["cert"] and tls.client_ca is None
    tls = config.load(overrides={"server": {"tls": {**pair, "client_ca": str(pem_files["ca"])}}},
                      available_bytes=GiB).server.tls
    assert tls.enabled and tls.mutual and tls.client_ca == pem_files["ca"]


def test_tls_from_file(tmp_path, pem_files):
    path = tmp_path / "embtierd.toml"
    path.write_text(f'[server]\nlisten = ["0.0.0.0:50051"]\n[server.tls]\ncert = "{pem_files["cert"]}"\n'
                    f'key = "{pem_files["key"]}"\nclient_ca = "{pem_files["ca"]}"\n')
    cfg = config.load(path, available_bytes=GiB)
    assert cfg.server.listen == ("0.0.0.0:50051",) and cfg.server.tls.mutual


@pytest.mark.parametrize("given, message", [
    ({"cert": "cert"}, "server.tls.cert is set but server.tls.key is not"),
    ({"key": "key"}, "server.tls.key is set but server.tls.cert is not"),
    ({"client_ca": "ca"}, "server.tls.client_ca needs server.tls.cert and server.tls.key"),
    ({"cert": "cert", "client_ca": "ca"}, "server.tls.cert is set but server.tls.key is not"),
])
def test_tls_incomplete(pem_files, given, message):
    tls = {key: str(pem_files[name]) for key, name in given.items()}
    with pytest.raises(ConfigError, match=message):
        config.load(overrides={"server": {"tls": tls}}, available_bytes=GiB)


@pytest.mark.parametrize("key", ["cert", "key", "client_ca"])
def test_tls_missing_file_names_key_and_path(pem_files, tmp_path, key):
    tls = {"cert": str(pem_files["cert"]), "key": str(pem_files["key"]), "client_ca": str(pem_files["ca"])}
    tls[key] = str(tmp_path / "nowhere.pem")
    with pytest.raises(ConfigError, match=f"server.tls.{key}: {tmp_path}/nowhere.pem does not exist"):
        config.load(overrides={"server": {"tls": tls}}, available_bytes=GiB)


def test_tls_directory_and_unreadable_file(pem_files, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=f"server.tls.cert: {tmp_path} is not a file"):
        config.load(overrides={"server": {"tls": {"cert": str(tmp_path), "key": str(pem_files["key"])}}},
                    available_bytes=GiB)
    # a mode-0 file is readable by root, so unreadability is simulated
    monkeypatch.setattr(config.os, "access", lambda path, mode: Path(path) != pem_files["key"])
    pair = {"cert": str(pem_files["cert"]), "key": str(pem_files["key"])}
    with pytest.raises(ConfigError, match=f"server.tls.key: {pem_files['key']} is not readable"):
        config.load(overrides={"server": {"tls": pair}}, available_bytes=GiB)


@pytest.mark.parametrize("doc, message", [
    ({"server": {"tls": {"cert": 5}}}, "server.tls.cert: expected a path to a PEM file, got 5"),
    ({"server": {"tls": {"certificate": "x"}}}, r"server.tls: unknown key\(s\) certificate"),
    ({"server": {"tls": "on"}}, "server.tls: expected a table"),
    ({"server": {"listen_port": 0}}, r"server.listen_port: expected an integer in \[1, 65535\], got 0"),
    ({"server": {"listen_port": "50051"}}, "server.listen_port: expected an integer"),
    ({"server": {"listen_interface": 1}}, "server.listen_interface: expected a network interface name"),
    ({"server": {"listen_interface": "eth 0"}}, "server.listen_interface: expected a network interface name"),
])
def test_bad_server_values_name_the_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=doc, available_bytes=GiB)


# ---- server.listen_interface -----------------------------------------------


def _lo_has_ipv6() -> bool:
    try:
        return any(line.split()[-1] == "lo" for line in Path("/proc/net/if_inet6").read_text().splitlines())
    except OSError:
        return False


def test_listen_interface_defaults():
    server = config.load(available_bytes=GiB).server
    assert server.listen_interface == "" and server.listen_port == 50051


def test_interface_addresses_of_loopback():
    addresses = config.interface_addresses("lo")
    assert addresses[0] == "127.0.0.1"  # IPv4 first
    assert ("::1" in addresses) == _lo_has_ipv6()


def test_unknown_interface_names_it_and_the_ones_that_exist():
    with pytest.raises(ConfigError, match=r"no network interface 'nosuch0'; interfaces: .*\blo\b"):
        config.interface_addresses("nosuch0")


@pytest.mark.parametrize("host, expected", [("127.0.0.1", "127.0.0.1:50051"), ("::1", "[::1]:50051"),
                                            ("fd00::2", "[fd00::2]:50051")])
def test_tcp_address(host, expected):
    assert config.tcp_address(host, 50051) == expected


def test_listen_addresses_add_the_interface(tmp_path):
    from embtierd.rpc.server import listen_addresses

    cfg = config.load(overrides={"state_dir": str(tmp_path), "server": {
        "listen": ["unix:///tmp/x.sock", "127.0.0.1:7000"], "listen_interface": "lo", "listen_port": 7000}},
        available_bytes=GiB)
    expected = ["unix:///tmp/x.sock", "127.0.0.1:7000"] + (["[::1]:7000"] if _lo_has_ipv6() else [])
    assert listen_addresses(cfg) == expected  # 127.0.0.1:7000 is listed once


# ---- [tiering] and [tiering.tables.NAME] -------------------------------------


def test_tiering_defaults():
    tiering = config.load(available_bytes=GiB).tiering
    assert tiering.aging_intervals == 4 and tiering.policy == "lfu" and tiering.tables == {}
    assert tiering.table_policy("any") == TableSettings(policy="lfu")


def test_tiering_tables():
    cfg = config.load(overrides={"tiers": {"dram": {"capacity": "512M"}, "cxl": {"capacity": "256M"}}, "tiering": {
        "aging_intervals": 8, "policy": "lru", "tables": {
            "ads": {"pin": "scm"},
            "users": {"policy": "lfu", "dram": "64M", "cxl": "50%"},
            "items": {"dram": 0.25, "cxl": 0},
        }}}, available_bytes=GiB)
    tiering = cfg.tiering
    assert tiering.aging_intervals == 8 and tiering.policy == "lru"
    assert tiering.tables["ads"] == TableSettings(policy="lru", pin="scm")  # the default policy, no limits
    assert tiering.tables["users"] == TableSettings(policy="lfu", capacity_bytes={"dram": 64 << 20, "cxl": 128 << 20})
    assert tiering.tables["items"].capacity_bytes == {"dram": 128 << 20, "cxl": 0}  # shares of the tier, not of memory
    assert tiering.table_policy("users").policy == "lfu" and tiering.table_policy("other") == TableSettings(policy="lru")


@pytest.mark.parametrize("tiering, message", [
    ({"aging_intervals": 0}, r"tiering.aging_intervals: expected an integer in \[1, 1000\], got 0$"),
    ({"aging_intervals": 1001}, r"tiering.aging_intervals: expected an integer in \[1, 1000\], got 1001$"),
    ({"aging_intervals": "4"}, r"tiering.aging_intervals: expected an integer in \[1, 1000\], got '4'$"),
    ({"aging_intervals": True}, r"tiering.aging_intervals: expected an integer in \[1, 1000\], got True$"),
    ({"policy": "fifo"}, "tiering.policy: expected one of lfu, lru, got 'fifo'$"),
    ({"policy": "LFU"}, "tiering.policy: expected one of lfu, lru, got 'LFU'$"),
    ({"tables": 5}, "tiering.tables: expected a table of per-table settings, got 5$"),
    ({"tables": {"emb": "lru"}}, "tiering.tables.emb: expected a table of policy, pin, dram, cxl, got 'lru'$"),
    ({"tables": {"emb": {"scm": "1G"}}}, r"tiering.tables.emb: unknown key\(s\) scm; known: cxl, dram, pin, policy$"),
    ({"tables": {"emb": {"policy": "mru"}}}, "tiering.tables.emb.policy: expected one of lfu, lru, got 'mru'$"),
    ({"tables": {"emb": {"pin": "hbm"}}}, "tiering.tables.emb.pin: expected one of \"\", dram, cxl, scm, got 'hbm'$"),
    ({"tables": {"emb": {"pin": 1}}}, "tiering.tables.emb.pin: expected one of \"\", dram, cxl, scm, got 1$"),
    ({"tables": {"emb": {"pin": "dram", "policy": 1}}}, "tiering.tables.emb.policy: expected one of lfu, lru, got 1$"),
    ({"tables": {"emb": {"dram": "lots"}}}, "tiering.tables.emb.dram: cannot read 'lots' as a size"),
    ({"tables": {"emb": {"cxl": -1}}}, "tiering.tables.emb.cxl: a size cannot be negative, got -1$"),
    ({"tables": {"emb": {"dram": 1.5}}}, (r"tiering.tables.emb.dram: a share of the tier's capacity must be in "
                                         r"\[0, 1\] \(0% to 100%\), got 1.5$")),
    ({"tables": {"emb": {"cxl": "120%"}}}, r"tiering.tables.emb.cxl: .*must be in \[0, 1\].*, got .120%.$"),
    ({"tables": {"emb": {"dram": True}}}, "tiering.tables.emb.dram: expected a size, got True$"),
])
def test_bad_tiering_values_name_the_field_and_value(tiering, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides={"tiering": tiering}, available_bytes=GiB)


def test_the_default_socket_goes_in_systemds_runtime_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/embtier:/run/other")
    assert server.default_socket(tmp_path) == Path("/run/embtier/embtierd.sock")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setattr(server.os, "geteuid", lambda: 0)
    assert server.default_socket(tmp_path) == Path("/run/embtier/embtierd.sock")
    monkeypatch.setattr(server.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert server.default_socket(tmp_path) == tmp_path / "xdg" / "embtier" / "embtierd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert server.default_socket(tmp_path) == tmp_path / "embtierd.sock"


# ---- the schema: one home for every key ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "deploy" / "systemd" / "embtierd.toml"

# The effective configuration without a file (as --print-config shows it) on 8 GiB of available memory:
# the defaults the daemon has always had.  A change here changes what every deployment runs with.
DEFAULTS_ON_8_GIB = {
    "state_dir": ".state",
    "server": {"listen": [], "metrics_listen": "127.0.0.1:9464", "max_message_bytes": 256 << 20,
               "max_ids_per_request": 4194304, "grace_seconds": 10.0, "worker_threads": 8, "listen_interface": "",
               "listen_port": 50051, "tls": {"cert": None, "key": None, "client_ca": None},
               "idle_timeout_seconds": 300.0, "keepalive_seconds": 60.0, "handshake_timeout_seconds": 10.0,
               "shared_memory": False, "shared_memory_max_bytes": 1 << 30},
    "tiering": {"enabled": True, "interval_seconds": 1.0, "bandwidth_bytes_per_second": 256 << 20,
                "hysteresis": 0.25, "aging_intervals": 4, "policy": "lfu", "tables": {}, "groups": []},
    "dram": {"capacity_bytes": 2 * GiB, "huge_pages": True, "nodes": None, "emulated_latency_ns": 0},
    "cxl": {"capacity_bytes": 8 * GiB // 10, "huge_pages": True, "nodes": None, "emulated_latency_ns": 0},
    "scm": {"capacity_bytes": 16 * GiB, "path": ".state/scm.dat", "read_align_bytes": 0},
    "kernels": {"kernel_threads": 1, "prefetch_distance": 16, "heat_sample_shift": 3, "scm_queue_depth": 64},
    "durability": {"wal": True, "fsync": "always", "fsync_interval_seconds": 0.05,
                   "checkpoints": {"interval_seconds": 600.0, "kind": "auto", "quant_bits": 0,
                                   "quantizer": "adaptive", "keep": 2, "auto_full_ratio": 1.0}},
    "fabric": {"offload": "switch", "cxl_ports": 4, "rebalance_tolerance": 0.1,
               "device_link_bytes_per_second": 31.5e9, "host_link_bytes_per_second": 63.0e9, "hop_latency_ns": 40.0},
    "scheduler": {"enabled": True, "kernel_workers": 2, "max_queued": 512},
    "cluster": {"name": "", "endpoints": ["127.0.0.1:2379"], "node_id": "", "advertise": "", "lease_seconds": 5},
    "tenants": {"default": {"name": "default", "priority": 1, "deadline_seconds": 1.0, "max_in_flight": 64}},
    "auth": {"enabled": True, "anonymous": "reader", "group": "writer", "grants": {}},
}


def as_printed(cfg: config.Config) -> dict:
    """cfg as --print-config prints it, read back."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def nested(name: str, value) -> dict:
    """{"a": {"b": value}} for "a.b"."""
    for part in reversed(name.split(".")):
        value = {part: value}
    return value


def test_the_defaults_are_the_ones_the_daemon_always_had():
    assert as_printed(config.load(available_bytes=8 * GiB)) == DEFAULTS_ON_8_GIB


def test_default_toml_is_every_key_at_its_default():
    doc = tomllib.loads(config.DEFAULT_TOML)
    for key in config.KEYS:
        value = doc
        for part in key.name.split("."):
            value = value[part]
        assert value == key.default, key.name
    assert config.build(doc, 8 * GiB) == config.load(available_bytes=8 * GiB)


def test_dataclass_defaults_are_the_schemas():
    """Code that builds a section itself (FabricConfig(), CheckpointConfig(keep=5), TieringConfig(...))
    gets what a file without those keys gets: each dataclass of the default Config, made from its required
    fields alone, is equal to it (tiering/config.py holds its own defaults; this keeps them to the schema)."""
    instances = [config.load(available_bytes=GiB)]
    for obj in instances:
        required = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        assert type(obj)(**required) == obj, type(obj).__name__
        instances += [getattr(obj, f.name) for f in dataclasses.fields(obj)
                      if dataclasses.is_dataclass(getattr(obj, f.name))]
    assert len(instances) == 14  # Config, its 11 sections, server.tls and durability.checkpoints
    table = config.load(overrides={"tiering": {"tables": {"t": {}}}}, available_bytes=GiB).tiering.tables["t"]
    assert table == TableSettings()
    tenants = config.load(overrides={"tenants": {"t": {}}}, available_bytes=GiB).tenants
    assert tenants == {"t": config.TenantConfig("t"), "default": config.TenantConfig("default")}


@pytest.mark.parametrize("name", config.key_names())
def test_every_key_refuses_a_wrong_type_naming_key_and_value(name):
    name = name.replace(".NAME.", ".emb.")
    with pytest.raises(ConfigError, match=rf"^{re.escape(name)}: .*\[\{{\}}\]"):
        config.load(overrides=nested(name, [{}]), available_bytes=GiB)


def _sections() -> set[str]:
    return {name.rpartition(".")[0] for name in config.key_names() if ".NAME." not in name}


@pytest.mark.parametrize("section", sorted(_sections()))
def test_every_table_refuses_unknown_keys(section):
    doc = nested(section, {"bogus": 1}) if section else {"bogus": 1}
    with pytest.raises(ConfigError, match=rf"{re.escape(section)}.*unknown .*\bbogus; known: "):
        config.load(overrides=doc, available_bytes=GiB)


def test_a_section_that_is_not_a_table_is_refused():
    with pytest.raises(ConfigError, match=r"^tiers.cxl: expected a table, got 5$"):
        config.load(overrides={"tiers": {"cxl": 5}}, available_bytes=GiB)
    with pytest.raises(ConfigError, match=r"^durability: expected a table, got 'on'$"):
        config.load(overrides={"durability": "on"}, available_bytes=GiB)


def test_the_sample_on_disk_is_what_the_schema_generates():
    assert SAMPLE.read_text() == config.sample_toml(), (
        "deploy/systemd/embtierd.toml is stale: python -m embtierd.config --write-sample deploy/systemd/embtierd.toml")


def test_write_sample_writes_the_generated_sample(tmp_path):
    out = tmp_path / "embtierd.toml"
    subprocess.run([sys.executable, "-m", "embtierd.config", "--write-sample", str(out)], check=True, timeout=60)
    assert out.read_text() == config.sample_toml()


def test_the_sample_is_the_defaults_but_for_the_units_directories():
    known = set(config.key_names())
    assert set(config.SAMPLE_VALUES) <= known and set(config.SAMPLE_NOTES) <= known
    sample = config.load(SAMPLE, available_bytes=GiB)
    assert sample.state_dir == Path("/var/lib/embtier") and sample.scm.path == Path("/srv/embtier-scm/scm.dat")
    assert sample.server.listen == ("unix:///run/embtier/embtierd.sock", "127.0.0.1:50051")
    moved = dataclasses.replace(sample, state_dir=Path(".state"), scm=dataclasses.replace(sample.scm, path=Path(
        ".state/scm.dat")), server=dataclasses.replace(sample.server, listen=()))
    assert moved == config.load(available_bytes=GiB)
    for key in config.KEYS:  # each key under its description
        assert f"{key.doc[:40]}" in " ".join(SAMPLE.read_text().replace("# ", "").split()), key.name


def readme_configuration_table() -> dict[str, str]:
    """Key -> default cell of README.md's "## Configuration" table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].removeprefix("| ").strip("`"): cells[1].strip("`") for cells in rows}


def test_readme_documents_every_key_and_no_other():
    table = readme_configuration_table()
    assert list(table) == config.key_names()  # every key, none that does not exist, in the schema's order
    for key in config.KEYS:
        if key.default is not None and key.name not in config.SUB_TABLES:
            assert tomllib.loads(f"v = {table[key.name]}")["v"] == key.default, key.name
