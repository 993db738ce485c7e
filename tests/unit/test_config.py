"""Configuration: the embedded default, sizes, merging, and errors that name the key."""

from __future__ import annotations

import pytest
from embtierd import config
from embtierd.errors import ConfigError

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
    assert cfg.cxl.node is None and cfg.kernels.kernel_threads == 1 and cfg.kernels.heat_sample_shift == 3


def test_file_then_overrides(tmp_path):
    path = tmp_path / "embtierd.toml"
    path.write_text('state_dir = "/var/lib/x"\n[tiers.cxl]\nnode = 2\ncapacity = "1G"\n[kernels]\nkernel_threads = 2\n')
    cfg = config.load(path, overrides={"kernels": {"kernel_threads": 4}}, available_bytes=GiB)
    assert str(cfg.state_dir) == "/var/lib/x" and cfg.cxl.node == 2 and cfg.cxl.capacity_bytes == GiB
    assert cfg.kernels.kernel_threads == 4 and cfg.dram.huge_pages is True


@pytest.mark.parametrize("doc, message", [
    ({"tiers": {"dram": {"capacty": "1G"}}}, r"tiers.dram: unknown key\(s\) capacty"),
    ({"bogus": 1}, r"unknown top-level key\(s\): bogus"),
    ({"kernels": {"kernel_threads": 0}}, r"kernels.kernel_threads: expected an integer in \[1, 256\], got 0"),
    ({"kernels": {"prefetch_distance": "far"}}, "kernels.prefetch_distance"),
    ({"tiers": {"cxl": {"node": -1}}}, 'tiers.cxl.node: expected "auto" or a NUMA node id'),
    ({"tiers": {"dram": {"huge_pages": "yes"}}}, "tiers.dram.huge_pages: expected true or false"),
    ({"tiers": {"scm": {"read_align_bytes": 100}}}, "tiers.scm.read_align_bytes"),
])
def test_bad_values_name_the_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=doc, available_bytes=GiB)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load(bad)
