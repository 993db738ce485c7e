"""The store's journal: table creations, drops, row writes, restores and
tiering settings (SetPolicy) as write-ahead log records (daemon/wal.py), and
their replay into a store at start.

One order for the log and the store: a record is appended if and only if
its change is applied, in the order the changes are applied.  The store
appends each record under the lock that orders the change (a write under
its table's write lock, a creation and a drop under the table catalog's
lock as well) and applies it before releasing that lock; a change refused
before it is logged leaves no record, and an append that fails applies
nothing.  A write is acknowledged only once the log is durable (Journal.wait,
group commit across writers).

A mapped table's CREATE is a CREATE_MAPPED record: its spec and its
mapping (the listed ids and their rows), which never changes after.

Generations: every table carries the LSN of the record that made it (its
CREATE or CREATE_MAPPED, or the RESTORE that installed it; checkpoints save it), and DROP,
WRITE and POLICY records name it, so a replay can never apply a write to a later table
of the same name: such a record is reported, never applied.

A crash may leave in the log an operation whose caller got no answer
(logged, not yet acknowledged): replay applies it, whole.  Placement and
heat are not logged: a restarted store places rows afresh (the tiering
engine relearns them, or a checkpoint's saved heat brings them back).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from embtierd.errors import EmbtierError, StorageError, TierFullError
from embtierd.keys.space import KeySpace
from embtierd.tiering.config import TableSettings

log = logging.getLogger(__name__)

CREATE, DROP, WRITE, RESTORE, CREATE_MAPPED, POLICY = 1, 2, 3, 4, 5, 6
KIND_NAMES = {CREATE: "CREATE", DROP: "DROP", WRITE: "WRITE", RESTORE: "RESTORE", CREATE_MAPPED: "CREATE_MAPPED",
              POLICY: "POLICY"}


class ReplayError(StorageError):
    """The log holds an operation the store refuses now."""


_HEADER = struct.Struct("<I")  # length of the JSON head of a WRITE record


def encode_create(name: str, num_rows: int, dim: int, dtype: str, initializer: str, seed: int,
                  init_scale: float, policy: TableSettings, keys: KeySpace,
                  mapping: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, bytes]:
    """(record kind, payload): a CREATE record is its spec as JSON; a mapped table's is a CREATE_MAPPED
    record, the spec's JSON (length first, as a WRITE's head) then the mapping's ids and rows (int64)."""
    head = json.dumps({"name": name, "num_rows": num_rows, "dim": dim, "dtype": dtype, "initializer": initializer,
                       "seed": seed, "init_scale": init_scale, **policy.to_dict(), **keys.to_dict()}).encode()
    if mapping is None:
        return CREATE, head
    ids, rows = mapping
    return CREATE_MAPPED, b"".join([_HEADER.pack(len(head)), head, ids.astype("<i8", copy=False).tobytes(),
                                    rows.astype("<i8", copy=False).tobytes()])


def decode_create_mapped(payload: bytes) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """(spec, (listed ids, their rows)) of a CREATE_MAPPED record."""
    (length,) = _HEADER.unpack_from(payload)
    start = _HEADER.size + length
    spec = json.loads(payload[_HEADER.size:start])
    n = (len(payload) - start) // 16
    ids = np.frombuffer(payload, dtype="<i8", count=n, offset=start).astype(np.int64)
    rows = np.frombuffer(payload, dtype="<i8", count=n, offset=start + 8 * n).astype(np.int64)
    return spec, (ids, rows)


def encode_drop(name: str, generation: int) -> bytes:
    return json.dumps({"name": name, "generation": generation}).encode()


def decode_drop(payload: bytes) -> tuple[str, int | None]:
    """(table name, generation); logs written before generations hold the bare name."""
    if payload.startswith(b"{"):  # (a table name never starts with "{")
        head = json.loads(payload)
        return head["name"], head["generation"]
    return payload.decode(), None


def encode_write(name: str, generation: int, ids: np.ndarray, values: np.ndarray, mode: str, scale: float,
                 plan: tuple[np.ndarray, np.ndarray] | None = None, by_row: bool = False) -> bytes:
    """A WRITE record: head, ids (int64), values (float32), and for a managed table the plan: the
    row each id has or takes (int64) and whether it takes it now (uint8).  by_row: the ids are rows of
    a keyed table (the head says so only then)."""
    return b"".join(write_parts(name, generation, ids, values, mode, scale, plan, by_row))


def write_parts(name: str, generation: int, ids: np.ndarray, values: np.ndarray, mode: str, scale: float,
                plan: tuple[np.ndarray, np.ndarray] | None = None, by_row: bool = False) -> list:
    """encode_write's payload as the buffers it is the concatenation of (the arrays themselves, not copies,
    where they are already little-endian and contiguous)."""
    head = json.dumps({"name": name, "generation": generation, "n": int(ids.size), "dim": int(values.shape[1]),
                       "mode": mode, "scale": scale, "planned": plan is not None,
                       **({"by_row": True} if by_row else {})}).encode()
    parts = [_HEADER.pack(len(head)), head, np.ascontiguousarray(ids, dtype="<i8"),
             np.ascontiguousarray(values, dtype="<f4")]
    if plan is not None:
        parts += [np.ascontiguousarray(plan[0], dtype="<i8"), plan[1].astype(np.uint8)]
    return parts


def decode_write(payload: bytes) -> tuple[dict, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    (length,) = _HEADER.unpack_from(payload)
    head = json.loads(payload[_HEADER.size:_HEADER.size + length])
    start = _HEADER.size + length
    n, dim = head["n"], head["dim"]
    ids = np.frombuffer(payload, dtype="<i8", count=n, offset=start).astype(np.int64)
    values = np.frombuffer(payload, dtype="<f4", count=n * dim, offset=start + 8 * n).reshape(n, dim)
    plan = None
    if head.get("planned"):
        at = start + 8 * n + 4 * n * dim
        plan = (np.frombuffer(payload, dtype="<i8", count=n, offset=at).astype(np.int64),
                np.frombuffer(payload, dtype=np.uint8, count=n, offset=at + 8 * n).astype(bool))
    return head, ids, np.ascontiguousarray(values, dtype=np.float32), plan


def encode_policy(name: str, generation: int, settings: TableSettings) -> bytes:
    """A POLICY record: the table's tiering settings as SetPolicy left them, whole."""
    return json.dumps({"name": name, "generation": generation, **settings.to_dict()}).encode()


def encode_restore(checkpoint_id: int) -> bytes:
    return json.dumps({"checkpoint": checkpoint_id}).encode()


def decode_restore(payload: bytes) -> int:
    """The checkpoint a RESTORE record installed (its chain is kept while the record is in the log)."""
    return int(json.loads(payload)["checkpoint"])


class Journal:
    """What the store calls: log_* returns the record's LSN, wait(lsn) returns once it is durable."""

    def __init__(self, wal):
        self.wal = wal

    def log_create(self, *args, **kwargs) -> int:
        return self.wal.append(*encode_create(*args, **kwargs))

    def log_drop(self, name: str, generation: int) -> int:
        return self.wal.append(DROP, encode_drop(name, generation))

    def log_write(self, name: str, generation: int, ids: np.ndarray, values: np.ndarray, mode: str,
                  scale: float, plan: tuple[np.ndarray, np.ndarray] | None = None, by_row: bool = False,
                  store: tuple | None = None) -> int:
        """store: (NativeTable, rows, encoded values) written in the same C call as the record (see
        WriteAheadLog.append_parts)."""
        return self.wal.append_parts(WRITE, write_parts(name, generation, ids, values, mode, scale, plan, by_row),
                                     store)

    def log_policy(self, name: str, generation: int, settings: TableSettings) -> int:
        return self.wal.append(POLICY, encode_policy(name, generation, settings))

    def log_restore(self, checkpoint_id: int) -> int:
        return self.wal.append(RESTORE, encode_restore(checkpoint_id))

    def wait(self, lsn: int) -> None:
        self.wal.wait_durable(lsn)


@dataclass
class ReplayReport:
    """What a replay applied, by kind, and (salvage only) the records it skipped, each with why."""

    counts: dict[str, int] = field(default_factory=lambda: {"create": 0, "drop": 0, "write": 0, "restore": 0,
                                                             "policy": 0})
    skipped: list[str] = field(default_factory=list)


def replay(store, records: Iterable, restore: Callable[[int, int], None] | None = None,
           salvage: bool = False) -> ReplayReport:
    """Applies logged operations to a store that has no journal attached yet.  restore(checkpoint id,
    lsn) installs a RESTORE record's checkpoint.  A record that cannot be applied raises ReplayError
    naming its LSN and why (nothing after it is lost: the log is left as it is); with salvage it is
    skipped, reported, and the records after it are applied."""
    report = ReplayReport()
    for record in records:
        try:
            _apply(store, record, report.counts, restore)
        except EmbtierError as e:
            kind = KIND_NAMES.get(record.kind, str(record.kind))
            if salvage:
                log.error("salvage: write-ahead log record %d (%s) skipped: %s", record.lsn, kind, e)
                report.skipped.append(f"write-ahead log record {record.lsn} ({kind}): {e}")
                continue
            hint = ("were the tiers larger when it was written? start with larger tiers" if isinstance(e, TierFullError)
                    else "start with --salvage to skip it and serve the rest: what it held is lost")
            raise ReplayError(f"write-ahead log record {record.lsn} cannot be replayed ({kind}): {e} ({hint}; the "
                              f"log is left as it is)") from e
    return report


def _check_generation(store, name: str, generation: int | None) -> None:
    if generation is None:  # a record from before generations were logged
        return
    actual = store.generation(name)
    if actual != generation:
        raise ReplayError(f"it names table {name!r} of generation {generation} (made by record {generation}), "
                          f"but the table of that name is generation {actual}")


def _apply(store, record, counts: dict[str, int], restore) -> None:
    if record.kind in (CREATE, CREATE_MAPPED):
        spec, mapping = (json.loads(record.payload), None) if record.kind == CREATE else decode_create_mapped(
            record.payload)
        store.create_table(spec["name"], spec["num_rows"], spec["dim"], spec["dtype"], spec["initializer"],
                           spec["seed"], spec["init_scale"], TableSettings.from_dict(spec), generation=record.lsn,
                           keys=KeySpace.from_dict(spec), mapping=mapping)
        counts["create"] += 1
    elif record.kind == DROP:
        name, generation = decode_drop(record.payload)
        _check_generation(store, name, generation)
        store.drop_table(name)
        counts["drop"] += 1
    elif record.kind == WRITE:
        head, ids, values, plan = decode_write(record.payload)
        _check_generation(store, head["name"], head.get("generation"))
        store.write_rows(head["name"], ids, values, head["mode"], head["scale"], planned=plan,
                         by_row=head.get("by_row", False))
        counts["write"] += 1
    elif record.kind == POLICY:
        head = json.loads(record.payload)
        _check_generation(store, head["name"], head["generation"])
        store.set_policy(head["name"], TableSettings.from_dict(head))
        counts["policy"] += 1
    elif record.kind == RESTORE:
        if restore is None:
            raise ReplayError("a restore cannot be replayed without the checkpoints")
        restore(decode_restore(record.payload), record.lsn)
        counts["restore"] += 1
    else:
        raise ReplayError(f"unknown record kind {record.kind}")
