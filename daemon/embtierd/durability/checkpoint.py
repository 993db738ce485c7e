"""Checkpoints (the Check-N-Run policies), their chains and retention, and
restoring them; the format on disk is daemon/checkpoint_format.py.

Kinds.  FULL writes every row.  INCREMENTAL writes the rows changed since
the last checkpoint (its parent), DIFFERENTIAL those changed since the last
full one (its parent): Check-N-Run's consecutive incremental and one-shot
differential.  "auto" is its intermittent differential: a differential,
unless the bytes written since the last full plus this one would pass
auto_full_ratio times a full checkpoint's, and then a full.  A checkpoint's
chain is itself and its parents down to a full: restoring applies them
oldest first.  Changed rows come from the kernels' dirty bitmap (set by
every row write, taken and cleared here) folded into two bitmaps per table
kept here: since the last checkpoint and since the last full; they are
cleared only once a checkpoint is published, so a failed one loses none.

Quantization (quant_bits 8, 4, 3 or 2; 0 = exact): each row is stored as
codes plus its own range (asymmetric, per row), "minmax" or "adaptive"
(the range shrunk greedily where that cuts the row's L2 error).

Consistency.  Rows are copied from a consistent snapshot (Store.frozen:
writes, moves, creations and drops wait for the copy of the changed rows;
lookups go on), then quantized and written while serving and writing go
on.  One checkpoint at a time.  The write-ahead log rolls to a new segment
at the snapshot, whose LSN the manifest records.

Recovery.  At start the newest checkpoint whose chain is exact (every layer
unquantized) and checks out is loaded, then the log after its LSN is
replayed, so nothing acknowledged is lost; a damaged checkpoint is reported
and the previous one tried, and when none is left the log alone rebuilds
the tables if it reaches back to its first record.  Quantized checkpoints
are restored only on request (RestoreCheckpoint): they are lossy by design.
When nothing can rebuild a table, start-up stops with a RecoveryError that
names the files and tables; `embtierd --salvage` then starts with every
table that is intact and lists what is lost (salvage()).

Retention keeps the newest `keep` checkpoints and the newest `keep` exact
ones, with every checkpoint their chains need, and the fallback: the
newest exact checkpoint whose chain shares no checkpoint with the newest
exact one's.  The log is kept back to the fallback (back to its start while
there is none), so any one damaged checkpoint file still leaves a
checkpoint plus the log that rebuild every acknowledged write.  Checkpoints
known to be damaged (a failed verification) count for neither.

Restoring on request replaces every table by the checkpoint's (tables
created since are dropped): a RESTORE record naming the checkpoint is
logged, the tables are installed (their generation is the record's LSN),
then a full exact checkpoint of the result is published before writes
resume, so a crash afterwards comes back to it (and if that checkpoint is
lost, the fallback plus the log, whose RESTORE record installs the same
checkpoint again: retention keeps the chain of every checkpoint a RESTORE
record in the kept log names).  Writes, creations and drops wait meanwhile,
then go to the restored tables; lookups of a table being replaced fail (the
table is gone) until its restored rows are in place.  The saved heat
(access counters) comes back with the rows, so the tiering engine puts the
hot rows back in the fast tiers at once.

Listing verifies: each checkpoint's files are checked against their
SHA-256 once, and again whenever one of them changed on disk (size, times,
inode), so a damaged one is listed with why, never as an exact chain.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from embtier.wire import CHECKPOINT_KINDS, QUANT_BITS, QUANTIZERS

from embtierd import native
from embtierd.config import CheckpointConfig
from embtierd.durability import checkpoint_format as fmt
from embtierd.errors import (
    CorruptCheckpointError,
    EmbtierError,
    InvalidArgumentError,
    NotFoundError,
    RecoveryError,
    storage_error,
)
from embtierd.keys.space import rows_inside

log = logging.getLogger(__name__)

ALL_BITS = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class CheckpointInfo:
    id: int
    parent_id: int            # 0 for a full checkpoint
    base_id: int              # the full checkpoint its chain starts from
    kind: str                 # what was written: full, incremental or differential
    quant_bits: int           # 0 = exact
    quantizer: str            # "exact", "minmax", "adaptive"
    lsn: int                  # write-ahead log records up to this one are in it
    rows_written: int
    bytes_written: int
    created_unix_seconds: float
    tables: tuple[str, ...]
    exact_chain: bool         # every checkpoint of its chain exact and intact: usable for recovery
    duration_seconds: float = 0.0
    snapshot_seconds: float = 0.0  # how long writes waited for the snapshot
    damage: str = ""          # why its chain cannot be restored ("" when every file checks out)


def info_of(root: Path, manifest: dict, damage: str = "") -> CheckpointInfo:
    """A checkpoint's info from its manifest (durations 0 for manifests from before they were recorded)."""
    return CheckpointInfo(
        id=manifest["id"], parent_id=manifest["parent_id"], base_id=manifest["base_id"], kind=manifest["kind"],
        quant_bits=manifest["quant_bits"], quantizer=manifest["quantizer"], lsn=manifest["lsn"],
        rows_written=manifest["rows_written"], bytes_written=fmt.size_bytes(root, manifest),
        created_unix_seconds=manifest["created_unix_seconds"], tables=tuple(t["name"] for t in manifest["tables"]),
        exact_chain=manifest["exact_chain"] and not damage,
        duration_seconds=manifest.get("duration_seconds", 0.0), snapshot_seconds=manifest.get("snapshot_seconds", 0.0),
        damage=damage)


@dataclass
class Recovered:
    """What recover() or salvage() loaded: the LSN the log is replayed after, and (salvage) what is lost."""

    lsn: int
    lost: list[str] = field(default_factory=list)


def _words(num_rows: int) -> np.ndarray:
    return np.zeros((num_rows + 63) // 64, dtype=np.uint64)


def _rows_of(words: np.ndarray, num_rows: int) -> np.ndarray:
    """The ids whose bit is set, ascending (int64)."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=num_rows)
    return np.flatnonzero(bits).astype(np.int64)


def _words_of(ids: np.ndarray, num_rows: int) -> np.ndarray:
    bits = np.zeros(((num_rows + 63) // 64) * 64, dtype=np.uint8)
    bits[ids] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def _popcount(words: np.ndarray) -> int:
    return int(np.unpackbits(words.view(np.uint8)).sum(dtype=np.int64))


@dataclass
class _Changed:
    """One table's rows changed since the last checkpoint and since the last full one (bitmaps)."""

    since_checkpoint: np.ndarray
    since_full: np.ndarray


class Checkpointer:
    """Takes, lists and restores the checkpoints under root for a store and its write-ahead log."""

    def __init__(self, store, wal, root: Path, settings: CheckpointConfig, metrics=None):
        self.store, self.wal, self.root, self.settings, self.metrics = store, wal, root, settings, metrics
        self._lock = threading.Lock()  # one checkpoint or restore at a time; guards the state below
        self._last = 0                 # the checkpoint the store's state continues from (0: none)
        self._full = 0                 # the full checkpoint of its chain
        self._since_full_bytes = 0     # bytes written by checkpoints since that full one
        self._changed: dict[int, _Changed] = {}  # by table serial
        self._restore_sources: list[tuple[int, int]] = []  # (lsn, checkpoint) of the RESTORE records in the log
        self._verdicts: dict[int, tuple[tuple, str]] = {}  # checkpoint -> (files' stamp, "" or why it is damaged)
        self._verdict_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_fatal = lambda: None   # called when the store no longer matches any durable state

    # ---- start -----------------------------------------------------------------

    def recover(self) -> Recovered:
        """Loads the newest good exact checkpoint chain that the log continues (it holds every
        record after the checkpoint's) into the (empty) store; Recovered(0) when there is none and
        the log holds every record from its first.  RecoveryError when neither rebuilds every
        table.  Unfinished checkpoint directories are removed."""
        with self._lock:
            for path in fmt.remove_unfinished(self.root):
                log.warning("removed unfinished checkpoint %s", path)
            failures = []
            for checkpoint_id in reversed(fmt.list_ids(self.root)):
                try:
                    head = fmt.read_manifest(self.root, checkpoint_id)
                    if not head["exact_chain"]:
                        log.info("checkpoint %d is quantized: recovery uses an exact one", checkpoint_id)
                        continue
                    if not self.wal.continues(head["lsn"]):
                        log.info("checkpoint %d covers records up to %d; the log does not continue it (it holds %s)",
                                 checkpoint_id, head["lsn"], self.wal.describe())
                        continue
                    chain = self._verified_chain(checkpoint_id)
                except CorruptCheckpointError as e:
                    log.error("%s; trying the previous checkpoint", e)
                    failures.append(str(e))
                    continue
                start = time.perf_counter()
                with self.store.frozen():
                    self.store.install(self._restored_tables(chain))
                self._continue_from(chain)
                log.info("restored checkpoint %d (chain %s, %d tables, up to LSN %d) in %.2f s", checkpoint_id,
                         [m["id"] for m in chain], len(head["tables"]), head["lsn"], time.perf_counter() - start)
                return Recovered(int(head["lsn"]))
            if self.wal.continues(0):
                if failures:
                    log.warning("no checkpoint could be used: the write-ahead log, which holds every record from "
                                "its first, rebuilds every table")
                return Recovered(0)
            raise RecoveryError(
                f"the tables cannot be rebuilt: {'; '.join(failures) or 'no checkpoint continues the log'}; the "
                f"write-ahead log holds {self.wal.describe()}, so what the missing records held is only in those "
                f"checkpoints. Put the damaged files back from a backup, or start with `embtierd --salvage` to "
                f"serve every table that is intact (the tables named above lose what only those files held)")

    def salvage(self) -> Recovered:
        """recover() for `embtierd --salvage`: the newest exact checkpoint whose manifests can be read,
        each of its tables loaded if its files check out and listed as lost if not (Recovered(0)
        with nothing loaded when no checkpoint can be read); the next checkpoint is a full one."""
        with self._lock:
            for checkpoint_id in reversed(fmt.list_ids(self.root)):
                try:
                    head = fmt.read_manifest(self.root, checkpoint_id)
                    if not head["exact_chain"]:
                        continue
                    chain = self._chain(checkpoint_id)
                except CorruptCheckpointError as e:
                    log.error("salvage: %s", e)
                    continue
                intact, lost = [], []
                for entry in head["tables"]:
                    try:
                        for manifest, layer in _layers(chain, entry):
                            fmt.verify_entry(self.root, manifest, layer)
                        intact.append(entry)
                    except CorruptCheckpointError as e:
                        lost.append(f"table {entry['name']!r}: {e}")
                stride = {e["name"]: native.row_stride(e["dim"], e["dtype"]) for e in intact}
                with self.store.frozen():
                    self.store.install([(e, self._batches(_layers(chain, e), stride[e["name"]]),
                                         fmt.read_heat(self.root, chain[-1], e), self._keys(_layers(chain, e)))
                                        for e in intact])
                log.warning("salvage: loaded checkpoint %d (up to record %d): %d of %d table(s) intact",
                            checkpoint_id, head["lsn"], len(intact), len(head["tables"]))
                return Recovered(int(head["lsn"]), lost)
            return Recovered(0, ["no exact checkpoint could be read: only the write-ahead log is replayed"])

    def note_restore(self, lsn: int, checkpoint_id: int) -> None:
        """A RESTORE record in the log (met at start): retention keeps the checkpoint's chain while
        the log holds the record."""
        self._restore_sources.append((lsn, checkpoint_id))

    def replay_restore(self, checkpoint_id: int, lsn: int) -> None:
        """Applies a RESTORE record at start: checkpoint checkpoint_id's tables replace the store's, as
        generation lsn.  The next checkpoint is a full one (the change bitmaps do not cover it)."""
        with self._lock:
            if checkpoint_id not in fmt.list_ids(self.root):
                raise CorruptCheckpointError(f"checkpoint {checkpoint_id}, which it restores, is gone")
            chain = self._verified_chain(checkpoint_id)
            with self.store.frozen():
                self.store.install(self._restored_tables(chain), generation=lsn)
            self._restart_chain()

    # ---- taking ------------------------------------------------------------------

    def take(self, kind: str | None = None, quant_bits: int | None = None, quantizer: str | None = None,
             tables: list[str] | None = None) -> CheckpointInfo:
        """Writes a checkpoint of every table (kind, quant_bits, quantizer default to the configured ones)."""
        kind = self.settings.kind if kind is None else kind
        quant_bits = self.settings.quant_bits if quant_bits is None else quant_bits
        quantizer = self.settings.quantizer if quantizer is None else quantizer
        check_request(kind, quant_bits, quantizer)
        with self._lock:
            start = time.perf_counter()
            with self.store.frozen() as names:
                _check_tables(tables, names)
                changed = {name: self._fold(name) for name in names}
                kind = self._choose(kind, quant_bits, changed)
                self.wal.roll()  # the records after the snapshot start a segment: the log can later be cut here
                lsn = self.wal.last_lsn
                snapshot = [self._rows(name, kind, changed[name]) for name in names]
            held = time.perf_counter() - start
            parent = {"full": 0, "incremental": self._last, "differential": self._full}[kind]
            manifest = self._write(snapshot, kind, parent, lsn, quant_bits, quantizer, started=start,
                                   snapshot_seconds=held)
            self._published(manifest, changed)
            info = info_of(self.root, manifest)
            self._retain()
        if self.metrics is not None:
            self.metrics.checkpointed(info)
        log.info("checkpoint %d: %s%s, %d tables, %d rows, %d bytes, up to LSN %d, in %.2f s (writes held %.3f s)",
                 info.id, kind, f" {quant_bits}-bit {quantizer}" if quant_bits else " exact", len(names),
                 info.rows_written, info.bytes_written, lsn, info.duration_seconds, held)
        return info

    def _fold(self, name: str) -> _Changed:
        """The table's change bitmaps with the kernels' dirty bits folded in (which clears those)."""
        serial = self.store.serial(name)
        num_rows = rows_inside(self.store.spec(name))
        changed = self._changed.get(serial)
        if changed is None:  # created since the last checkpoint: its creation marked every row
            changed = self._changed[serial] = _Changed(_words(num_rows), _words(num_rows))
        dirty = self.store.take_dirty(name)
        changed.since_checkpoint |= dirty
        changed.since_full |= dirty
        return changed

    def _choose(self, kind: str, quant_bits: int, changed: dict[str, _Changed]) -> str:
        if kind == "full" or not self._full:
            return "full"
        if kind == "incremental":
            return "incremental"
        if kind == "differential":
            return "differential"
        full = differential = 0
        for name, bitmaps in changed.items():
            spec = self.store.spec(name)
            row = _row_bytes(spec, quant_bits)
            full += rows_inside(spec) * row
            differential += _popcount(bitmaps.since_full) * (row + 4)
        limit = self.settings.auto_full_ratio * full
        # a new full checkpoint also lets retention cut the log (kept back to the last chain's newest)
        over = self._since_full_bytes + differential > limit or self.wal.size_bytes > limit
        return "full" if over else "differential"

    def _rows(self, name: str, kind: str, changed: _Changed) -> fmt.TableRows:
        spec = self.store.spec(name)
        num_rows = rows_inside(spec)
        if kind == "full":
            ids = np.arange(num_rows, dtype=np.int64)
        else:
            ids = _rows_of(changed.since_checkpoint if kind == "incremental" else changed.since_full, num_rows)
        live, keys = self.store.keys_of(name)  # (a view: the store is frozen while it is read)
        if keys is not None:  # the id of each row written (0 for the default row and rows no id holds)
            held = ids < live
            keys = np.where(held, keys[np.where(held, ids, 0)] if live else 0, 0)
        return fmt.TableRows(spec, ids.size == num_rows, ids, self.store.read_encoded(name, ids),
                             self.store.heat(name).copy(), live, keys, self.store.mapping_of(name))

    def _write(self, snapshot: list[fmt.TableRows], kind: str, parent: int, lsn: int, quant_bits: int,
               quantizer: str, started: float | None = None, **extra) -> dict:
        """Writes and publishes a checkpoint; its manifest records extra, and, with started (perf_counter
        when the checkpoint began), its duration up to the publication."""
        ids = fmt.list_ids(self.root)
        checkpoint_id = (ids[-1] if ids else 0) + 1
        try:  # (its directory: on a full device even that can fail)
            writer = fmt.Writer(self.root, checkpoint_id, quant_bits, quantizer)
        except OSError as e:
            raise storage_error(e, self.root, f"writing checkpoint {checkpoint_id}") from e
        try:
            for table in snapshot:
                writer.add(table)
            exact = quant_bits == 0 and (kind == "full" or self._exact_chain(parent))
            since_full = 0 if kind == "full" else self._since_full_bytes + writer.bytes_written
            manifest = writer.publish({"kind": kind, "parent_id": parent,
                                       "base_id": self._full if parent else writer.id, "lsn": lsn,
                                       "exact_chain": exact, "created_unix_seconds": time.time(),
                                       "since_full_bytes": since_full, **extra,
                                       **({} if started is None else
                                          {"duration_seconds": time.perf_counter() - started})})
            with self._verdict_lock:  # (its checksums were taken as it was written)
                self._verdicts[manifest["id"]] = (fmt.stamp(self.root, manifest), "")
            return manifest
        except OSError as e:
            writer.abandon()
            raise storage_error(e, self.root, f"writing checkpoint {writer.id}") from e
        except BaseException:
            writer.abandon()
            raise

    def _exact_chain(self, checkpoint_id: int) -> bool:
        try:
            return bool(fmt.read_manifest(self.root, checkpoint_id)["exact_chain"])
        except CorruptCheckpointError:
            return False

    def _published(self, manifest: dict, changed: dict[str, _Changed]) -> None:
        """The state after publishing manifest: the rows it holds are no longer changed."""
        full = manifest["kind"] == "full"
        for bitmaps in changed.values():
            bitmaps.since_checkpoint[:] = 0
            if full:
                bitmaps.since_full[:] = 0
        live = {id(c) for c in changed.values()}  # (tables dropped since are forgotten)
        self._changed = {serial: c for serial, c in self._changed.items() if id(c) in live}
        self._last = manifest["id"]
        if full:
            self._full = manifest["id"]
        self._since_full_bytes = manifest["since_full_bytes"]

    def _retain(self) -> None:
        """Removes checkpoints nothing needs; cuts the log back to the fallback (module docstring)."""
        manifests = self._manifests()
        keep = self.settings.keep
        damaged = {i for i in manifests if self._known_damage(i, manifests)}
        usable = [i for i in manifests if i not in damaged]
        exact = [i for i in usable if manifests[i]["exact_chain"]]
        heads = set(usable[-keep:]) | set(exact[-keep:])
        fallback = None
        if exact:
            newest = _chain_ids(exact[-1], manifests)
            fallback = next((i for i in reversed(exact) if not _chain_ids(i, manifests) & newest), None)
        if fallback is not None:
            heads.add(fallback)
        cut = manifests[fallback]["lsn"] + 1 if fallback is not None else None
        self._restore_sources = [(lsn, c) for lsn, c in self._restore_sources if cut is None or lsn >= cut]
        heads |= {c for _, c in self._restore_sources if c in manifests}
        needed = set().union(*(_chain_ids(head, manifests) for head in heads)) if heads else set()
        for checkpoint_id in fmt.list_ids(self.root):
            if checkpoint_id not in needed and checkpoint_id != self._last:
                fmt.remove(self.root, checkpoint_id)
                log.info("removed checkpoint %d (retention: %d newest, %d newest exact, the fallback %s%s)",
                         checkpoint_id, keep, keep, fallback, ", damaged" if checkpoint_id in damaged else "")
        if cut is not None:
            # if the newest exact checkpoint turns out damaged, the fallback plus the log after it
            # still give every acknowledged write
            self.wal.sync()
            self.wal.truncate_before(cut)

    def _manifests(self) -> dict[int, dict]:
        """The readable manifests, by id (ascending)."""
        manifests = {}
        for checkpoint_id in fmt.list_ids(self.root):
            try:
                manifests[checkpoint_id] = fmt.read_manifest(self.root, checkpoint_id)
            except CorruptCheckpointError as e:
                log.warning("%s", e)
        return manifests

    def _known_damage(self, checkpoint_id: int, manifests: dict[int, dict]) -> str:
        """Why the chain of checkpoint_id is known not to restore ("" when no check failed so far)."""
        node = checkpoint_id
        while True:
            manifest = manifests.get(node)
            if manifest is None:
                return f"checkpoint {checkpoint_id} needs checkpoint {node}, which is gone or unreadable"
            with self._verdict_lock:
                verdict = self._verdicts.get(node, ((), ""))[1]
            if verdict:
                return verdict
            if manifest["kind"] == "full":
                return ""
            node = manifest["parent_id"]

    def _verdict(self, manifest: dict) -> str:
        """"" when the checkpoint's data files match their checksums, else why not; read again only
        when a file changed since it was last checked."""
        stamp = fmt.stamp(self.root, manifest)
        with self._verdict_lock:
            cached = self._verdicts.get(manifest["id"])
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            fmt.verify(self.root, manifest)
            verdict = ""
        except CorruptCheckpointError as e:
            verdict = str(e)
        with self._verdict_lock:
            self._verdicts[manifest["id"]] = (stamp, verdict)
        return verdict

    # ---- listing and restoring ----------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Published checkpoints, oldest first, each verified (see the module docstring); those whose
        manifest cannot be read are left out."""
        manifests = self._manifests()
        out = []
        for checkpoint_id, manifest in manifests.items():
            try:
                for node in sorted(_chain_ids(checkpoint_id, manifests)):
                    self._verdict(manifests[node])
                damage = self._known_damage(checkpoint_id, manifests)
                out.append(info_of(self.root, manifest, damage=damage))
            except (KeyError, OSError) as e:  # (removed by retention meanwhile)
                log.info("checkpoint %d left out of the list: %s", checkpoint_id, e)
        return out

    def restore(self, checkpoint_id: int) -> tuple[CheckpointInfo, CheckpointInfo | None]:
        """Replaces every table by checkpoint checkpoint_id's; returns (it, the full exact checkpoint
        published of the result, None when that could not be written: the restore stands, the log
        holds it).  Refused before anything changes when the chain fails its checks, the tiers
        cannot hold the tables or the RESTORE record cannot be logged."""
        with self._lock:
            start = time.perf_counter()
            if checkpoint_id not in fmt.list_ids(self.root):
                raise NotFoundError(f"id: checkpoint {checkpoint_id} does not exist (see ListCheckpoints)")
            chain = self._verified_chain(checkpoint_id)
            tables = self._restored_tables(chain)
            self.store.check_install([spec for spec, *_ in tables])
            with self.store.frozen(), contextlib.ExitStack() as held:
                lsn = self.store.journal.log_restore(checkpoint_id)
                self._restore_sources.append((lsn, checkpoint_id))
                try:
                    names = self.store.install(tables, held, generation=lsn)
                except Exception:
                    log.critical("restoring checkpoint %d failed after the old tables were dropped: the store "
                                 "matches no durable state; stopping (a restart replays the restore from the "
                                 "log)", checkpoint_id)
                    self.on_fatal()
                    raise
                self.store.journal.wait(lsn)
                try:
                    self.wal.roll()  # (so that the log can be cut right after the RESTORE record)
                except EmbtierError as e:
                    log.warning("%s", e)
                snapshot = (self._rows(name, "full", None) for name in names)
                try:
                    manifest = self._write(snapshot, "full", 0, lsn, 0, "exact", started=start,
                                           restored_from=checkpoint_id)
                except EmbtierError as e:
                    log.error("restored checkpoint %d, but its full checkpoint could not be published (%s): the "
                              "restore stands (the write-ahead log holds it), the next checkpoint is full", 
                              checkpoint_id, e)
                    manifest = None
            if manifest is None:
                self._restart_chain()
            else:
                self._published(manifest, {})  # (install cleared the new tables' dirty bits)
            self._retain()
            restored = info_of(self.root, chain[-1])
            saved = info_of(self.root, manifest) if manifest else None
        log.info("restored checkpoint %d into %d table(s)%s in %.2f s", checkpoint_id, len(names),
                 f"; published it as full checkpoint {saved.id}" if saved else "", time.perf_counter() - start)
        return restored, saved

    def _restart_chain(self) -> None:
        """After tables were replaced outside a checkpoint: the next checkpoint is a full one."""
        self._last = self._full = 0
        self._since_full_bytes = 0
        self._changed = {}

    def materialize(self, checkpoint_id: int) -> dict[str, np.ndarray]:
        """The rows a restore of checkpoint_id would install, per table ([num_rows, stride] in the
        table's storage encoding), without installing them."""
        out = {}
        with self._lock:
            for entry, batches, *_ in self._restored_tables(self._verified_chain(checkpoint_id)):
                rows = np.empty((rows_inside(entry), native.row_stride(entry["dim"], entry["dtype"])), np.uint8)
                for ids, part in batches:
                    rows[ids] = part
                out[entry["name"]] = rows
        return out

    def _verified_chain(self, checkpoint_id: int) -> list[dict]:
        """The manifests from the chain's full checkpoint up to checkpoint_id, each file verified
        (read in full; the verdict is remembered for listing and retention)."""
        chain = self._chain(checkpoint_id)
        for manifest in chain:
            stamp = fmt.stamp(self.root, manifest)
            try:
                fmt.verify(self.root, manifest)
            except CorruptCheckpointError as e:
                with self._verdict_lock:
                    self._verdicts[manifest["id"]] = (stamp, str(e))
                raise
            with self._verdict_lock:
                self._verdicts[manifest["id"]] = (stamp, "")
        return chain

    def _chain(self, checkpoint_id: int) -> list[dict]:
        """The manifests from the chain's full checkpoint up to checkpoint_id (files not verified)."""
        chain, node = [], checkpoint_id
        while True:
            if node not in fmt.list_ids(self.root):
                raise CorruptCheckpointError(f"checkpoint {chain[-1]['id']} needs checkpoint {node}, which is gone")
            manifest = fmt.read_manifest(self.root, node)
            chain.append(manifest)
            if manifest["kind"] == "full":
                return chain[::-1]
            node = manifest["parent_id"]

    def _restored_tables(self, chain: list[dict]):
        """For Store.install: per table of the chain's newest checkpoint, its spec, its rows as batches
        (the newest whole entry, then every later entry), its heat, and a managed table's keys."""
        return [(entry, self._batches(_layers(chain, entry), native.row_stride(entry["dim"], entry["dtype"])),
                 fmt.read_heat(self.root, chain[-1], entry), self._keys(_layers(chain, entry)))
                for entry in chain[-1]["tables"]]

    def _keys(self, layers) -> np.ndarray | tuple[np.ndarray, np.ndarray] | None:
        """The id of each live row of a managed table, from its layers: the whole entry's, then each
        later entry's rows over them; the newest entry says how many rows are live.  A mapped table's
        mapping (the newest entry's).  None for other tables."""
        if "mapped" in layers[-1][1]:
            return fmt.read_mapping(self.root, *layers[-1])
        if "live" not in layers[-1][1]:
            return None
        keys = np.zeros(rows_inside(layers[-1][1]), dtype=np.int64)
        for manifest, entry in layers:
            live, held = fmt.read_keys(self.root, manifest, entry)
            ids = fmt.read_ids(self.root, manifest, entry)
            below = ids < live
            keys[ids[below]] = held[below]
        return keys[:layers[-1][1]["live"]]

    def _batches(self, layers, stride: int):
        for manifest, entry in layers:
            yield fmt.read_table(self.root, manifest, entry, stride)

    def _continue_from(self, chain: list[dict]) -> None:
        """Sets the change bitmaps and chain state as they were right after chain[-1] was published."""
        head = chain[-1]
        self._last, self._full = head["id"], chain[0]["id"]
        self._since_full_bytes = head["since_full_bytes"]
        self._changed = {}
        for entry in head["tables"]:
            num_rows = rows_inside(entry)
            layers = _layers(chain, entry)
            since_full = _words(num_rows)
            if layers[0][0] is not chain[0]:  # its whole copy came after the full one: every row is new since
                since_full[:] = ALL_BITS
            for manifest, layer in layers[1:]:
                since_full |= _words_of(fmt.read_ids(self.root, manifest, layer), num_rows)
            self._changed[self.store.serial(entry["name"])] = _Changed(_words(num_rows), since_full)

    # ---- schedule -----------------------------------------------------------------

    def start(self) -> None:
        """Takes the configured checkpoint every interval_seconds (nothing when 0)."""
        if self.settings.interval_seconds <= 0:
            return

        def loop():
            while not self._stop.wait(self.settings.interval_seconds):
                try:
                    self.take()
                except Exception:
                    log.exception("scheduled checkpoint failed; the next one is tried in %.0f s",
                                  self.settings.interval_seconds)
                    if self.metrics is not None:
                        self.metrics.checkpoint_failed()

        self._thread = threading.Thread(target=loop, name="checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _layers(chain: list[dict], entry: dict) -> list[tuple[dict, dict]]:
    """The (manifest, table entry) pairs of the chain that rebuild the table of entry (a table entry
    of the chain's newest checkpoint), oldest first: its newest whole copy, then every later entry."""
    layers = []
    for manifest in reversed(chain):
        match = [e for e in manifest["tables"] if e["name"] == entry["name"]]
        if not match or any(match[0].get(k, 0) != entry.get(k, 0) for k in ("num_rows", "dim", "dtype", "generation")):
            raise CorruptCheckpointError(f"checkpoint {manifest['id']}: table {entry['name']!r} has no whole copy "
                                         f"in the chain of checkpoint {chain[-1]['id']}")
        layers.append((manifest, match[0]))
        if match[0]["whole"]:
            return layers[::-1]
    raise CorruptCheckpointError(f"table {entry['name']!r} has no whole copy in the chain of checkpoint "
                                 f"{chain[-1]['id']}")


def _chain_ids(checkpoint_id: int, manifests: dict[int, dict]) -> set[int]:
    """The checkpoints the chain of checkpoint_id consists of (as far as its manifests are there)."""
    ids, node = set(), checkpoint_id
    while node in manifests and node not in ids:
        ids.add(node)
        node = manifests[node]["parent_id"]
    return ids


def _row_bytes(spec: dict, quant_bits: int) -> int:
    """Bytes a row takes in a checkpoint (the estimate "auto" compares with; heat not counted)."""
    if quant_bits == 0:
        return native.row_stride(spec["dim"], spec["dtype"])
    return native.quant_row_bytes(spec["dim"], quant_bits) + 4


def check_request(kind: str, quant_bits: int, quantizer: str) -> None:
    if kind not in CHECKPOINT_KINDS:
        raise InvalidArgumentError(f"kind must be one of {', '.join(CHECKPOINT_KINDS)}; got {kind!r}")
    if quant_bits not in QUANT_BITS:
        raise InvalidArgumentError(f"quant_bits must be one of {', '.join(map(str, QUANT_BITS))}; got {quant_bits}")
    if quantizer not in QUANTIZERS:
        raise InvalidArgumentError(f"quantizer must be one of {', '.join(QUANTIZERS)}; got {quantizer!r}")


def _check_tables(tables: list[str] | None, names: list[str]) -> None:
    if not tables:
        return
    missing = [t for t in tables if t not in names]
    if missing:
        raise NotFoundError(f"tables: table {missing[0]!r} does not exist")
    if set(tables) != set(names):
        left_out = sorted(set(names) - set(tables))
        raise InvalidArgumentError(f"tables = {sorted(tables)}: a checkpoint covers every table (it would leave "
                                   f"out {', '.join(left_out)}); send no tables to mean all")
