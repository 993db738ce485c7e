"""Start-up of the durable state: the write-ahead log opened, the newest good
checkpoint loaded and the log after it replayed into the (empty) store, then
the journal attached so that every change from here on is logged.

The rules are journal.py's (one order for the log and the store, table
generations) and checkpoint.py's (which checkpoint, what retention keeps).
When nothing can rebuild a table, start-up stops with a RecoveryError that
says which files and tables and what to do; with salvage it goes on with
every table that is intact, skips the log records that no longer apply,
lists all that is lost, and publishes a full checkpoint of what it has, so
that the next start is a plain one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from embtierd.config import DurabilityConfig
from embtierd.durability import journal
from embtierd.durability.checkpoint import Checkpointer
from embtierd.durability.wal import WriteAheadLog
from embtierd.errors import EmbtierError, RecoveryError

log = logging.getLogger(__name__)


@dataclass
class Durable:
    """The open log and checkpointer of a recovered store, and what recovery did."""

    wal: WriteAheadLog
    checkpoints: Checkpointer
    replayed: journal.ReplayReport
    covered_lsn: int                                # the checkpoint loaded holds the records up to this one
    lost: list[str] = field(default_factory=list)   # (salvage) what could not be recovered, each with why
    seconds: float = 0.0


def open_durable(store, state_dir: Path, settings: DurabilityConfig, metrics=None, salvage: bool = False,
                 segment_bytes: int = 64 << 20) -> Durable:
    """Recovers the store from state_dir/checkpoints and state_dir/wal and starts logging its changes."""
    start = time.perf_counter()
    wal = WriteAheadLog(state_dir / "wal", settings.fsync, settings.fsync_interval_seconds, segment_bytes,
                        on_fsync=metrics.wal_fsync if metrics is not None else None)
    try:
        checkpoints = Checkpointer(store, wal, state_dir / "checkpoints", settings.checkpoints, metrics)
        try:
            recovered = checkpoints.recover()
        except RecoveryError as e:
            if not salvage:
                raise
            log.error("salvage: %s", e)
            recovered = checkpoints.salvage()
        lost = list(recovered.lost) + [f"write-ahead log records {first} to {last} cannot be read (cut behind a "
                                       f"checkpoint that cannot be used, or damaged)"
                                       for first, last in wal.missing_after(recovered.lsn)]

        def records():
            for record in wal.replay():
                if record.kind == journal.RESTORE:  # (retention keeps its checkpoint while the log holds it)
                    checkpoints.note_restore(record.lsn, journal.decode_restore(record.payload))
                if record.lsn > recovered.lsn:
                    yield record

        report = journal.replay(store, records(), checkpoints.replay_restore, salvage)
        lost += report.skipped
        store.journal = journal.Journal(wal)
        if wal.last_lsn < recovered.lsn:  # a log younger than the checkpoint (its directory was replaced):
            checkpoints.take("full", 0)   # renumber, or later records would be skipped
        if lost:
            _salvaged(checkpoints, lost)
    except BaseException:
        wal.close()
        raise
    seconds = time.perf_counter() - start
    if metrics is not None:
        metrics.restored(seconds)
        metrics.watch_wal(wal)
    return Durable(wal, checkpoints, report, recovered.lsn, lost, seconds)


def _salvaged(checkpoints: Checkpointer, lost: list[str]) -> None:
    """Lists what salvage lost and makes what it kept the state the next start begins from."""
    log.error("salvage: started without what follows (%d item(s)):\n  %s", len(lost), "\n  ".join(lost))
    try:
        info = checkpoints.take("full", 0)
        log.warning("salvage: published full checkpoint %d of the tables kept", info.id)
    except EmbtierError as e:
        log.error("salvage: the full checkpoint of what was kept failed (%s): the next start salvages again", e)
