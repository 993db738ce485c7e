"""Checkpoints: exact ones restore bit for bit with the log after them replayed on top; incremental
and differential chains hold exactly the changed rows; "auto" switches to a full one when the chain
costs more; quantized ones restore within their bound per row and are never used for recovery; a
damaged checkpoint is skipped for the previous one; retention keeps what chains need; a restore on
request replaces the tables and survives a restart; the heat comes back."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from embtierd import checkpoint_format as fmt
from embtierd.checkpoint import Checkpointer
from embtierd.config import CheckpointConfig
from embtierd.errors import CorruptCheckpointError, InvalidArgumentError, NotFoundError, StorageError
from embtierd.journal import Journal, replay
from embtierd.native import QUANT_ADAPTIVE_MAX_SHRINK as ADAPTIVE_MAX_SHRINK
from embtierd.wal import WriteAheadLog


def open_store(path, store_factory, **settings):
    """A store recovered from path/checkpoints and path/wal, as the daemon does at start."""
    store = store_factory(dram="64K", cxl="64K", scm="64M")
    wal = WriteAheadLog(path / "wal", "always", segment_bytes=4096)
    settings.setdefault("interval_seconds", 0)
    checkpoints = Checkpointer(store, wal, path / "checkpoints", CheckpointConfig(**settings))
    covered = checkpoints.recover()
    replay(store, (r for r in wal.replay() if r.lsn > covered))
    store.journal = Journal(wal)
    return store, wal, checkpoints


def all_rows(store, name):
    return store.read_encoded(name, np.arange(store.spec(name)["num_rows"]))


def write_some(store, name, rng, n=50, batches=10):
    dim = store.spec(name)["dim"]
    rows = store.spec(name)["num_rows"]
    written = set()
    for _ in range(batches):
        ids = rng.integers(0, rows, n)
        store.write_rows(name, ids, rng.standard_normal((n, dim), dtype=np.float32))
        written.update(ids.tolist())
    return written


def test_restore_is_bit_identical_and_the_log_after_it_replays(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory, keep=1)
    store.create_table("f", 3000, 16, initializer="uniform", seed=3)
    store.create_table("q", 500, 24, dtype="int8", initializer="uniform", seed=4)
    write_some(store, "f", np.random.default_rng(0), batches=20)
    store.move_rows("f", np.arange(2000, 2100), "dram")  # placement is not what is saved
    segments = len(list((tmp_path / "wal").glob("wal-*.log")))
    info = ck.take("full")
    assert info.rows_written == 3500 and info.lsn == wal.last_lsn and info.kind == "FULL" and info.exact_chain
    assert len(list((tmp_path / "wal").glob("wal-*.log"))) < segments  # the segments it covers are gone
    store.write_rows("f", np.arange(10), np.full((10, 16), 7, dtype=np.float32))  # after the checkpoint
    store.drop_table("q")
    expected = all_rows(store, "f")
    wal.close()
    restored, wal, _ = open_store(tmp_path, store_factory)
    assert [t.name for t in restored.tables()] == ["f"]
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)
    wal.close()


def test_incremental_and_differential_hold_exactly_the_changed_rows(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory, keep=10)
    store.create_table("f", 4000, 8, initializer="uniform", seed=1)
    rng = np.random.default_rng(1)
    full = ck.take("full")
    first = write_some(store, "f", rng)
    store.move_rows("f", np.arange(100), "dram")  # moves change no value: not in the next checkpoint
    inc1 = ck.take("incremental")
    assert (inc1.kind, inc1.parent_id, inc1.base_id, inc1.rows_written) == ("INCREMENTAL", full.id, full.id,
                                                                             len(first))
    second = write_some(store, "f", rng)
    inc2 = ck.take("incremental")
    assert (inc2.parent_id, inc2.rows_written) == (inc1.id, len(second))
    third = write_some(store, "f", rng)
    diff = ck.take("differential")
    assert (diff.kind, diff.parent_id, diff.rows_written) == ("DIFFERENTIAL", full.id, len(first | second | third))
    ids = fmt.read_ids(tmp_path / "checkpoints", fmt.read_manifest(tmp_path / "checkpoints", diff.id),
                       fmt.read_manifest(tmp_path / "checkpoints", diff.id)["tables"][0])
    assert ids.tolist() == sorted(first | second | third)
    nothing = ck.take("incremental")
    assert nothing.rows_written == 0
    expected = all_rows(store, "f")
    # recovering without the log: the chain full -> differential -> incremental is the whole state
    wal.close()
    for segment in (tmp_path / "wal").glob("wal-*.log"):
        segment.unlink()
    restored, wal, _ = open_store(tmp_path, store_factory)
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)
    wal.close()


def test_a_table_created_after_the_full_checkpoint_goes_whole_into_the_next_one(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("a", 1000, 8, initializer="uniform", seed=1)
    ck.take("full")
    store.create_table("b", 700, 4, initializer="uniform", seed=2)
    store.drop_table("a")
    store.create_table("a", 300, 8, initializer="uniform", seed=5)  # same name, new table
    info = ck.take("incremental")
    assert info.rows_written == 1000 and sorted(info.tables) == ["a", "b"]
    expected = {name: all_rows(store, name) for name in ("a", "b")}
    wal.close()
    for segment in (tmp_path / "wal").glob("wal-*.log"):
        segment.unlink()
    restored, wal, _ = open_store(tmp_path, store_factory)
    for name, rows in expected.items():
        np.testing.assert_array_equal(all_rows(restored, name), rows)
    wal.close()


def test_a_restart_continues_a_chain_over_a_table_recreated_smaller(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 1000, 8, initializer="uniform", seed=1)
    ck.take("full")
    store.write_rows("f", np.array([900, 950]), np.ones((2, 8), dtype=np.float32))
    ck.take("incremental")                        # ids 900, 950 of the old table
    store.drop_table("f")
    store.create_table("f", 300, 8, initializer="uniform", seed=2)
    ck.take("incremental")                        # the new table, whole
    expected = all_rows(store, "f")
    wal.close()
    restored, wal, ck = open_store(tmp_path, store_factory)
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)
    # every row of the new table changed since the full checkpoint: a differential holds them all
    assert ck.take("differential").rows_written == 300
    wal.close()


def test_auto_writes_a_full_checkpoint_once_the_differentials_cost_more(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory, keep=20, auto_full_ratio=1.0)
    store.create_table("f", 1000, 16, initializer="uniform", seed=1)
    rng = np.random.default_rng(2)
    kinds = []
    for _ in range(8):
        kinds.append(ck.take("auto").kind)
        write_some(store, "f", rng, n=100, batches=2)  # ~18 % of the rows per interval
    assert kinds[0] == "FULL" and kinds[1] == "DIFFERENTIAL"
    # the differentials grow (changes since the full accumulate): a second full comes once the
    # bytes written since the first pass a full one's
    assert "FULL" in kinds[2:]
    second = kinds.index("FULL", 1)
    infos = ck.list()
    since = sum(i.bytes_written for i in infos[1:second])
    assert since <= infos[0].bytes_written * 1.05
    wal.close()


def test_a_failed_checkpoint_loses_no_change(tmp_path, store_factory, monkeypatch):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 2000, 8, initializer="uniform", seed=1)
    ck.take("full")
    written = write_some(store, "f", np.random.default_rng(3))

    def fail(self, table):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(fmt.Writer, "add", fail)
        with pytest.raises(StorageError, match=r"writing checkpoint \d+ into .* failed: .*No space left"):
            ck.take("incremental")
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    more = write_some(store, "f", np.random.default_rng(4))
    assert ck.take("incremental").rows_written == len(written | more)
    wal.close()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("quantizer", ["minmax", "adaptive"])
def test_quantized_restore_is_within_the_bound_of_its_bit_width_per_row(tmp_path, store_factory, bits, quantizer):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 3000, 24, initializer="uniform", seed=7)
    rng = np.random.default_rng(bits)
    ck.take("full", bits, quantizer)
    write_some(store, "f", rng, batches=4)
    store.write_rows("f", np.arange(5), np.full((5, 24), 3.25, dtype=np.float32))  # constant rows: exact
    info = ck.take("incremental", bits, quantizer)
    assert info.quant_bits == bits and not info.exact_chain
    truth = store.lookup("f", np.arange(3000))
    store.create_table("later", 10, 4)  # created after the checkpoint: a restore drops it
    restored, saved = ck.restore(info.id)
    assert restored.id == info.id and saved.kind == "FULL" and saved.exact_chain
    assert [t.name for t in store.tables()] == ["f"]
    got = store.lookup("f", np.arange(3000))
    span = truth.max(axis=1) - truth.min(axis=1)
    step = span / (2 ** bits - 1)
    # half a step, widened by float16 rounding of the stored range (outward, < 2^-10 relative)
    bound = step / 2 * (1 + 2 ** -9) + np.abs(truth).max(axis=1) * 2 ** -20
    if quantizer == "adaptive":
        bound = bound + ADAPTIVE_MAX_SHRINK * span
    error = np.abs(got - truth).max(axis=1)
    assert (error <= bound).all(), np.flatnonzero(error > bound)[:5]
    np.testing.assert_array_equal(got[:5], truth[:5])
    assert error.max() > 0  # it is quantized
    wal.close()


def test_quantized_checkpoints_are_not_used_for_recovery(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 2000, 8, initializer="uniform", seed=1)
    exact = ck.take("full")
    write_some(store, "f", np.random.default_rng(5))
    quantized = ck.take("incremental", 4)
    write_some(store, "f", np.random.default_rng(6))
    lossy = ck.take("full", 8)
    expected = all_rows(store, "f")
    wal.close()
    restored, wal, _ = open_store(tmp_path, store_factory)
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)  # the exact one plus the whole log
    assert [c.id for c in ck.list()] == [exact.id, quantized.id, lossy.id]  # the log was not cut behind them
    wal.close()


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, store_factory, caplog):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 1000, 8, initializer="uniform", seed=1)
    ck.take("full")
    store.write_rows("f", np.arange(5), np.full((5, 8), 2, dtype=np.float32))
    expected = all_rows(store, "f")
    newest = ck.take("incremental")
    wal.close()
    data = fmt.directory(tmp_path / "checkpoints", newest.id) / "table-0000.dat"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF  # one flipped byte
    data.write_bytes(bytes(raw))
    restored, wal, ck = open_store(tmp_path, store_factory)
    assert "fails its checksum" in caplog.text and f"checkpoint {newest.id}" in caplog.text
    # the previous checkpoint plus the log after it: every write is there
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        ck.restore(newest.id)
    wal.close()


def test_retention_keeps_the_chains_it_needs_and_cuts_the_log_behind_exact_ones(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory, keep=2)
    store.create_table("f", 1000, 8, initializer="uniform", seed=1)
    rng = np.random.default_rng(8)
    ids = []
    for kind in ["full", "incremental", "incremental", "full", "incremental", "incremental"]:
        write_some(store, "f", rng, batches=2)
        ids.append(ck.take(kind).id)
    # newest two: 6 (chain 4, 5, 6) and 5 (chain 4, 5)
    assert [c.id for c in ck.list()] == ids[3:]
    # the log goes back to the older of the two exact ones kept (5): what follows it is still there
    with pytest.raises(NotFoundError, match="checkpoint 1 does not exist"):
        ck.restore(ids[0])
    wal.close()
    reopened = WriteAheadLog(tmp_path / "wal", "always")
    records = [r.lsn for r in reopened.replay()]
    reopened.close()
    assert records[0] == fmt.read_manifest(tmp_path / "checkpoints", ids[4])["lsn"] + 1


def test_restore_on_request_survives_a_restart_and_brings_the_heat_back(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 2000, 8, initializer="uniform", seed=1)
    hot = np.arange(1500, 1600)
    for _ in range(40):
        store.lookup("f", hot)
    heat = store.heat("f").copy()
    assert heat[hot].min() > 0
    saved = ck.take("full")
    before = all_rows(store, "f")
    write_some(store, "f", np.random.default_rng(9))
    store.create_table("g", 50, 4)
    ck.restore(saved.id)
    np.testing.assert_array_equal(all_rows(store, "f"), before)
    np.testing.assert_array_equal(store.heat("f"), heat)
    store.write_rows("f", np.arange(3), np.ones((3, 8), dtype=np.float32))  # after the restore
    expected = all_rows(store, "f")
    wal.close()
    restored, wal, _ = open_store(tmp_path, store_factory)
    assert [t.name for t in restored.tables()] == ["f"]
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)
    np.testing.assert_array_equal(restored.heat("f"), heat)
    wal.close()


def test_bad_requests_name_the_field_and_value(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 100, 4)
    store.create_table("g", 100, 4)
    with pytest.raises(InvalidArgumentError, match="quant_bits must be one of 0, 2, 3, 4, 8; got 5"):
        ck.take("full", 5)
    with pytest.raises(InvalidArgumentError, match="kind must be one of .* got 'weekly'"):
        ck.take("weekly")
    with pytest.raises(InvalidArgumentError, match="quantizer must be one of .* got 'uniform'"):
        ck.take("full", 8, "uniform")
    with pytest.raises(InvalidArgumentError, match="it would leave out g"):
        ck.take("full", tables=["f"])
    with pytest.raises(NotFoundError, match="table 'h' does not exist"):
        ck.take("full", tables=["h"])
    with pytest.raises(NotFoundError, match="checkpoint 7 does not exist"):
        ck.restore(7)
    assert ck.list() == []
    info = ck.take("full", tables=["g", "f"])
    manifest = json.loads((fmt.directory(tmp_path / "checkpoints", info.id) / "manifest.json").read_text())
    assert manifest["format_version"] == fmt.FORMAT_VERSION and [t["name"] for t in manifest["tables"]] == ["f", "g"]
    wal.close()


def test_the_schedule_takes_the_configured_checkpoints_until_stopped(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory, interval_seconds=0.05, kind="incremental", quant_bits=8)
    store.create_table("f", 500, 4, initializer="uniform", seed=1)
    ck.start()
    deadline = time.monotonic() + 30
    while len(ck.list()) < 3 and time.monotonic() < deadline:
        store.write_rows("f", np.arange(7), np.ones((7, 4), dtype=np.float32))
        time.sleep(0.02)
    ck.stop()
    listed = ck.list()
    assert len(listed) >= 3
    assert listed[0].kind == "FULL" and {c.kind for c in listed[1:]} == {"INCREMENTAL"}
    assert {c.quant_bits for c in listed} == {8}
    count = len(listed)
    time.sleep(0.2)
    assert len(ck.list()) == count  # stopped
    wal.close()
