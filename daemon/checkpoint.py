"""Full checkpoints of the store, and restoring the newest good one at start.

A checkpoint is a directory ckpt-<id> under <state_dir>/checkpoints holding
manifest.json (format version, id, the write-ahead log LSN it covers, each
table's shape and tiering settings, and the SHA-256 of each data file) and
one data file per table: its rows exactly as stored (so a restore is bit for
bit).  It is taken from a consistent snapshot (Store.frozen: writes, moves,
creations and drops wait while the rows are copied; lookups go on), written
to a .tmp directory, fsynced, renamed into place and the parent fsynced:
a crash leaves either the whole checkpoint or none.  Once it is published,
checkpoints beyond the newest `keep` are removed, and the log segments
older than the oldest one kept are deleted (so that a damaged newest
checkpoint still leaves the previous one plus the log after it).

At start the newest checkpoint whose manifest and data files check out is
loaded (a damaged one is reported and the previous one used), then the log
records after its LSN are replayed.

This is the full, exact kind; incremental and quantized checkpoints
(Check-N-Run) are to come on the same format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StorageError
from .tiering_config import TablePolicy
from .wal import fsync_directory

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    id: int
    lsn: int
    rows_written: int
    bytes_written: int
    duration_seconds: float
    path: Path


def _ids(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.glob("ckpt-*") if p.name[5:].isdigit() and p.is_dir())


def _write_file(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def take(store, wal, root: Path, keep: int = 2) -> CheckpointInfo:
    """Writes a full checkpoint of every table; returns what it wrote."""
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with store.frozen() as names:
        wal.roll()  # the records after the checkpoint start a segment: the log can later be cut right here
        lsn = wal.last_lsn
        specs = [store.spec(name) for name in names]
        tables = [(spec, store.read_encoded(spec["name"], np.arange(spec["num_rows"]))) for spec in specs]
    checkpoint_id = (_ids(root) or [0])[-1] + 1
    final = root / f"ckpt-{checkpoint_id:08d}"
    tmp = root / f"ckpt-{checkpoint_id:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {"format_version": FORMAT_VERSION, "id": checkpoint_id, "lsn": lsn, "kind": "FULL", "tables": []}
    written = rows = 0
    for i, (spec, data) in enumerate(tables):
        file = f"table-{i:04d}.rows"
        digest = _write_file(tmp / file, data.tobytes())
        manifest["tables"].append({**spec, "file": file, "sha256": digest, "stride": int(data.shape[1])})
        written += data.nbytes
        rows += data.shape[0]
    _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    fsync_directory(tmp)
    os.rename(tmp, final)
    fsync_directory(root)
    for old in _ids(root)[:-keep]:
        shutil.rmtree(root / f"ckpt-{old:08d}", ignore_errors=True)
    # the log is kept back to the oldest checkpoint kept: if the newest turns out damaged, the one
    # before it plus the log after it still give every acknowledged write
    oldest = json.loads((root / f"ckpt-{_ids(root)[0]:08d}" / "manifest.json").read_bytes())["lsn"]
    wal.sync()
    wal.truncate_before(oldest + 1)
    info = CheckpointInfo(checkpoint_id, lsn, rows, written, time.perf_counter() - start, final)
    log.info("checkpoint %d: %d tables, %d rows, %d bytes, up to LSN %d, in %.2f s", checkpoint_id,
             len(tables), rows, written, lsn, info.duration_seconds)
    return info


def _load_manifest(path: Path) -> dict:
    """The checkpoint's manifest, after checking every data file's SHA-256 (StorageError if not)."""
    try:
        manifest = json.loads((path / "manifest.json").read_bytes())
    except (OSError, ValueError) as e:
        raise StorageError(f"checkpoint {path}: unreadable manifest: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StorageError(f"checkpoint {path}: format version {manifest.get('format_version')!r}, "
                           f"this daemon reads {FORMAT_VERSION}")
    for table in manifest["tables"]:
        if _sha256(path / table["file"]) != table["sha256"]:
            raise StorageError(f"checkpoint {path}: {table['file']} (table {table['name']!r}) fails its checksum")
    return manifest


def _sha256(path: Path) -> str | None:
    """The file's SHA-256, read in 16 MiB pieces (every file is checked before any table is loaded, so
    a damaged checkpoint is refused whole, without holding all of it in memory); None if unreadable."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while piece := f.read(16 << 20):
                digest.update(piece)
    except OSError:
        return None
    return digest.hexdigest()


def restore_newest(store, root: Path) -> int:
    """Loads the newest good checkpoint into the (empty) store; returns its LSN (0 when there is none).
    Unfinished checkpoints (.tmp directories a crash left) are removed."""
    for unfinished in root.glob("ckpt-*.tmp"):
        log.warning("removing unfinished checkpoint %s", unfinished)
        shutil.rmtree(unfinished, ignore_errors=True)
    for checkpoint_id in reversed(_ids(root)):
        path = root / f"ckpt-{checkpoint_id:08d}"
        try:
            manifest = _load_manifest(path)
        except StorageError as e:
            log.error("%s; trying the previous checkpoint", e)
            continue
        for table in manifest["tables"]:
            store.create_table(table["name"], table["num_rows"], table["dim"], table["dtype"],
                               policy=TablePolicy.from_dict(table))
            data = np.frombuffer((path / table["file"]).read_bytes(), dtype=np.uint8)
            store.load_encoded(table["name"], data.reshape(table["num_rows"], table["stride"]))
        log.info("restored checkpoint %d (%d tables, up to LSN %d) from %s", checkpoint_id,
                 len(manifest["tables"]), manifest["lsn"], path)
        return int(manifest["lsn"])
    return 0
