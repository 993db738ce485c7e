"""The write-ahead log: opaque records in numbered segment files, with group commit.

This module owns the files in one WAL directory and nothing else: it does not
know what a record means (``kind`` and ``payload`` belong to the caller).

Layout: segment files ``wal-<first lsn, 8+ digits>.log``; the number in the name
is the LSN of the segment's first record, so names increase and an empty
segment still says where the log continues.  A record is a 21-byte header
(struct ``<IIIQB``: magic, payload length, CRC-32, LSN, kind) followed by the
payload; the CRC covers the packed LSN and kind, then the payload.

Durability: ``append`` only writes the record (page cache).  Under the
"always" policy ``wait_durable`` does group commit: the first waiter whose LSN
is not yet durable becomes the leader and fdatasyncs everything appended so
far, the others wait for it and all of them return together.  Both run in C
(native.GroupCommit) with the GIL released: a record's checksum and write
take no Python time from other writers, and a leader's fdatasync ends, and
wakes its group, without waiting for the GIL.  "interval"
fsyncs from a background thread; "off" leaves flushing to the OS.  A segment
is fsynced before the next one is started, and the directory is fsynced when a
segment is created or deleted.

On open the segments are validated in order.  A torn or corrupt record in
the last segment is what a crash in the middle of an append leaves: the
segment is truncated there and a WARNING names the file, the byte offset
and the reason.  A bad record in an earlier segment is damage, not a crash:
nothing is cut or deleted, the records from it to the end of its segment
(and those of a segment file that is missing) are a hole, reported by
ERROR and by holes / continues(), and later segments are kept: a
checkpoint that covers the hole makes it harmless, and the caller decides
what to do when none does.

Failures: an append that cannot be written (ENOSPC, EDQUOT, EIO) leaves no
part of its record behind and raises a StorageError naming the file
(NoSpaceError, RESOURCE_EXHAUSTED, when the device is full); the next append
tries again.  What part of a record was written is cut off again at once;
should that cut fail too, every later append first tries it again and fails
while it cannot, so that no record ever follows torn bytes (a replay would
stop there and lose it).  A failed fdatasync (or fsync of a segment before
the next one) is different: Linux may have dropped the pages it could not
write and report the next one clean, so the records since the last durable
one may be gone while a later fdatasync would say otherwise.  From then on
nothing is appended or made durable (LogFailedError, UNAVAILABLE), on_failed
is called once (the daemon stops), and a restart replays what the files hold.
Under "always" every record after the last durable one belongs to a call
that is told it failed, so the segment is first cut back to the end of the
last durable record (and fdatasynced): a restart does not replay them.
Files are created 0600: the log holds every row written.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

from embtierd.errors import LogFailedError, storage_error
from embtierd.native import GroupCommit

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("always", "interval", "off")

MAGIC = 0x4C415745
HEADER = struct.Struct("<IIIQB")  # magic, payload length, crc32, lsn, kind
LSN_KIND = struct.Struct("<QB")
MAX_PAYLOAD_BYTES = 0xFFFFFFFF
SEGMENT_NAME = re.compile(r"^wal-(\d+)\.log$")


@dataclass(frozen=True)
class WalRecord:
    """One logged record: its LSN (1, 2, 3, ... in append order), the caller's kind (0..255), payload."""

    lsn: int
    kind: int
    payload: bytes


@dataclass(frozen=True)
class _Segment:
    """A segment file and the LSN its first record has (or will have)."""

    first_lsn: int
    path: Path


def segment_path(directory: Path, first_lsn: int) -> Path:
    """The file name of the segment whose first record is first_lsn."""
    return directory / f"wal-{first_lsn:08d}.log"


def record_crc(lsn: int, kind: int, payload: bytes) -> int:
    """CRC-32 over the packed (lsn, kind) and then the payload."""
    return zlib.crc32(payload, zlib.crc32(LSN_KIND.pack(lsn, kind)))


def encode_record(lsn: int, kind: int, payload: bytes) -> bytes:
    """Header plus payload, ready for one os.write."""
    header = HEADER.pack(MAGIC, len(payload), record_crc(lsn, kind, payload), lsn, kind)
    return header + payload


def read_record(
    fh: BinaryIO, offset: int, file_bytes: int, expected_lsn: int | None
) -> WalRecord | str | None:
    """The record at offset, None at a clean end of file, or why it is unusable.

    expected_lsn None accepts any LSN (the caller does not know what comes next).
    """
    header = fh.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        return "torn record"
    magic, length, crc, lsn, kind = HEADER.unpack(header)
    if magic != MAGIC:
        return "bad magic"
    if offset + HEADER.size + length > file_bytes:
        return "torn record"
    payload = fh.read(length)
    if len(payload) < length:
        return "torn record"
    if record_crc(lsn, kind, payload) != crc:
        return "checksum mismatch"
    if expected_lsn is not None and lsn != expected_lsn:
        return f"lsn out of sequence (found {lsn}, expected {expected_lsn})"
    return WalRecord(lsn, kind, payload)


def scan_segment(segment: _Segment, expected_lsn: int) -> tuple[int, int, str | None]:
    """Validates one segment: (bytes of whole good records, next LSN, reason it stopped early or None)."""
    file_bytes = segment.path.stat().st_size
    offset = 0
    with open(segment.path, "rb") as fh:
        while True:
            result = read_record(fh, offset, file_bytes, expected_lsn)
            if result is None:
                return offset, expected_lsn, None
            if isinstance(result, str):
                return offset, expected_lsn, result
            offset += HEADER.size + len(result.payload)
            expected_lsn += 1


def list_segments(directory: Path) -> list[_Segment]:
    """The segment files in directory, ordered by first LSN."""
    found = []
    for path in directory.iterdir():
        match = SEGMENT_NAME.match(path.name)
        if match:
            found.append(_Segment(int(match.group(1)), path))
    return sorted(found, key=lambda s: s.first_lsn)


def fsync_directory(directory: Path) -> None:
    """Makes creations and deletions of files in directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """An append-only log of (kind, payload) records in one directory; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        fsync: str = "always",
        interval_seconds: float = 0.05,
        segment_bytes: int = 64 << 20,
        on_fsync: Callable[[float], None] | None = None,
    ) -> None:
        """Opens (creating the directory if needed) the log in directory and validates its segments."""
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"WAL fsync policy {fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
        if interval_seconds <= 0:
            raise ValueError(f"WAL interval_seconds must be > 0, got {interval_seconds!r}")
        if segment_bytes <= 0:
            raise ValueError(f"WAL segment_bytes must be > 0, got {segment_bytes!r}")
        self._directory = Path(directory)
        self._policy = fsync
        self._segment_bytes = segment_bytes
        self._on_fsync = on_fsync
        self._append_lock = threading.RLock()  # (re-entered: a failure met in _roll cuts the segment under it)
        self._closed = False
        self._torn = False  # an append failed: the segment may end in a part of its record (_cut_torn)
        self._bytes_written = 0
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._holes: list[tuple[int, int]] = []  # (first, last) LSN of records the log cannot give back
        self._segments, self._last_lsn = self._recover()
        self._replay_last_lsn = self._last_lsn
        self._fd, self._segment_used_bytes = self._open_current()
        self._commit = GroupCommit(self._last_lsn)
        self._commit.switch(self._fd, self._last_lsn, self._last_lsn)
        self.on_failed: Callable[[], None] = lambda: None  # called once, when an fdatasync fails
        self._undurable: collections.deque[tuple[int, int]] = collections.deque()  # ("always") (LSN, offset in
        # the current segment) of each record appended that was not yet durable when the next one was
        self._failure_reported = threading.Lock()  # taken, never given back, by the first report
        self._stop = threading.Event()
        self._interval_thread: threading.Thread | None = None
        if fsync == "interval":
            self._interval_thread = threading.Thread(
                target=self._sync_every, args=(interval_seconds,), name="wal-interval-sync", daemon=True
            )
            self._interval_thread.start()

    # -- opening and validation ------------------------------------------------------------------

    def _recover(self) -> tuple[list[_Segment], int]:
        """Validates the segments: cuts a torn tail, notes holes (module docstring); (segments kept,
        last LSN)."""
        segments = list_segments(self._directory)
        if not segments:
            first = _Segment(1, segment_path(self._directory, 1))
            os.close(self._create_segment_file(first.path))
            return [first], 0
        expected_lsn = segments[0].first_lsn
        for index, segment in enumerate(segments):
            if segment.first_lsn < expected_lsn:  # overlaps the records before it: not part of this log
                reason = f"lsn out of sequence (segment starts at {segment.first_lsn}, expected {expected_lsn})"
                return self._cut(segments, index, 0, reason), expected_lsn - 1
            if segment.first_lsn > expected_lsn:
                self._hole(expected_lsn, segment.first_lsn - 1, f"segment {segment.path.name} starts at record "
                                                                f"{segment.first_lsn}")
            good_bytes, expected_lsn, reason = scan_segment(segment, segment.first_lsn)
            if reason is not None:
                if index == len(segments) - 1:
                    return self._cut(segments, index, good_bytes, reason), expected_lsn - 1
                log.error("WAL segment %s: %s at byte %d: it is damaged (the later segments are kept)", segment.path,
                          reason, good_bytes)
        return segments, expected_lsn - 1

    def _hole(self, first: int, last: int, why: str) -> None:
        if first <= last:
            self._holes.append((first, last))
            log.error("WAL in %s: records %d to %d cannot be read (%s)", self._directory, first, last, why)

    def _cut(self, segments: list[_Segment], index: int, offset: int, reason: str) -> list[_Segment]:
        """Truncates segments[index] at offset (deleting it if nothing is left and it is not the
        first) and deletes every later segment; returns the segments kept."""
        dropped = segments[index + 1 :]
        log.warning(
            "WAL segment %s: %s at byte %d; truncating the log there (%d later segment(s) deleted)",
            segments[index].path,
            reason,
            offset,
            len(dropped),
        )
        if offset == 0 and index > 0:
            dropped = segments[index:]
            kept = segments[:index]
        else:
            os.truncate(segments[index].path, offset)
            self._fsync_path(segments[index].path)
            kept = segments[: index + 1]
        for segment in dropped:
            segment.path.unlink()
        fsync_directory(self._directory)
        return kept

    def _open_current(self) -> tuple[int, int]:
        """Opens the last segment for appending; (fd, its size in bytes)."""
        path = self._segments[-1].path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        size_bytes = os.fstat(fd).st_size
        if size_bytes:
            self._fsync_fd(fd)  # what we read back may only have been in the page cache
        return fd, size_bytes

    def _create_segment_file(self, path: Path) -> int:
        """Creates an empty segment file, makes its directory entry durable; returns an append fd."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fsync_directory(self._directory)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return fd

    # -- reading ---------------------------------------------------------------------------------

    def replay(self) -> Iterator[WalRecord]:
        """The records that survived validation, in LSN order (call before the first append)."""
        for segment in list(self._segments):
            if segment.first_lsn > self._replay_last_lsn:
                return
            yield from self._read_segment(segment)

    def _read_segment(self, segment: _Segment) -> Iterator[WalRecord]:
        """The validated records of one segment, up to the last LSN found at open."""
        file_bytes = segment.path.stat().st_size
        offset = 0
        with open(segment.path, "rb") as fh:
            while True:
                record = read_record(fh, offset, file_bytes, None)
                if not isinstance(record, WalRecord) or record.lsn > self._replay_last_lsn:
                    return
                yield record
                offset += HEADER.size + len(record.payload)

    # -- appending -------------------------------------------------------------------------------

    def append(self, kind: int, payload: bytes) -> int:
        """Writes one record to the page cache (not yet durable) and returns its LSN."""
        return self.append_parts(kind, [payload])

    def append_parts(self, kind: int, parts: list, write: tuple | None = None) -> int:
        """append() of the record whose payload is parts (bytes-like, C-contiguous) one after the
        other, without joining them first.  write: (NativeTable, ids, encoded rows) the same C call
        stores once the record is written (native.GroupCommit.append); what that raises comes out
        of here after the record is counted."""
        if not 0 <= kind <= 255:
            raise ValueError(f"WAL record kind must be 0..255, got {kind}")
        parts = [view.cast("B") if view.nbytes else memoryview(b"") for view in map(memoryview, parts)]  # (a
        # view with a 0 in its shape, as the values of a write of no rows, cannot be cast)
        payload_bytes = sum(part.nbytes for part in parts)
        if payload_bytes > MAX_PAYLOAD_BYTES:
            raise ValueError(f"WAL payload of {payload_bytes} bytes is over {MAX_PAYLOAD_BYTES}")
        with self._append_lock:
            self._check_open()
            lsn = self._last_lsn + 1
            try:
                if self._torn:
                    self._cut_torn()
                if self._segment_used_bytes >= self._segment_bytes:
                    self._roll()
                if self._policy == "always":
                    durable = self._commit.durable_lsn
                    while self._undurable and self._undurable[0][0] <= durable:
                        self._undurable.popleft()
                    self._undurable.append((lsn, self._segment_used_bytes))
                failed = self._commit.append(lsn, kind, parts, self._segment_used_bytes, write)
            except OSError as e:
                if self._commit.failed:
                    raise self._log_failed() from e
                if not self._torn:
                    self._torn = True
                    with contextlib.suppress(OSError):
                        self._cut_torn()
                raise storage_error(e, self._segments[-1].path, f"appending record {lsn} to the write-ahead log") \
                    from e
            self._last_lsn = lsn
            self._segment_used_bytes += HEADER.size + payload_bytes
            self._bytes_written += HEADER.size + payload_bytes
        if failed is not None:
            raise failed
        return lsn

    def _cut_torn(self) -> None:
        """After a failed append (append lock held): the segment ends at its last whole record again.
        The C append cut off what it wrote; where that failed, this truncates (OSError while it cannot)."""
        if os.fstat(self._fd).st_size != self._segment_used_bytes:
            os.ftruncate(self._fd, self._segment_used_bytes)
            log.warning("WAL segment %s: cut back to %d bytes, its last whole record, after a failed append",
                        self._segments[-1].path, self._segment_used_bytes)
        self._torn = False

    def roll(self) -> None:
        """Starts a new segment now (when the current one holds records), so that a checkpoint's
        position is a segment boundary that truncate_before can later cut at."""
        with self._append_lock:
            self._check_open()
            if self._segment_used_bytes:
                try:
                    if self._torn:
                        self._cut_torn()
                    self._roll()
                except OSError as e:
                    raise storage_error(e, self._directory, "starting a write-ahead log segment") from e

    def _roll(self) -> None:
        """Makes the current segment durable and starts the next one (append lock held); when
        either step fails the current segment stays the one appended to."""
        segment = _Segment(self._last_lsn + 1, segment_path(self._directory, self._last_lsn + 1))
        self._sync_through(self._last_lsn)
        fd = self._create_segment_file(segment.path)
        self._undurable.clear()  # every record of the segment is durable
        self._commit.switch(fd, self._last_lsn, self._last_lsn)
        os.close(self._fd)
        self._fd = fd
        self._segments.append(segment)
        self._segment_used_bytes = 0

    # -- durability ------------------------------------------------------------------------------

    def wait_durable(self, lsn: int) -> None:
        """Returns once lsn is durable ("always", group commit) or at once ("interval", "off")."""
        if self._policy == "always":
            self._sync_through(lsn)

    def sync(self) -> None:
        """fsyncs now whatever was appended (shares an fsync already under way)."""
        self._sync_through(self.last_lsn)

    def _sync_through(self, lsn: int) -> None:
        """Group commit (in C): lead an fdatasync or wait for the leader's, until lsn is durable."""
        try:
            seconds = self._commit.wait(lsn)
        except OSError as e:
            if self._commit.failed:
                raise self._log_failed() from e
            raise storage_error(e, self._segments[-1].path, f"making record {lsn} of the write-ahead log durable") \
                from e
        if seconds and self._on_fsync is not None:
            self._on_fsync(seconds)

    def _log_failed(self) -> LogFailedError:
        """The error of every append and wait after a failed fdatasync; the first call logs it and
        calls on_failed."""
        errno_ = self._commit.failed
        error = LogFailedError(
            f"the write-ahead log could not make its records durable (fdatasync of {self._segments[-1].path}: "
            f"{os.strerror(errno_)}): records after LSN {self._commit.durable_lsn} may be lost from the page "
            "cache, so no write is taken or acknowledged any more; the daemon stops, and its restart replays "
            "the log")
        if self._failure_reported.acquire(blocking=False):
            log.critical("%s", error)
            self._cut_undurable()
            self.on_failed()
        return error

    def _cut_undurable(self) -> None:
        """After a failed fdatasync under "always": cuts the segment back to the end of its last durable
        record, so that a restart replays none of the records whose callers were told they failed."""
        with self._append_lock:
            durable = self._commit.durable_lsn
            first = next((offset for lsn, offset in self._undurable if lsn > durable), None)
            if first is None:
                return
            try:
                os.ftruncate(self._fd, first)
                os.fdatasync(self._fd)
            except OSError as e:
                log.error("WAL segment %s: could not cut the records after LSN %d (%s): a restart may replay writes "
                          "whose callers were told they failed", self._segments[-1].path, durable, e)
                return
            self._segment_used_bytes = first
            log.warning("WAL segment %s: cut back to %d bytes, the end of LSN %d, the last durable record: the records "
                        "after it were never acknowledged", self._segments[-1].path, first, durable)

    def _fsync_fd(self, fd: int) -> None:
        """os.fsync, reporting its latency to on_fsync."""
        started = time.perf_counter()
        os.fsync(fd)
        if self._on_fsync is not None:
            self._on_fsync(time.perf_counter() - started)

    def _fsync_path(self, path: Path) -> None:
        """fsyncs a file by path (used for truncation during recovery)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._fsync_fd(fd)
        finally:
            os.close(fd)

    def _sync_every(self, interval_seconds: float) -> None:
        """The "interval" policy's background thread."""
        while not self._stop.wait(interval_seconds):
            try:
                self.sync()
            except LogFailedError:
                return  # reported; nothing is made durable again
            except Exception:
                log.exception("WAL interval fsync in %s failed", self._directory)

    # -- maintenance -----------------------------------------------------------------------------

    def truncate_before(self, lsn: int) -> None:
        """Deletes whole segments all of whose records have LSN < lsn (never the current one)."""
        with self._append_lock:
            deleted = 0
            while len(self._segments) > 1 and self._segments[1].first_lsn <= lsn:
                self._segments.pop(0).path.unlink()
                deleted += 1
            if deleted:
                fsync_directory(self._directory)
                self._holes = [hole for hole in self._holes if hole[1] >= self._segments[0].first_lsn]

    @property
    def holes(self) -> list[tuple[int, int]]:
        """(first, last) LSN of each run of records the log lost (see the module docstring)."""
        return list(self._holes)

    def continues(self, lsn: int) -> bool:
        """Whether the log holds every record after lsn: none cut away before its start, none in a hole."""
        return not self.missing_after(lsn)

    def missing_after(self, lsn: int) -> list[tuple[int, int]]:
        """The (first, last) LSN runs of records after lsn that the log cannot give back."""
        if lsn >= self._last_lsn:
            return []
        missing = [(lsn + 1, self.first_lsn - 1)] if lsn + 1 < self.first_lsn else []
        return missing + [(max(first, lsn + 1), last) for first, last in self._holes if last > lsn]

    def describe(self) -> str:
        """What records the log holds, for messages."""
        holes = "".join(f", without {first} to {last}" for first, last in self._holes)
        return f"records {self.first_lsn} to {self._last_lsn}{holes}" if self._last_lsn else "no records"

    @property
    def bytes_written(self) -> int:
        """Total bytes (headers and payloads) appended since open."""
        return self._bytes_written

    @property
    def first_lsn(self) -> int:
        """The LSN the log starts at: 1 while nothing has been cut, else just after the checkpoint
        it was cut back to (records before it are only in checkpoints)."""
        return self._segments[0].first_lsn

    @property
    def size_bytes(self) -> int:
        """Bytes the log's segment files take now."""
        with self._append_lock:
            paths = [segment.path for segment in self._segments]
        return sum(path.stat().st_size for path in paths if path.exists())

    @property
    def durable_lsn(self) -> int:
        """The highest LSN known to be on stable storage."""
        return self._commit.durable_lsn

    @property
    def last_lsn(self) -> int:
        """The LSN of the last record appended (0 if the log is empty)."""
        return self._last_lsn

    def _check_open(self) -> None:
        """Raises ValueError once the log is closed."""
        if self._closed:
            raise ValueError(f"WAL in {self._directory} is closed")

    def close(self) -> None:
        """Syncs, stops the interval thread and closes the current segment (idempotent)."""
        if self._closed:
            return
        self._stop.set()
        if self._interval_thread is not None:
            self._interval_thread.join()
        with contextlib.suppress(LogFailedError):  # reported when it happened; a restart replays the files
            self.sync()
        with self._append_lock:
            self._closed = True
            self._commit.switch(-1, self._last_lsn, self._commit.durable_lsn)
            os.close(self._fd)

    def __enter__(self) -> Self:
        """The log itself; leaving the block closes it."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Closes the log."""
        self.close()
