"""Checkpoints through a real daemon: the kinds and quantization over gRPC and the CLI, listing,
restoring on request (and that surviving SIGKILL), and a restarted daemon bringing its hot rows
back into DRAM from the heat saved with the checkpoint."""

from __future__ import annotations

import subprocess
import time

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError

from tests.support import daemon_args, run_cli, start_daemon

# every access counted and heat halved every 1000 intervals (200 s): the hot rows' heat is certain to be
# well above 1 in the checkpoint and after the restart, however slowly a loaded host runs the test
TIERING = ("[tiering]\nenabled = true\ninterval_seconds = 0.2\naging_intervals = 1000\n"
           "[kernels]\nheat_sample_shift = 0\n")


def flip_a_byte(state, checkpoint_id: int, file: str = "table-0000.dat") -> None:
    data = state / "checkpoints" / f"ckpt-{checkpoint_id:08d}" / file
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))


def cli(target: str, *args: str) -> str:
    done = run_cli(target, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kinds_listing_and_restore_through_the_cli_survive_sigkill(tmp_path):
    state = tmp_path / "s"
    d = start_daemon(state)
    rng = np.random.default_rng(1)
    with Client(d.target) as c:
        c.create_table("e", 5000, 32, initializer="uniform", seed=2)
        full = c.checkpoint("full")
        ids = rng.choice(5000, 400, replace=False)
        c.write_rows("e", ids, rng.standard_normal((400, 32), dtype=np.float32))
        truth = c.lookup("e", np.arange(5000)).copy()
    out = cli(d.target, "checkpoint", "--kind", "incremental", "--bits", "4", "--quantizer", "minmax")
    assert f"incremental on {full.id}" in out and "4-bit minmax" in out and " 400 " in out, out
    listing = cli(d.target, "checkpoints")
    assert "recovers from it" in listing and "lossy: restore only" in listing, listing
    with Client(d.target) as c:
        quantized = c.checkpoints()[-1]
        assert (quantized.kind, quantized.parent_id, quantized.quant_bits, quantized.rows_written) == \
               ("incremental", full.id, 4, 400)
        c.write_rows("e", np.arange(10), np.zeros((10, 32), dtype=np.float32))  # undone by the restore
        c.create_table("later", 100, 4)                                         # dropped by the restore
    out = cli(d.target, "restore", str(quantized.id))
    assert f"restored checkpoint {quantized.id}" in out, out
    with Client(d.target) as c:
        assert [t.name for t in c.tables()] == ["e"]
        got = c.lookup("e", np.arange(5000))
        step = (truth.max(axis=1) - truth.min(axis=1)) / 15
        assert (np.abs(got - truth).max(axis=1) <= step / 2 * (1 + 2 ** -9) + 1e-6).all()
        c.write_rows("e", np.arange(3), np.full((3, 32), 9, dtype=np.float32))  # acknowledged after the restore
        expected = c.lookup("e", np.arange(5000)).copy()
    d.proc.kill()
    d.proc.wait(timeout=30)
    d = start_daemon(state)
    with Client(d.target) as c:
        assert [t.name for t in c.tables()] == ["e"]
        np.testing.assert_array_equal(c.lookup("e", np.arange(5000)), expected)
    assert d.stop() == 0, d.log()


def test_a_restarted_daemon_brings_its_hot_rows_back_into_dram(tmp_path):
    state = tmp_path / "s"
    config = tmp_path / "tiering.toml"
    config.write_text(TIERING)
    d = start_daemon(state, config=config)  # DRAM 2 MiB holds 32768 rows of 64 bytes
    hot = np.arange(90_000, 95_000)         # placed on SCM at creation (rows fill DRAM, CXL, SCM in id order)
    with Client(d.target) as c:
        c.create_table("t", 100_000, 16, initializer="uniform", seed=3)
        deadline = time.monotonic() + 60
        while True:  # until the engine (an interval every 0.2 s) has moved every hot row to DRAM
            for _ in range(10):
                c.lookup("t", hot)
            _, before = c.heat("t")
            if sum(before["dram"][1:]) >= hot.size and sum(before["scm"][1:]) == 0:
                break
            assert time.monotonic() < deadline, before
        for _ in range(10):
            c.lookup("t", hot)
        c.checkpoint("full")
    d.proc.kill()
    d.proc.wait(timeout=30)
    d = start_daemon(state, config=config)
    with Client(d.target) as c:
        _, after = c.heat("t")
    # the heat came back with the rows, and the rows went straight back to DRAM before serving
    assert sum(after["dram"][1:]) >= hot.size and sum(after["scm"][1:]) == 0, after
    assert "placed rows by their restored heat" in d.log()
    assert d.stop() == 0, d.log()


def test_a_flipped_byte_in_a_checkpoint_is_reported_and_the_one_before_used(tmp_path):
    state = tmp_path / "s"
    d = start_daemon(state)
    with Client(d.target) as c:
        c.create_table("e", 3000, 16, initializer="uniform", seed=4)
        c.checkpoint("full")
        c.write_rows("e", np.arange(50), np.full((50, 16), 2, dtype=np.float32))
        damaged = c.checkpoint("incremental")
        c.write_rows("e", np.arange(40, 60), np.full((20, 16), 3, dtype=np.float32))
        expected = c.lookup("e", np.arange(3000)).copy()
    d.proc.kill()
    d.proc.wait(timeout=30)
    flip_a_byte(state, damaged.id)
    d = start_daemon(state)
    assert f"checkpoint {damaged.id}: table-0000.dat (table 'e') fails its checksum" in d.log()
    with Client(d.target) as c:
        np.testing.assert_array_equal(c.lookup("e", np.arange(3000)), expected)  # the full one + the log
        with pytest.raises(EmbtierClientError) as err:
            c.restore(damaged.id)
        assert err.value.code == grpc.StatusCode.DATA_LOSS and "fails its checksum" in err.value.message
        np.testing.assert_array_equal(c.lookup("e", np.arange(3000)), expected)  # nothing changed
    assert d.stop() == 0, d.log()


def test_a_flipped_byte_in_the_only_checkpoint_leaves_the_log_to_rebuild_and_is_listed_as_damage(tmp_path):
    state = tmp_path / "s"
    d = start_daemon(state)
    rng = np.random.default_rng(7)
    with Client(d.target) as c:
        c.create_table("e", 3000, 16, initializer="uniform", seed=4)
        c.write_rows("e", np.arange(500), rng.standard_normal((500, 16), dtype=np.float32))
        only = c.checkpoint("full")
        c.write_rows("e", np.arange(400, 600), rng.standard_normal((200, 16), dtype=np.float32))
        expected = c.lookup("e", np.arange(3000)).copy()
        assert [(i.id, i.exact_chain, i.damage) for i in c.checkpoints()] == [(only.id, True, "")]
    d.proc.kill()
    d.proc.wait(timeout=30)
    flip_a_byte(state, only.id)
    d = start_daemon(state)
    assert "fails its checksum" in d.log() and "rebuilds every table" in d.log()
    with Client(d.target) as c:
        np.testing.assert_array_equal(c.lookup("e", np.arange(3000)), expected)
        listed = c.checkpoints()[0]
        assert not listed.exact_chain and "table-0000.dat (table 'e') fails its checksum" in listed.damage
        fresh = c.checkpoint("full")
        assert c.checkpoints()[-1].damage == ""
        flip_a_byte(state, fresh.id)  # damaged while the daemon runs: the next listing sees it
        listed = {i.id: i for i in c.checkpoints()}
        assert not listed[fresh.id].exact_chain and "fails its checksum" in listed[fresh.id].damage
    assert "DAMAGED: checkpoint" in cli(d.target, "checkpoints")
    assert d.stop() == 0, d.log()


def test_when_nothing_rebuilds_a_table_the_start_says_what_to_do_and_salvage_keeps_the_rest(tmp_path):
    state = tmp_path / "s"
    d = start_daemon(state)
    with Client(d.target) as c:
        c.create_table("e", 2000, 8, initializer="uniform", seed=1)
        c.create_table("f", 1000, 4, initializer="uniform", seed=2)
        damaged = [c.checkpoint("full").id for _ in range(2)]  # two chains: the log is cut back to the first
        c.write_rows("f", np.arange(10), np.full((10, 4), 5, dtype=np.float32))
        c.write_rows("e", np.arange(10), np.full((10, 8), 6, dtype=np.float32))
        expected = c.lookup("f", np.arange(1000)).copy()
    d.proc.kill()
    d.proc.wait(timeout=30)
    for checkpoint_id in damaged:
        flip_a_byte(state, checkpoint_id)  # table e's file in both
    args, *_ = daemon_args(state, config=state / "embtierd.toml")
    refused = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert "table-0000.dat (table 'e') fails its checksum" in refused.stderr
    assert "embtierd --salvage" in refused.stderr and "write-ahead log holds records" in refused.stderr
    d = start_daemon(state, "--salvage")
    assert "salvage: started without" in d.log() and "table 'e'" in d.log()
    with Client(d.target) as c:
        assert [t.name for t in c.tables()] == ["f"]
        np.testing.assert_array_equal(c.lookup("f", np.arange(1000)), expected)
    assert d.stop() == 0, d.log()
    d = start_daemon(state)  # what salvage kept is a plain start now
    with Client(d.target) as c:
        np.testing.assert_array_equal(c.lookup("f", np.arange(1000)), expected)
    assert d.stop() == 0, d.log()
