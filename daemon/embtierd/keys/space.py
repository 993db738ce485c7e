"""A table's key space (chosen at creation): what its ids are and how they become rows.

- dense: ids are rows, in [0, num_rows).
- hashed: any int64 id; row = embtier.keys.hashed_rows(id, num_rows, seed) (the hashing trick; the
  kernels compute the same in C).
- managed: any int64 id; each distinct id gets a row of its own on its first write, up to num_rows
  ids; a full table evicts its coldest unprotected id for a new one (the kernels' map, et_keys_*).
  Unknown ids read the default row, default_value in every element: the table has one row more than
  num_rows inside, its last, which no id ever gets.
- mapped: any int64 id; a listed id's row is the one the table's mapping gives it (set at creation,
  never changed: ids -> rows, several ids may share a row), any other id's is
  embtier.keys.mapped_rows's: hash_from + hashed_rows(id, num_rows - hash_from, seed).  The
  mapping lives in the kernels' map (NativeTable.set_mapping / mapping); the log's CREATE_MAPPED
  record and every checkpoint entry of the table hold it.

A write to a managed table is planned (the rows its ids have or take, which ids are new), logged
with that plan, then applied, so a replay re-applies exactly the rows the live daemon chose
(eviction depends on heat, which the log does not hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from embtier.wire import KEY_SPACES

from embtierd.errors import InvalidArgumentError

MAX_KEY_SEED = (1 << 64) - 1


@dataclass(frozen=True)
class KeySpace:
    kind: str = "dense"         # one of embtier.wire.KEY_SPACES
    seed: int = 0               # hashed: the hash's seed
    default_value: float = 0.0  # managed: every element of the row unknown ids read
    hash_from: int = 0          # mapped: unlisted ids hash into rows [hash_from, num_rows)

    def check(self) -> None:
        """InvalidArgumentError naming the field and the value of a setting the store refuses."""
        if self.kind not in KEY_SPACES:
            raise InvalidArgumentError(f"key_space must be one of {', '.join(KEY_SPACES)}; got {self.kind!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_KEY_SEED:
            raise InvalidArgumentError(f"key_seed must be an integer in [0, 2^64), got {self.seed!r}")
        if self.seed and self.kind not in ("hashed", "mapped"):
            raise InvalidArgumentError(f"key_seed = {self.seed} applies to hashed and mapped tables only; this one "
                                       f"is {self.kind}")
        if isinstance(self.hash_from, bool) or not isinstance(self.hash_from, int) or self.hash_from < 0:
            raise InvalidArgumentError(f"mapping_hash_from must be an integer >= 0, got {self.hash_from!r}")
        if self.hash_from and not self.mapped:
            raise InvalidArgumentError(f"mapping_hash_from = {self.hash_from} applies to mapped tables only; this "
                                       f"one is {self.kind}")
        if not math.isfinite(self.default_value):
            raise InvalidArgumentError(f"default_value must be finite, got {self.default_value}")
        if self.default_value and self.kind != "managed":
            raise InvalidArgumentError(f"default_value = {self.default_value} applies to managed tables only (their "
                                       f"unknown ids read it); this one is {self.kind}")

    @property
    def keyed(self) -> bool:
        """Whether ids are keys the kernels translate (anything but dense)."""
        return self.kind != "dense"

    @property
    def managed(self) -> bool:
        return self.kind == "managed"

    @property
    def mapped(self) -> bool:
        return self.kind == "mapped"

    def rows_inside(self, num_rows: int) -> int:
        """Rows the table has inside: a managed table keeps its default row after the ids' rows."""
        return num_rows + 1 if self.managed else num_rows

    def to_dict(self) -> dict:
        """As the write-ahead log and checkpoint manifests keep it."""
        fields = {"key_space": self.kind, "key_seed": self.seed, "default_value": self.default_value}
        return {**fields, "hash_from": self.hash_from} if self.mapped else fields

    @classmethod
    def from_dict(cls, fields: dict) -> KeySpace:
        """From a record or manifest (one from before key spaces: dense)."""
        return cls(fields.get("key_space", "dense"), fields.get("key_seed", 0), fields.get("default_value", 0.0),
                   fields.get("hash_from", 0))


def rows_inside(spec: dict) -> int:
    """The rows inside the table a spec (Store.spec, a manifest's table entry) describes."""
    return KeySpace.from_dict(spec).rows_inside(spec["num_rows"])
