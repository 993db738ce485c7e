"""Full checkpoints: bit-identical restore, the log after it replayed on top, a damaged checkpoint
skipped for the previous one, log segments it covers deleted."""

from __future__ import annotations

import numpy as np
from embtierd import checkpoint
from embtierd.journal import Journal, replay
from embtierd.wal import WriteAheadLog


def open_store(path, store_factory):
    store = store_factory(dram="64K", cxl="64K", scm="64M")
    wal = WriteAheadLog(path / "wal", "always", segment_bytes=4096)
    covered = checkpoint.restore_newest(store, path / "checkpoints")
    replay(store, (r for r in wal.replay() if r.lsn > covered))
    store.journal = Journal(wal)
    return store, wal


def test_restore_is_bit_identical_and_the_log_after_it_replays(tmp_path, store_factory):
    store, wal = open_store(tmp_path, store_factory)
    store.create_table("f", 3000, 16, initializer="uniform", seed=3)
    store.create_table("q", 500, 24, dtype="int8", initializer="uniform", seed=4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 3000, 50)
        store.write_rows("f", ids, rng.standard_normal((50, 16), dtype=np.float32))
    store.move_rows("f", np.arange(2000, 2100), "dram")  # placement is not what is saved
    segments = len(list((tmp_path / "wal").glob("wal-*.log")))
    info = checkpoint.take(store, wal, tmp_path / "checkpoints", keep=1)
    assert info.rows_written == 3500 and info.lsn == wal.last_lsn
    assert len(list((tmp_path / "wal").glob("wal-*.log"))) < segments  # the segments it covers are gone
    store.write_rows("f", np.arange(10), np.full((10, 16), 7, dtype=np.float32))  # after the checkpoint
    store.drop_table("q")
    expected = store.read_encoded("f", np.arange(3000))
    wal.close()
    restored, wal = open_store(tmp_path, store_factory)
    assert [t.name for t in restored.tables()] == ["f"]
    np.testing.assert_array_equal(restored.read_encoded("f", np.arange(3000)), expected)
    wal.close()


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, store_factory, caplog):
    store, wal = open_store(tmp_path, store_factory)
    store.create_table("f", 1000, 8, initializer="uniform", seed=1)
    checkpoint.take(store, wal, tmp_path / "checkpoints")
    store.write_rows("f", np.arange(5), np.full((5, 8), 2, dtype=np.float32))
    expected = store.read_encoded("f", np.arange(1000))
    newest = checkpoint.take(store, wal, tmp_path / "checkpoints")
    wal.close()
    data = newest.path / "table-0000.rows"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF  # one flipped byte
    data.write_bytes(bytes(raw))
    restored, wal = open_store(tmp_path, store_factory)
    assert "fails its checksum" in caplog.text and newest.path.name in caplog.text
    # the previous checkpoint plus the log after it: every write is there
    np.testing.assert_array_equal(restored.read_encoded("f", np.arange(1000)), expected)
    wal.close()
