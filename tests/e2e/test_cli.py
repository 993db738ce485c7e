"""The embtier command line against a real daemon."""

from __future__ import annotations

import subprocess

import numpy as np
from embtier import Client

from tests.support import run_cli


def run(daemon, *args: str) -> subprocess.CompletedProcess:
    return run_cli(daemon.target, *args)


def test_table_commands(daemon, tmp_path):
    assert run(daemon, "create", "cli_t", "--rows", "1000", "--dim", "8", "--init", "uniform").returncode == 0
    listing = run(daemon, "tables")
    assert listing.returncode == 0 and "cli_t" in listing.stdout and "1000 x 8" in listing.stdout
    described = run(daemon, "describe", "cli_t")
    assert "metadata" in described.stdout and "dram" in described.stdout
    values = np.random.default_rng(0).standard_normal((1000, 8), dtype=np.float32)
    np.save(tmp_path / "v.npy", values)
    imported = run(daemon, "import", "cli_t", str(tmp_path / "v.npy"), "--chunk-rows", "300")
    assert imported.returncode == 0, imported.stderr
    assert "1000/1000 rows" in imported.stderr
    with Client(daemon.target) as c:
        np.testing.assert_array_equal(c.lookup("cli_t", np.arange(1000)), values)
    looked = run(daemon, "lookup", "cli_t", "3", "4", "--pooled")
    assert looked.returncode == 0, looked.stderr
    printed = np.array(looked.stdout.replace("[", " ").replace("]", " ").split(), dtype=np.float64)
    np.testing.assert_allclose(printed, values[3] + values[4], atol=1e-4)
    tiers = run(daemon, "tiers")
    assert "dram" in tiers.stdout and "emulated" in tiers.stdout
    assert [line.split()[1] for line in tiers.stdout.splitlines() if line.startswith("  port ")] == \
        ["cxl0", "cxl1", "cxl2", "cxl3"]
    assert run(daemon, "drop", "cli_t").returncode == 0
    missing = run(daemon, "describe", "cli_t")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_bench_command(daemon):
    assert run(daemon, "create", "cli_b", "--rows", "5000", "--dim", "16").returncode == 0
    out = run(daemon, "bench", "--table", "cli_b", "--duration", "2", "--concurrency", "2", "--bags", "16")
    assert out.returncode == 0, out.stderr
    assert "total:" in out.stdout and " 0 errors" in out.stdout and "p99" in out.stdout


def test_heat_histogram(daemon):
    with Client(daemon.target) as c:
        c.create_table("cli_h", 1000, 8)
        _, before = c.heat("cli_h")
        c.lookup_pooled({"cli_h": (np.repeat(np.arange(5), 64), np.full(10, 32, np.int32))})
        bins, tiers = c.heat("cli_h")
    assert bins[0] == "0" and bins[-1] == "128-255" and len(bins) == 9
    assert sum(before["dram"]) + sum(before["cxl"]) + sum(before["scm"]) == 1000
    assert before["dram"][0] + before["cxl"][0] + before["scm"][0] == 1000  # nothing read yet
    hot = sum(sum(counts[1:]) for counts in tiers.values())
    assert 1 <= hot <= 5  # at most the five rows read (counting samples 1 access in 8)
    out = run(daemon, "heat", "cli_h")
    assert out.returncode == 0 and "128-255" in out.stdout and "dram" in out.stdout
