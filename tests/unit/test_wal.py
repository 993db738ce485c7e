"""The write-ahead log: round trips, segments, recovery from torn and corrupt records, group commit."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from embtierd.durability import wal
from embtierd.durability.wal import FSYNC_POLICIES, WalRecord, WriteAheadLog

PAYLOAD_BYTES = 30
RECORD_BYTES = wal.HEADER.size + PAYLOAD_BYTES  # 51
SMALL_SEGMENT_BYTES = 200  # rolls after 4 records of RECORD_BYTES


def segment_names(directory: Path) -> list[str]:
    """The WAL segment files in directory, in LSN order."""
    return [s.path.name for s in wal.list_segments(directory)]


def fill(log: WriteAheadLog, count: int) -> list[tuple[int, bytes]]:
    """Appends count fixed-size records; returns their (kind, payload)."""
    records = [(i % 256, bytes([i % 251]) * PAYLOAD_BYTES) for i in range(count)]
    for kind, payload in records:
        log.append(kind, payload)
    return records


def replayed(directory: Path, **options: object) -> list[WalRecord]:
    """Opens the log, replays it and closes it again."""
    with WriteAheadLog(directory, **options) as log:
        return list(log.replay())


def test_round_trip_and_continue_after_reopen(tmp_path: Path) -> None:
    records = [(0, b""), (7, b"x"), (255, os.urandom(1 << 20)), (3, b"abc" * 1000), (1, b"")]
    with WriteAheadLog(tmp_path / "wal") as log:
        lsns = [log.append(kind, payload) for kind, payload in records]
        assert lsns == [1, 2, 3, 4, 5]
        assert log.last_lsn == 5
        assert log.bytes_written == sum(wal.HEADER.size + len(p) for _, p in records)
    with WriteAheadLog(tmp_path / "wal") as log:
        assert list(log.replay()) == [WalRecord(i + 1, k, p) for i, (k, p) in enumerate(records)]
        assert log.last_lsn == log.durable_lsn == 5
        assert log.append(9, b"after") == 6
    assert replayed(tmp_path / "wal")[-1] == WalRecord(6, 9, b"after")


def test_records_are_byte_for_byte_the_documented_format(tmp_path: Path) -> None:
    """The C append writes exactly what the format's Python reference (encode_record) encodes, also
    for a payload given in parts (empty ones, a numpy array, a 2-D one)."""
    rng = np.random.default_rng(0)
    records = [(0, [b""]), (5, [b"ab", b"", b"cdef"]), (200, [rng.integers(-9, 9, 1000),
                                                                rng.standard_normal((37, 3), dtype=np.float32)]),
               (255, [os.urandom(1 << 20), b"tail"])]
    with WriteAheadLog(tmp_path) as log:
        for kind, parts in records:
            log.append_parts(kind, parts)
    expected = b"".join(wal.encode_record(lsn, kind, b"".join(bytes(memoryview(p).cast("B")) for p in parts))
                        for lsn, (kind, parts) in enumerate(records, start=1))
    assert (tmp_path / "wal-00000001.log").read_bytes() == expected


def test_empty_log_replays_nothing(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as log:
        assert list(log.replay()) == []
        assert log.last_lsn == 0
        assert log.append(1, b"first") == 1


def test_segments_roll_over_and_replay_in_order(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        records = fill(log, 30)
    assert segment_names(tmp_path) == [f"wal-{first:08d}.log" for first in range(1, 31, 4)]
    got = replayed(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES)
    assert got == [WalRecord(i + 1, k, p) for i, (k, p) in enumerate(records)]


def test_truncate_before_deletes_only_whole_old_segments(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        fill(log, 30)  # segments start at 1, 5, 9, ..., 29
        log.truncate_before(11)  # segments 1-4 and 5-8 go; 9-12 holds 11 and stays
        assert segment_names(tmp_path)[0] == "wal-00000009.log"
        log.truncate_before(13)  # 9-12 are all below 13 now
        assert segment_names(tmp_path)[0] == "wal-00000013.log"
        log.truncate_before(1000)  # never the current segment
        assert segment_names(tmp_path) == ["wal-00000029.log"]
        assert log.append(0, b"more") == 31
    assert [r.lsn for r in replayed(tmp_path)] == [29, 30, 31]


@pytest.mark.parametrize("cut_bytes", [3, PAYLOAD_BYTES + 10], ids=["in-payload", "in-header"])
def test_torn_tail_is_truncated_to_the_last_whole_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut_bytes: int
) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        records = fill(log, 10)  # segments 1-4, 5-8, 9-10
    last = tmp_path / "wal-00000009.log"
    os.truncate(last, 2 * RECORD_BYTES - cut_bytes)
    warnings = caplog.at_level(logging.WARNING, logger="embtierd.durability.wal")
    with warnings, WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        assert [r.lsn for r in log.replay()] == list(range(1, 10))
        assert last.stat().st_size == RECORD_BYTES
        assert log.append(42, b"replacement") == 10
    assert "wal-00000009.log" in caplog.text and "torn record" in caplog.text
    assert f"at byte {RECORD_BYTES}" in caplog.text
    got = replayed(tmp_path)
    assert got[:9] == [WalRecord(i + 1, k, p) for i, (k, p) in enumerate(records[:9])]
    assert got[9:] == [WalRecord(10, 42, b"replacement")]


def flip_byte(path: Path, offset: int) -> None:
    """XORs one byte of a file in place."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "offset_in_record, reason", [(wal.HEADER.size + 3, "checksum mismatch"), (0, "bad magic")]
)
def test_a_damaged_middle_record_leaves_a_hole_and_keeps_every_later_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, offset_in_record: int, reason: str
) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        fill(log, 20)  # segments 1, 5, 9, 13, 17
    names = segment_names(tmp_path)
    flip_byte(tmp_path / "wal-00000005.log", RECORD_BYTES + offset_in_record)  # lsn 6
    errors = caplog.at_level(logging.ERROR, logger="embtierd.durability.wal")
    with errors, WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        assert [r.lsn for r in log.replay()] == [1, 2, 3, 4, 5, *range(9, 21)]
        assert log.holes == [(6, 8)] and log.last_lsn == 20
        assert log.continues(8) and not log.continues(5) and log.missing_after(2) == [(6, 8)]
        assert log.describe() == "records 1 to 20, without 6 to 8"
        assert log.append(1, b"x") == 21
        log.truncate_before(9)  # cut past it: the hole goes with the damaged segment
        assert log.holes == [] and log.continues(8)
    assert segment_names(tmp_path)[:3] == names[2:]  # nothing was deleted but what the cut asked for
    assert "wal-00000005.log" in caplog.text and reason in caplog.text and "records 6 to 8 cannot be read" in caplog.text


def test_a_missing_segment_is_a_hole_too(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        fill(log, 10)  # segments 1-4, 5-8, 9-10
    (tmp_path / "wal-00000005.log").unlink()
    with WriteAheadLog(tmp_path, segment_bytes=SMALL_SEGMENT_BYTES) as log:
        assert [r.lsn for r in log.replay()] == [1, 2, 3, 4, 9, 10]
        assert log.holes == [(5, 8)] and log.continues(8) and not log.continues(4)
        assert log.append(1, b"x") == 11
    assert [r.lsn for r in replayed(tmp_path)] == [1, 2, 3, 4, 9, 10, 11]


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    fsync_seconds: list[float] = []
    threads_count, appends_each = 8, 50
    start = threading.Barrier(threads_count)
    not_durable: list[int] = []
    log = WriteAheadLog(tmp_path, fsync="always", on_fsync=fsync_seconds.append)

    def writer(thread_index: int) -> None:
        start.wait()
        for i in range(appends_each):
            lsn = log.append(thread_index, f"{thread_index}:{i}".encode())
            log.wait_durable(lsn)
            if log.durable_lsn < lsn:
                not_durable.append(lsn)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = threads_count * appends_each
    assert not_durable == []
    assert log.last_lsn == log.durable_lsn == total
    assert 0 < len(fsync_seconds) <= total // 2
    log.close()
    assert len(replayed(tmp_path)) == total


def test_off_policy_never_fsyncs_on_wait(tmp_path: Path) -> None:
    fsyncs: list[float] = []
    log = WriteAheadLog(tmp_path, fsync="off", on_fsync=fsyncs.append)
    lsn = log.append(1, b"x")
    log.wait_durable(lsn)
    assert fsyncs == [] and log.durable_lsn == 0
    log.close()
    assert log.durable_lsn == 1 and len(fsyncs) == 1


def test_interval_policy_is_durable_after_close(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path, fsync="interval", interval_seconds=0.01)
    lsns = [log.append(2, b"y" * 100) for _ in range(20)]
    log.wait_durable(lsns[-1])  # returns at once; the background thread fsyncs
    log.close()
    assert log.durable_lsn == log.last_lsn == 20
    assert len(replayed(tmp_path)) == 20


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    assert FSYNC_POLICIES == ("always", "interval", "off")
    with pytest.raises(ValueError, match="'sometimes'"):
        WriteAheadLog(tmp_path, fsync="sometimes")
    with WriteAheadLog(tmp_path) as log, pytest.raises(ValueError, match="256"):
        log.append(256, b"")
    with pytest.raises(ValueError, match="closed"):
        log.append(0, b"")


def test_after_a_failed_fdatasync_nothing_is_appended_or_acknowledged_again(tmp_path: Path) -> None:
    """fdatasync of a pipe fails (EINVAL), as one of a disk that lost the pages would: the commit
    refuses every later wait and append, even though a later fdatasync of the same fd might pass."""
    from embtierd.native import GroupCommit

    read_end, write_end = os.pipe()
    try:
        commit = GroupCommit(0)
        commit.switch(write_end, 0, 0)
        commit.append(1, 7, [b"one"], 0)
        assert commit.failed == 0
        with pytest.raises(OSError) as err:
            commit.wait(1)
        assert err.value.errno == errno.EINVAL and commit.failed == errno.EINVAL and commit.durable_lsn == 0
        with pytest.raises(OSError) as err:  # the same answer again: no new fdatasync can clear it
            commit.wait(1)
        assert err.value.errno == errno.EINVAL
        written = os.read(read_end, 1 << 16)
        assert written.endswith(b"one")
        with pytest.raises(OSError) as err:
            commit.append(2, 7, [b"two"], len(written))
        assert err.value.errno == errno.EINVAL
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):  # nothing was written
            os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_log_whose_fdatasync_failed_refuses_writes_reports_once_and_keeps_what_was_durable(
        tmp_path: Path) -> None:
    from embtierd.errors import LogFailedError

    directory = tmp_path / "wal"
    log = WriteAheadLog(directory, "always")
    reports = []
    log.on_failed = lambda: reports.append(1)
    log.wait_durable(log.append(1, b"durable"))
    lsn = log.append(2, b"told it failed")  # in the segment file, not yet durable
    assert replayed_bytes(directory).endswith(b"told it failed")
    read_end, write_end = os.pipe()  # from here the log's fdatasyncs fail (EINVAL), as on a failing disk
    try:
        log._commit.switch(write_end, log.last_lsn, log.durable_lsn)
        with pytest.raises(LogFailedError) as err:
            log.wait_durable(lsn)
        assert err.value.status == "UNAVAILABLE" and "could not make its records durable" in str(err.value)
        assert f"records after LSN {lsn - 1} may be lost" in str(err.value) and "Invalid argument" in str(err.value)
        for attempt in (lambda: log.append(3, b"refused"), lambda: log.wait_durable(lsn), log.sync):
            with pytest.raises(LogFailedError):
                attempt()
        assert reports == [1] and log.last_lsn == lsn
        log.close()  # the failure was reported: closing does not raise it again
    finally:
        os.close(read_end)
        os.close(write_end)
    # the segment was cut back to the last durable record: the call told it failed is not replayed
    assert replayed(directory) == [WalRecord(1, 1, b"durable")]


def replayed_bytes(directory: Path) -> bytes:
    """The bytes of the log's segment files, in order."""
    return b"".join(s.path.read_bytes() for s in wal.list_segments(directory))
