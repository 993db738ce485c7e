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
from embtierd.config import CheckpointConfig, DurabilityConfig
from embtierd.durability import checkpoint_format as fmt
from embtierd.durability.journal import ReplayError
from embtierd.durability.recovery import open_durable
from embtierd.durability.wal import WriteAheadLog
from embtierd.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    NoSpaceError,
    NotFoundError,
    RecoveryError,
)
from embtierd.native import QUANT_ADAPTIVE_MAX_SHRINK as ADAPTIVE_MAX_SHRINK
from embtierd.tiering.config import TableSettings


def open_store(path, store_factory, salvage=False, **settings):
    """A store recovered from path/checkpoints and path/wal, as the daemon does at start."""
    store = store_factory(dram="64K", cxl="64K", scm="64M")
    settings.setdefault("interval_seconds", 0)
    durable = open_durable(store, path, DurabilityConfig(checkpoints=CheckpointConfig(**settings)), salvage=salvage,
                           segment_bytes=4096)
    return store, durable.wal, durable.checkpoints


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
    info = ck.take("full")
    assert info.rows_written == 3500 and info.lsn == wal.last_lsn and info.kind == "full" and info.exact_chain
    assert wal.first_lsn == 1  # the only checkpoint: the log still reaches back to its start
    write_some(store, "f", np.random.default_rng(1), batches=20)
    segments = len(list((tmp_path / "wal").glob("wal-*.log")))
    second = ck.take("full")
    # a second, independent chain: the log is cut back to the first (the fallback), no further
    assert wal.first_lsn == info.lsn + 1 and second.lsn > info.lsn
    assert len(list((tmp_path / "wal").glob("wal-*.log"))) < segments
    assert [c.id for c in ck.list()] == [info.id, second.id]
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
    assert (inc1.kind, inc1.parent_id, inc1.base_id, inc1.rows_written) == ("incremental", full.id, full.id,
                                                                             len(first))
    second = write_some(store, "f", rng)
    inc2 = ck.take("incremental")
    assert (inc2.parent_id, inc2.rows_written) == (inc1.id, len(second))
    third = write_some(store, "f", rng)
    diff = ck.take("differential")
    assert (diff.kind, diff.parent_id, diff.rows_written) == ("differential", full.id, len(first | second | third))
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
    assert kinds[0] == "full" and kinds[1] == "differential"
    # the differentials grow (changes since the full accumulate): a second full comes once the
    # bytes written since the first pass a full one's
    assert "full" in kinds[2:]
    second = kinds.index("full", 1)
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
        with pytest.raises(NoSpaceError, match=r"writing checkpoint \d+: no space left on the device of .*checkpoints"):
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
    assert restored.id == info.id and saved.kind == "full" and saved.exact_chain
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


def flip(path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def flip_a_byte(root, checkpoint_id, file="table-0000.dat", at=10):
    flip(fmt.directory(root, checkpoint_id) / file, at)


def first_record(path) -> int:
    with WriteAheadLog(path / "wal", "always") as log:
        return next(log.replay()).lsn


def test_retention_keeps_a_fallback_chain_and_the_log_back_to_it(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory, keep=2)
    store.create_table("f", 1000, 8, initializer="uniform", seed=1)
    rng = np.random.default_rng(8)
    ids = []
    for kind in ["full", "incremental", "incremental", "full", "incremental", "incremental"]:
        write_some(store, "f", rng, batches=2)
        ids.append(ck.take(kind).id)
    lsn = {i: fmt.read_manifest(tmp_path / "checkpoints", i)["lsn"] for i in ids}
    # newest exact two: 5 and 6 (chain 4, 5, 6); the fallback shares none of it: 3 (chain 1, 2, 3)
    assert [c.id for c in ck.list()] == ids
    assert wal.first_lsn == lsn[ids[2]] + 1
    for kind in ["full", "incremental"]:
        write_some(store, "f", rng, batches=2)
        ids.append(ck.take(kind).id)
    lsn.update({i: fmt.read_manifest(tmp_path / "checkpoints", i)["lsn"] for i in ids[6:]})
    # newest exact two: 7 and 8 (chain 7, 8); the fallback is 6 (chain 4, 5, 6); 1, 2, 3 go
    assert [c.id for c in ck.list()] == ids[3:]
    with pytest.raises(NotFoundError, match="checkpoint 1 does not exist"):
        ck.restore(ids[0])
    assert wal.first_lsn == lsn[ids[5]] + 1
    store.write_rows("f", np.arange(4), np.full((4, 8), 9, dtype=np.float32))
    expected = all_rows(store, "f")
    wal.close()
    assert first_record(tmp_path) == lsn[ids[5]] + 1
    # the newest chain's full checkpoint is damaged: both of its checkpoints are unusable, and the
    # fallback plus the log still hold every write
    flip_a_byte(tmp_path / "checkpoints", ids[6])
    restored, wal, ck = open_store(tmp_path, store_factory, keep=2)
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)
    listed = {c.id: c for c in ck.list()}
    assert "fails its checksum" in listed[ids[6]].damage and "fails its checksum" in listed[ids[7]].damage
    assert not listed[ids[7]].exact_chain and listed[ids[5]].exact_chain and listed[ids[5]].damage == ""
    wal.close()


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
    assert listed[0].kind == "full" and {c.kind for c in listed[1:]} == {"incremental"}
    assert {c.quant_bits for c in listed} == {8}
    count = len(listed)
    time.sleep(0.2)
    assert len(ck.list()) == count  # stopped
    wal.close()


def test_the_only_checkpoint_damaged_leaves_the_log_to_rebuild_everything(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 1000, 8, initializer="uniform", seed=1)
    write_some(store, "f", np.random.default_rng(2))
    only = ck.take("full")
    write_some(store, "f", np.random.default_rng(3))
    expected = all_rows(store, "f")
    wal.close()
    flip_a_byte(tmp_path / "checkpoints", only.id)
    restored, wal, ck = open_store(tmp_path, store_factory)
    np.testing.assert_array_equal(all_rows(restored, "f"), expected)
    assert "fails its checksum" in ck.list()[0].damage
    wal.close()


def two_tables_and_two_chains(tmp_path, store_factory):
    """Tables f and g, full checkpoints 1 and 2 (the log is cut back to 1), writes to both after 2;
    returns what g holds."""
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 500, 8, initializer="uniform", seed=1)
    store.create_table("g", 300, 4, initializer="uniform", seed=2)
    rng = np.random.default_rng(4)
    for _ in range(2):
        write_some(store, "f", rng, batches=2)
        write_some(store, "g", rng, batches=2)
        ck.take("full")
    assert wal.first_lsn > 1
    write_some(store, "f", rng, batches=2)
    write_some(store, "g", rng, batches=2)
    expected = all_rows(store, "g")
    wal.close()
    return expected


def test_when_nothing_rebuilds_a_table_the_start_names_it_and_salvage_keeps_the_rest(tmp_path, store_factory,
                                                                                     caplog):
    expected_g = two_tables_and_two_chains(tmp_path, store_factory)
    for checkpoint_id in (1, 2):  # table f's file of both checkpoints
        flip_a_byte(tmp_path / "checkpoints", checkpoint_id)
    with pytest.raises(RecoveryError) as e:
        open_store(tmp_path, store_factory)
    message = str(e.value)
    assert "table-0000.dat (table 'f') fails its checksum" in message and "--salvage" in message
    assert "the write-ahead log holds records" in message
    store, wal, ck = open_store(tmp_path, store_factory, salvage=True)
    assert [t.name for t in store.tables()] == ["g"]
    np.testing.assert_array_equal(all_rows(store, "g"), expected_g)
    assert "salvage: started without" in caplog.text and "table 'f'" in caplog.text
    assert ck.list()[-1].kind == "full"  # what was kept is the state the next start begins from
    wal.close()
    store, wal, _ = open_store(tmp_path, store_factory)  # a plain start now
    np.testing.assert_array_equal(all_rows(store, "g"), expected_g)
    wal.close()


def test_a_restore_is_logged_and_comes_back_when_its_checkpoint_is_lost(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 800, 8, initializer="uniform", seed=1)
    rng = np.random.default_rng(5)
    write_some(store, "f", rng)
    source = ck.take("full")
    snapshot = all_rows(store, "f")
    write_some(store, "f", rng)
    ck.take("full")
    write_some(store, "f", rng)
    store.create_table("later", 10, 4)
    restored, saved = ck.restore(source.id)
    assert restored.id == source.id and saved.kind == "full"
    np.testing.assert_array_equal(all_rows(store, "f"), snapshot)
    assert store.generation("f") == saved.lsn  # the RESTORE record's: the checkpoint covers up to it
    store.write_rows("f", np.arange(6), np.full((6, 8), 3, dtype=np.float32))
    expected = all_rows(store, "f")
    assert source.id in [c.id for c in ck.list()]  # the log's RESTORE record needs it
    wal.close()
    flip_a_byte(tmp_path / "checkpoints", saved.id)
    store, wal, ck = open_store(tmp_path, store_factory)
    assert [t.name for t in store.tables()] == ["f"] and store.generation("f") == saved.lsn  # replayed
    np.testing.assert_array_equal(all_rows(store, "f"), expected)
    # once two newer chains hold the restored state, the RESTORE record leaves the log and its
    # checkpoint may go
    for _ in range(3):
        write_some(store, "f", rng, batches=1)
        ck.take("full")
    assert source.id not in [c.id for c in ck.list()]
    wal.close()


def test_a_restore_whose_checkpoint_cannot_be_written_stands(tmp_path, store_factory, monkeypatch):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 500, 8, initializer="uniform", seed=1)
    source = ck.take("full")
    snapshot = all_rows(store, "f")
    write_some(store, "f", np.random.default_rng(6))

    def full(self, table):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(fmt.Writer, "add", full)
        _, saved = ck.restore(source.id)
    assert saved is None
    np.testing.assert_array_equal(all_rows(store, "f"), snapshot)
    store.write_rows("f", np.arange(3), np.ones((3, 8), dtype=np.float32))
    expected = all_rows(store, "f")
    assert ck.take("incremental").kind == "full"  # the change bitmaps do not cover a restore
    wal.close()
    store, wal, _ = open_store(tmp_path, store_factory)
    np.testing.assert_array_equal(all_rows(store, "f"), expected)
    wal.close()


def test_replay_never_applies_a_record_to_a_later_table_of_the_same_name(tmp_path, store_factory):
    store, wal, _ = open_store(tmp_path, store_factory)
    store.create_table("t", 100, 4)
    old = store.generation("t")
    store.drop_table("t")
    store.create_table("t", 100, 4, initializer="uniform", seed=3)
    expected = all_rows(store, "t")
    # what the daemon before generations could log: a write of the dropped table after its DROP
    lsn = store.journal.log_write("t", old, np.arange(5), np.full((5, 4), 7, dtype=np.float32), "assign", 1.0)
    wal.close()
    with pytest.raises(ReplayError, match=rf"record {lsn} cannot be replayed \(WRITE\): it names table 't' of "
                                          rf"generation {old} .* the table of that name is generation"):
        open_store(tmp_path, store_factory)
    store, wal, _ = open_store(tmp_path, store_factory, salvage=True)
    np.testing.assert_array_equal(all_rows(store, "t"), expected)
    wal.close()


def test_a_damaged_log_segment_is_harmless_behind_a_checkpoint_and_named_after_one(tmp_path, store_factory):
    store, wal, ck = open_store(tmp_path, store_factory)
    store.create_table("f", 500, 8, initializer="uniform", seed=1)
    rng = np.random.default_rng(9)
    for _ in range(30):  # many small segments (4 KiB each)
        write_some(store, "f", rng, n=20, batches=1)
    ck.take("full")
    expected = all_rows(store, "f")
    wal.close()
    segments = sorted((tmp_path / "wal").glob("wal-*.log"))
    flip(segments[1], 100)  # a segment the checkpoint covers
    store, wal, ck = open_store(tmp_path, store_factory)
    np.testing.assert_array_equal(all_rows(store, "f"), expected)
    for _ in range(30):
        write_some(store, "f", rng, n=20, batches=1)
    wal.close()
    segments = sorted((tmp_path / "wal").glob("wal-*.log"))
    flip(segments[-3], 100)  # one after the checkpoint: its records are gone for good
    with pytest.raises(RecoveryError, match=r"no checkpoint continues the log; the write-ahead log holds records "
                                            r"\d+ to \d+, without \d+ to \d+"):
        open_store(tmp_path, store_factory)
    store, wal, ck = open_store(tmp_path, store_factory, salvage=True)
    assert [t.name for t in store.tables()] == ["f"]
    wal.close()


def test_policy_changes_are_logged_and_come_back_after_a_restart_and_over_a_checkpoint(tmp_path, store_factory):
    """SetPolicy is a logged change like the others: a restart brings back the last settings, whether
    the log alone holds them or a checkpoint holds older ones and the log the newer."""
    store, wal, checkpoints = open_store(tmp_path, store_factory)
    store.create_table("t", 100, 4)
    store.create_table("u", 100, 4)
    lru = TableSettings(policy="lru", pin="", capacity_bytes={"dram": 4096, "cxl": None})
    store.set_policy("t", lru)
    checkpoints.take("full")
    pinned = TableSettings(policy="lfu", pin="cxl", capacity_bytes={"dram": None, "cxl": None})
    store.set_policy("t", pinned)  # after the checkpoint: the log alone has it
    store.set_policy("u", lru)
    wal.close()
    store, wal, _ = open_store(tmp_path, store_factory)
    assert store.table_policy("t") == pinned and store.table_policy("u") == lru
    wal.close()


def test_listed_checkpoints_keep_their_durations(tmp_path, store_factory):
    """ListCheckpoints reported 0 s for every checkpoint: the manifest now records how long writing it took
    and how long writes were held for its snapshot, also across a restart."""
    store, wal, checkpoints = open_store(tmp_path, store_factory)
    store.create_table("t", 2000, 16, initializer="uniform", seed=1)
    info = checkpoints.take("full")
    assert info.duration_seconds > 0 and 0 < info.snapshot_seconds <= info.duration_seconds
    listed = {c.id: c for c in checkpoints.list()}[info.id]
    assert listed.snapshot_seconds == info.snapshot_seconds
    assert 0 < listed.duration_seconds <= info.duration_seconds
    wal.close()
    store, wal, checkpoints = open_store(tmp_path, store_factory)
    assert {c.id: c for c in checkpoints.list()}[info.id].snapshot_seconds == info.snapshot_seconds
    wal.close()


def test_a_restore_places_pinned_tables_first(tmp_path, store_factory):
    """A checkpoint whose tables fit was restored in name order: an unpinned table took the memory tiers and
    the next one, pinned to CXL, no longer fit, after the old tables were dropped (INTERNAL, and the
    daemon stopped).  Pinned tables are placed first; pins that cannot fit are refused before anything
    changes."""
    store, wal, checkpoints = open_store(tmp_path, store_factory)
    cxl = TableSettings(policy="lfu", pin="cxl", capacity_bytes={"dram": None, "cxl": None})
    store.create_table("b", 1000, 8, initializer="uniform", seed=1, policy=cxl)  # 32 KB of the 64 KB of CXL
    store.create_table("a", 10_000, 8, initializer="uniform", seed=2)  # DRAM, the rest of CXL, then SCM
    rows = {name: all_rows(store, name) for name in ("a", "b")}
    info = checkpoints.take("full")
    checkpoints.restore(info.id)
    assert np.all(store.placement("b") == 1)
    for name in ("a", "b"):
        np.testing.assert_array_equal(all_rows(store, name), rows[name])
    wal.close()
