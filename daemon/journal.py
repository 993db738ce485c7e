"""The store's journal: table creations, drops and row writes as write-ahead
log records (daemon/wal.py), and their replay into a store at start.

Order: a write is logged under its table's write lock, so the log holds each
table's writes in the order they were applied; it is acknowledged only once
the log is durable (Journal.wait, group commit across writers).  A creation
is logged once the table is initialised, just before it is published; a drop
before the table goes.  A crash may leave in the log an operation whose
caller got no answer (logged, not yet acknowledged): replay applies it,
whole.  Placement and heat are not logged: a restarted store places rows
afresh (the tiering engine relearns them).
"""

from __future__ import annotations

import json
import logging
import struct

import numpy as np

from .errors import EmbtierError, StorageError
from .tiering_config import TablePolicy

log = logging.getLogger(__name__)

CREATE, DROP, WRITE = 1, 2, 3


class ReplayError(StorageError):
    """The log holds an operation the store refuses now."""


_HEADER = struct.Struct("<I")  # length of the JSON head of a WRITE record


def encode_create(name: str, num_rows: int, dim: int, dtype: str, initializer: str, seed: int,
                  init_scale: float, policy: TablePolicy) -> bytes:
    return json.dumps({"name": name, "num_rows": num_rows, "dim": dim, "dtype": dtype, "initializer": initializer,
                       "seed": seed, "init_scale": init_scale, **policy.to_dict()}).encode()


def encode_write(name: str, ids: np.ndarray, values: np.ndarray, mode: str, scale: float) -> bytes:
    head = json.dumps({"name": name, "n": int(ids.size), "dim": int(values.shape[1]), "mode": mode,
                       "scale": scale}).encode()
    return b"".join((_HEADER.pack(len(head)), head, ids.astype("<i8", copy=False).tobytes(),
                     values.astype("<f4", copy=False).tobytes()))


def decode_write(payload: bytes) -> tuple[dict, np.ndarray, np.ndarray]:
    (length,) = _HEADER.unpack_from(payload)
    head = json.loads(payload[_HEADER.size:_HEADER.size + length])
    start = _HEADER.size + length
    n, dim = head["n"], head["dim"]
    ids = np.frombuffer(payload, dtype="<i8", count=n, offset=start).astype(np.int64)
    values = np.frombuffer(payload, dtype="<f4", count=n * dim, offset=start + 8 * n).reshape(n, dim)
    return head, ids, np.ascontiguousarray(values, dtype=np.float32)


class Journal:
    """What the store calls: log_* returns the record's LSN, wait(lsn) returns once it is durable."""

    def __init__(self, wal):
        self.wal = wal

    def log_create(self, *args, **kwargs) -> int:
        return self.wal.append(CREATE, encode_create(*args, **kwargs))

    def log_drop(self, name: str) -> int:
        return self.wal.append(DROP, name.encode())

    def log_write(self, name: str, ids: np.ndarray, values: np.ndarray, mode: str, scale: float) -> int:
        return self.wal.append(WRITE, encode_write(name, ids, values, mode, scale))

    def wait(self, lsn: int) -> None:
        self.wal.wait_durable(lsn)


def replay(store, records) -> dict[str, int]:
    """Applies logged operations to a store that has no journal attached yet; returns counts by kind.
    A record that cannot be applied raises ReplayError naming its LSN."""
    counts = {"create": 0, "drop": 0, "write": 0}
    for record in records:
        try:
            _apply(store, record, counts)
        except EmbtierError as e:
            raise ReplayError(f"write-ahead log record {record.lsn} cannot be replayed: {e} (were the tiers "
                              f"larger when it was written? moving the wal directory away starts empty)") from e
    return counts


def _apply(store, record, counts: dict[str, int]) -> None:
    if record.kind == CREATE:
        spec = json.loads(record.payload)
        store.create_table(spec["name"], spec["num_rows"], spec["dim"], spec["dtype"], spec["initializer"],
                           spec["seed"], spec["init_scale"], TablePolicy.from_dict(spec))
        counts["create"] += 1
    elif record.kind == DROP:
        store.drop_table(record.payload.decode())
        counts["drop"] += 1
    elif record.kind == WRITE:
        head, ids, values = decode_write(record.payload)
        store.write_rows(head["name"], ids, values, head["mode"], head["scale"])
        counts["write"] += 1
    else:
        raise ReplayError(f"write-ahead log record {record.lsn} has an unknown kind {record.kind}")
