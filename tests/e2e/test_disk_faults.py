"""Disk faults under a real daemon: a state device that fills up, and an SCM region that returns EIO.

The devices are real: an ext4 file system in an image file, loop-mounted (the log, the checkpoints
and the SCM file on it, as on a host whose state disk fills), and for the SCM read errors a loop
device with direct I/O whose backing image is cut short under the SCM file's last blocks: the
block layer then fails every read of that region with EIO, as a failing disk sector does, and
putting the cut bytes back heals it.  (device-mapper's error target would do the same for a region
in the middle; kernels built without it, as this VM kind's, still have loop.)  For a disk whose
writes fail, the image lies on a small tmpfs that is filled: the loop device can no longer write
pages back, and fdatasync fails.  The tests need root and loop devices and are skipped, saying why,
where there are none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError
from prometheus_client.parser import text_string_to_metric_families

from tests.support import kill_daemons_started_since, start_daemon

ROWS, DIM = 4000, 16
BATCH = 200  # rows of one write: 12.8 KB of values, more than a file system block
CONFIG = ('[tiering]\nenabled = false\n[durability]\nfsync = "always"\n'
          '[durability.checkpoints]\ninterval_seconds = 0\nkeep = 4\n')


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)


@contextlib.contextmanager
def ext4_device(directory: Path, size_bytes: int, image_dir: Path | None = None, direct_io: bool = True,
                fresh: bool = True, journal: bool = True) -> Iterator[tuple[Path, Path]]:
    """(mount point, backing image) of an ext4 file system of size_bytes in an image (in image_dir, else
    directory; mounted at directory/device), on a loop device with direct I/O (reads past the image's
    end fail with EIO; see the module docstring) unless direct_io is false; fresh false mounts the
    image there is, checked with e2fsck first.  The daemons started meanwhile are killed, then it is
    unmounted and detached, however the block ends."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("losetup (util-linux) and mkfs.ext4 (e2fsprogs) are needed")
    image, mount = (image_dir or directory) / "device.img", directory / "device"
    if fresh:
        with open(image, "wb") as f:
            f.truncate(size_bytes)
    done = run("losetup", f"--direct-io={'on' if direct_io else 'off'}", "--show", "-f", str(image))
    if done.returncode != 0:
        pytest.skip(f"no loop device here: losetup: {done.stderr.strip()}")
    loop = done.stdout.strip()
    try:
        if fresh:
            done = run("mkfs.ext4", "-q", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                       *(() if journal else ("-O", "^has_journal")), loop)
        else:
            done = run("e2fsck", "-fy", loop)  # 1: errors it corrected
            done.returncode = 0 if done.returncode in (0, 1) else done.returncode
        assert done.returncode == 0, done.stdout + done.stderr
        mount.mkdir(exist_ok=True)
        done = run("mount", "-o", "noatime", loop, str(mount))
        if done.returncode != 0:
            pytest.skip(f"cannot mount an ext4 loop device here: {done.stderr.strip()}")
        try:
            with kill_daemons_started_since():
                yield mount, image
        finally:
            umounted = run("umount", str(mount))
            assert umounted.returncode == 0 or run("umount", "-l", str(mount)).returncode == 0, umounted.stderr
    finally:
        run("losetup", "-d", loop)


class Filler:
    """A file that takes the free space of a device, a piece at a time (so that writers running
    meanwhile see it shrink), to the last byte; remove() gives the space back."""

    def __init__(self, path: Path):
        self.path = path

    def fill(self, piece_bytes: int = 1 << 20, pause_seconds: float = 0.002) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (piece_bytes, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\xa5" * size)
                        time.sleep(pause_seconds if size == piece_bytes else 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        self.path.unlink()


class Writer(threading.Thread):
    """Writes batches of BATCH rows, call k assigning value k, one call after the other, and applies
    to its model exactly the calls acknowledged; keeps every failure."""

    def __init__(self, target: str, model: np.ndarray, first_value: int):
        super().__init__(daemon=True)
        self.target, self.model, self.value = target, model, first_value
        self.acked, self.failures = 0, []
        self.stop = threading.Event()
        self.rng = np.random.default_rng(first_value)

    def run(self) -> None:
        with Client(self.target) as c:
            while not self.stop.is_set():
                self.value += 1
                ids = self.rng.choice(ROWS, BATCH, replace=False)
                try:
                    c.write_rows("w", ids, np.full((BATCH, DIM), self.value, np.float32))
                except EmbtierClientError as e:
                    self.failures.append(e)
                    time.sleep(0.005)
                    continue
                self.model[ids] = self.value
                self.acked += 1

    def until(self, condition, timeout_seconds: float = 20) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not condition():
            assert time.monotonic() < deadline and self.is_alive(), (self.acked, self.failures[-1:])
            time.sleep(0.01)


def full_device_error(e: EmbtierClientError, path: Path) -> bool:
    """Whether e is the RESOURCE_EXHAUSTED of a full device that names path."""
    return e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"no space left on the device of {path}" in e.message


def assert_serves(c: Client, model: np.ndarray) -> None:
    """Lookup and LookupPooled answer from exactly the model's rows."""
    np.testing.assert_array_equal(c.lookup("w", np.arange(ROWS)), model)
    rng = np.random.default_rng(3)
    ids, lengths = rng.integers(0, ROWS, 640), np.full(20, 32, np.int32)
    expected = np.add.reduceat(model[ids], np.arange(0, 640, 32), axis=0)
    np.testing.assert_allclose(c.lookup_pooled({"w": (ids, lengths)})["w"], expected, rtol=1e-6)


def files_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def state_device(tmp_path: Path) -> Iterator[tuple[Path, Path, Filler, np.ndarray]]:
    """A state directory on a 24 MiB ext4 device: (the directory, its embtierd.toml, the device's Filler,
    a model of table w's rows, all zeros)."""
    with ext4_device(tmp_path, 24 << 20) as (device, _):
        state = device / "s"
        state.mkdir()
        config = state / "embtierd.toml"
        config.write_text(CONFIG)
        yield state, config, Filler(device / "filler"), np.zeros((ROWS, DIM), np.float32)


def test_a_full_state_device_refuses_writes_by_path_keeps_serving_and_loses_nothing(tmp_path):
    with state_device(tmp_path) as (state, config, filler, model):
        d = start_daemon(state, "--scm-bytes", "4M", config=config)
        with Client(d.target) as c:
            c.create_table("w", ROWS, DIM)
            writer = Writer(d.target, model, 0)
            writer.start()
            writer.until(lambda: writer.acked >= 20)
            writer.stop.set()
            writer.join()
            assert c.checkpoint("full").id == 1
            at_checkpoint = model.copy()
            checkpoint_files = files_digest(state / "checkpoints")

            # the device fills while the writer writes: its writes go from acknowledged to refused
            writer = Writer(d.target, model, 1000)
            writer.start()
            writer.until(lambda: writer.acked >= 10)
            filler.fill()
            writer.until(lambda: len(writer.failures) >= 5)
            writer.stop.set()
            writer.join()
            assert all(full_device_error(e, state / "wal") for e in writer.failures), writer.failures

            # full: writes and checkpoints refused, naming the path; lookups go on
            for call, path in [(lambda: c.write_rows("w", np.arange(BATCH), np.full((BATCH, DIM), -1, np.float32)),
                                state / "wal"),
                               (lambda: c.checkpoint("full"), state / "checkpoints")]:
                with pytest.raises(EmbtierClientError) as err:
                    call()
                assert full_device_error(err.value, path), err.value
            with pytest.raises(EmbtierClientError) as err:  # a table with rows on SCM: no room to reserve them
                c.create_table("big", 80_000, DIM)
            assert full_device_error(err.value, state / "scm.dat"), err.value
            assert [t.name for t in c.tables()] == ["w"]
            assert_serves(c, model)
            assert files_digest(state / "checkpoints") == checkpoint_files  # nothing left of the failed one
            assert [(k.id, k.damage) for k in c.checkpoints()] == [(1, "")]

        # a crash while the device is full: the restarted daemon serves every acknowledged write
        d.proc.kill()
        d.proc.wait(timeout=30)
        d = start_daemon(state, "--scm-bytes", "4M", config=config)
        with Client(d.target) as c:
            assert [t.name for t in c.tables()] == ["w"]
            assert_serves(c, model)
            with pytest.raises(EmbtierClientError) as err:
                c.write_rows("w", np.arange(BATCH), np.full((BATCH, DIM), -1, np.float32))
            assert full_device_error(err.value, state / "wal"), err.value

            # room again: the next write goes through, with no restart and nothing done to the daemon
            filler.remove()
            writer = Writer(d.target, model, 2000)
            writer.start()
            writer.until(lambda: writer.acked >= 10)
            writer.stop.set()
            writer.join()
            assert writer.failures == []
            assert_serves(c, model)
            assert c.checkpoint("full").id == 2

        d.proc.kill()
        d.proc.wait(timeout=30)
        d = start_daemon(state, "--scm-bytes", "4M", config=config)
        with Client(d.target) as c:
            assert_serves(c, model)
            c.restore(1)  # the checkpoint taken before the device filled is whole and restorable
            assert_serves(c, at_checkpoint)
        assert d.stop() == 0, d.log()


def test_a_record_the_full_device_cut_short_is_cut_off_before_any_later_record(tmp_path):
    """A write the device has room for only a part of: that part must go before the next record is
    appended, or a replay would stop at it and lose every record after.  Here the segment is made
    append-only (chattr +a) so that cutting it off fails as well: writes are refused until it works."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is needed")
    with state_device(tmp_path) as (state, config, filler, model):
        d = start_daemon(state, "--scm-bytes", "4M", config=config)
        with Client(d.target) as c:
            c.create_table("w", ROWS, DIM)
            c.write_rows("w", np.arange(BATCH), np.full((BATCH, DIM), 1, np.float32))
            model[:BATCH] = 1
            segment = max((state / "wal").glob("wal-*.log"))
            whole = segment.stat().st_size
            assert run("chattr", "+a", str(segment)).returncode == 0  # appends go on, truncation is refused
            filler.fill()
            os.truncate(filler.path, filler.path.stat().st_size - 8192)  # room for a part of the next record
            with pytest.raises(EmbtierClientError) as err:
                c.write_rows("w", np.arange(BATCH, 2 * BATCH), np.full((BATCH, DIM), 2, np.float32))
            assert full_device_error(err.value, state / "wal"), err.value
            torn = segment.stat().st_size
            assert torn > whole  # a part of the refused record, which cannot be cut off
            filler.remove()
            with pytest.raises(EmbtierClientError):  # room again, but a record now would follow torn bytes
                c.write_rows("w", np.arange(2 * BATCH, 3 * BATCH), np.full((BATCH, DIM), 3, np.float32))
            assert segment.stat().st_size == torn
            assert run("chattr", "-a", str(segment)).returncode == 0
            c.write_rows("w", np.arange(3 * BATCH, 4 * BATCH), np.full((BATCH, DIM), 4, np.float32))
            model[3 * BATCH:4 * BATCH] = 4
            assert_serves(c, model)
        d.proc.kill()
        d.proc.wait(timeout=30)
        d = start_daemon(state, "--scm-bytes", "4M", config=config)
        with Client(d.target) as c:
            assert_serves(c, model)  # the write acknowledged after the torn record came back with the rest
        assert "truncating the log" not in d.log(), d.log()
        assert d.stop() == 0, d.log()


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1
FIEMAP_HEAD = struct.Struct("=QQIIII")       # start, length, flags, mapped extents, extent count, reserved
FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved


def device_offsets(path: Path, offsets: np.ndarray) -> np.ndarray:
    """Where on its device each byte offset of the file at path lies (the FIEMAP ioctl); -1 where
    no extent maps it."""
    count = 64
    request = bytearray(FIEMAP_HEAD.pack(0, 2**64 - 1, FIEMAP_FLAG_SYNC, 0, count, 0) + bytes(FIEMAP_EXTENT.size * count))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, request)
    mapped = FIEMAP_HEAD.unpack_from(request)[3]
    assert mapped < count, "more extents than asked for"
    found = np.full(offsets.size, -1, np.int64)
    for k in range(mapped):
        logical, physical, length, *_ = FIEMAP_EXTENT.unpack_from(request, FIEMAP_HEAD.size + k * FIEMAP_EXTENT.size)
        inside = (offsets >= logical) & (offsets < logical + length)
        found[inside] = physical + offsets[inside] - logical
    return found


def row_values(ids: np.ndarray) -> np.ndarray:
    """What the SCM test writes to each row: values no other row has, found again in the file by content."""
    return (ids[:, None] * DIM + np.arange(DIM) + 0.5).astype(np.float32)


def rows_in_file(path: Path, rows: int) -> dict[int, int]:
    """{row: byte offset in the file} of every DIM-float slot of the file that holds row_values(row)."""
    slots = np.fromfile(path, dtype="<f4").reshape(-1, DIM)
    ids = np.floor(slots[:, 0] / DIM).astype(np.int64)
    held = (ids >= 0) & (ids < rows)
    held[held] = (slots[held] == row_values(ids[held])).all(axis=1)
    return dict(zip(ids[held].tolist(), (np.flatnonzero(held) * DIM * 4).tolist(), strict=True))


def scm_read_errors(metrics_address: str) -> dict[str, float]:
    """embtier_scm_read_errors_total by table, as the daemon's /metrics says."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return {s.labels["table"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "embtier_scm_read_errors_total"}


def test_an_scm_read_error_fails_only_the_requests_that_need_the_row_with_data_loss_and_is_counted(tmp_path):
    with ext4_device(tmp_path, 32 << 20) as (device, image):
        state = tmp_path / "s"
        state.mkdir()
        config = state / "embtierd.toml"
        config.write_text(f'[tiering]\nenabled = false\n[tiers.scm]\npath = "{device / "scm.dat"}"\n')
        d = start_daemon(state, "--dram-bytes", "64K", "--cxl-bytes", "64K", "--scm-bytes", "8M", config=config)
        with Client(d.target) as c:
            c.create_table("s", ROWS, DIM)
            model = row_values(np.arange(ROWS))
            c.write_rows("s", np.arange(ROWS), model)
            on_scm = c.describe("s").rows_by_tier["scm"]
            assert on_scm > 1000 and c.describe("s").rows_by_tier["dram"] > 0

            # the SCM rows as the file holds them, and where the device has them
            offsets = rows_in_file(device / "scm.dat", ROWS)
            assert len(offsets) == on_scm
            scm_ids = np.array(sorted(offsets))
            placed = device_offsets(device / "scm.dat", np.array([offsets[i] for i in scm_ids]))
            assert (placed >= 0).all()
            # cut the device's last tenth of them off: reads there fail with EIO from now on
            cut = int(np.quantile(placed, 0.9)) // 4096 * 4096
            lost = set(scm_ids[placed >= cut].tolist())
            kept_scm = scm_ids[placed < cut]
            served = np.setdiff1d(np.arange(ROWS), list(lost))
            assert 50 < len(lost) < on_scm // 5
            tail = image.read_bytes()[cut:]
            os.truncate(image, cut)
            try:
                bad = min(lost)
                for request in ([kept_scm[0], bad, 0], [bad] * 3, [5, bad]):
                    with pytest.raises(EmbtierClientError) as err:
                        c.lookup("s", np.array(request))
                    assert err.value.code == grpc.StatusCode.DATA_LOSS, err.value
                    assert f"table 's': the row of id {bad} " in err.value.message, err.value.message
                lengths = np.array([3, 2], np.int32)
                with pytest.raises(EmbtierClientError) as err:
                    c.lookup_pooled({"s": (np.array([0, kept_scm[1], 7, kept_scm[2], bad]), lengths)})
                assert err.value.code == grpc.StatusCode.DATA_LOSS and f"the row of id {bad} " in err.value.message

                # what does not need a lost row is served, and right
                np.testing.assert_array_equal(c.lookup("s", served), model[served])
                ids = np.random.default_rng(5).choice(served, 640)
                np.testing.assert_allclose(c.lookup_pooled({"s": (ids, np.full(20, 32, np.int32))})["s"],
                                           np.add.reduceat(model[ids], np.arange(0, 640, 32), axis=0), rtol=1e-6)
                assert scm_read_errors(d.metrics) == {"s": 4}  # one row read failed in each of the 4 requests
                # neighbours in the file on both sides of the cut are read together: the kept ones are not
                # blamed, the error names a lost one, and each lost one is counted once
                by_file = sorted(offsets, key=offsets.get)
                edge = next(k for k, i in enumerate(by_file) if i in lost)  # the first lost row in the file
                around = np.array(by_file[edge - 12:edge + 3])
                around_lost = set(around.tolist()) & lost
                assert 0 < len(around_lost) < around.size
                with pytest.raises(EmbtierClientError) as err:
                    c.lookup("s", np.concatenate([around, around[::-1]]))
                assert err.value.code == grpc.StatusCode.DATA_LOSS, err.value
                assert int(err.value.message.split("the row of id ")[1].split()[0]) in around_lost, err.value.message
                assert scm_read_errors(d.metrics) == {"s": 4 + len(around_lost)}
                with pytest.raises(EmbtierClientError) as err:  # a checkpoint reads every row: none is published
                    c.checkpoint("full")
                assert err.value.code == grpc.StatusCode.DATA_LOSS and "table 's': the row of id " in err.value.message
                assert int(err.value.message.split("the row of id ")[1].split()[0]) in lost, err.value.message
                assert c.checkpoints() == [] and scm_read_errors(d.metrics)["s"] > 4
            finally:
                with open(image, "r+b") as f:
                    f.seek(cut)
                    f.write(tail)
                    os.fsync(f.fileno())
            # the device answers again: so does every row, with no restart
            np.testing.assert_array_equal(c.lookup("s", np.arange(ROWS)), model)
            assert c.checkpoint("full").rows_written == ROWS
        assert d.stop() == 0, d.log()


def test_a_failed_log_fdatasync_refuses_writes_stops_the_daemon_and_the_restart_replays_what_was_acknowledged(
        tmp_path):
    """The state device's own disk fails under it: its image lies on a small tmpfs that is then filled,
    so ext4 still takes writes into the page cache but writing them back fails, and the log's
    fdatasync with them.  Linux may drop pages it could not write and call the next fdatasync clean,
    so the daemon acknowledges nothing from then on: the write is UNAVAILABLE, the daemon exits 70 for
    its service manager to restart it, and the restart (the disk healed) replays the log: the table
    holds every write acknowledged before the disk failed and then a prefix of the later ones, and
    none of the writes refused.
    (Only a prefix: on this bed the kernel has reported the first write-back that failed as a clean
    fdatasync, as an unwritten page on a failing disk can be, and the write it acknowledged was not
    on the disk; what the daemon controls is that nothing after the first failure is acknowledged.)"""
    backing = tmp_path / "backing"
    backing.mkdir()
    done = run("mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(backing))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        history = [np.zeros((ROWS, DIM), np.float32)]  # the table after each acknowledged write
        refused: list[tuple[np.ndarray, int]] = []
        config = tmp_path / "embtierd.toml"  # off the device: only what is fsynced is sure to reach it
        config.write_text(CONFIG)
        with ext4_device(tmp_path, 64 << 20, image_dir=backing, direct_io=False, journal=False) as (device, _):
            d = start_daemon(device / "s", config=config)
            rng = np.random.default_rng(11)

            def write(c: Client, value: int) -> None:
                ids = rng.choice(ROWS, BATCH, replace=False)
                try:
                    c.write_rows("w", ids, np.full((BATCH, DIM), value, np.float32))
                except EmbtierClientError as e:
                    refused.append((ids, value))
                    if len(refused) == 1:
                        assert e.code == grpc.StatusCode.UNAVAILABLE, e
                        assert "could not make its records durable" in e.message, e.message
                    return
                assert not refused, "a write was acknowledged after one was refused"
                history.append(history[-1].copy())
                history[-1][ids] = value

            with Client(d.target, retries=0) as c:  # (UNAVAILABLE is retried by default: the restart takes it)
                c.create_table("w", ROWS, DIM)
                for value in range(1, 6):
                    write(c, value)
                durable = len(history) - 1
                Filler(backing / "filler").fill()  # the disk under the device: full from here on
                for value in range(6, 400):
                    write(c, value)
                    if d.proc.poll() is not None:
                        break
            assert refused, "the writes never reached the failing disk"
            assert d.proc.wait(timeout=60) == 70, d.log()
            assert "could not make its records durable" in d.log()
            # the segment is cut back to its last durable record, or it says why not (here the failing
            # disk refuses the cut's own fdatasync too; test_wal.py shows the cut where it can be made)
            assert "the records after it were never acknowledged" in d.log() or "could not cut the records" in d.log()
        (backing / "filler").unlink()  # the disk heals
        with ext4_device(tmp_path, 64 << 20, image_dir=backing, direct_io=False, fresh=False) as (device, _):
            d = start_daemon(device / "s", config=config)
            with Client(d.target) as c:
                got = c.lookup("w", np.arange(ROWS))
            assert d.stop() == 0, d.log()
        matches = [k for k, state in enumerate(history) if np.array_equal(got, state)]
        assert matches and matches[-1] >= durable, (matches, durable, len(history))
        for _, value in refused:  # the write whose fdatasync failed included: its record was cut off
            assert not (got == value).all(axis=1).any(), value
    finally:
        run("umount", "-l", str(backing))
