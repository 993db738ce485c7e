"""The shard plan: which daemons hold which part of which table, as one immutable, versioned
JSON document in etcd (see layout.py), and the arithmetic that routes a request by it.

A table is placed one of three ways (Neo's and TorchRec's vocabulary):

- table-wise: one shard, the whole table;
- row-wise: n shards, each a subset of the rows: "mod" (row r lives in shard r mod n as its
  local row r div n: rows spread evenly whatever the ids' skew) or "range" (shard k holds rows
  [bounds[k], bounds[k+1]) as local rows from 0);
- column-wise: n shards, each every row's columns [c0, c1).

Every shard is a plain table on each of its replicas, named `<table>.v<version>.<part>` after the
plan version that made it, so that a shard rebuilt elsewhere by a later plan never meets its
predecessor's name.  Row-wise shards are DENSE tables: a HASHED table's ids are hashed to rows
here, in the client (embtier.keys.hashed_rows, exactly the daemon's rule), and its shards hold
rows.  MANAGED and MAPPED tables keep their key space on one shard (table-wise).

During a move (live resharding) a table has two layouts: `layout`, which serves reads, and
`next`, which is being filled: writes go to both, reads to `layout` only; the plan after the
move names `next` as `layout`.  Replicas name a node and the incarnation of it the plan was made
with: a daemon that restarted (or lost its lease) has a new incarnation, and its copy counts
only once a later plan fills it again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from embtier.keys import hashed_rows

SHARDINGS = ("table", "row", "column")
SPLITS = ("mod", "range")
SHARDED_KEY_SPACES = ("dense", "hashed")  # may be row- or column-wise (managed, mapped: table-wise)


class PlanError(ValueError):
    """A plan document that does not hold together."""


@dataclass(frozen=True)
class Replica:
    node: str
    incarnation: str


@dataclass(frozen=True)
class Shard:
    name: str                        # its table's name on each replica
    replicas: tuple[Replica, ...]
    index: int = 0                   # row-wise: its place among the shards
    rows: tuple[int, int] = (0, 0)   # row-wise "range": [lo, hi) of the table's rows
    columns: tuple[int, int] = (0, 0)  # [c0, c1) of the table's columns
    num_rows: int = 0                # its table's rows

    @property
    def dim(self) -> int:
        return self.columns[1] - self.columns[0]


@dataclass(frozen=True)
class Layout:
    sharding: str                    # "table", "row", "column"
    shards: tuple[Shard, ...]
    split: str = ""                  # row-wise: "mod" or "range"

    def nodes(self) -> set[str]:
        return {r.node for s in self.shards for r in s.replicas}


@dataclass(frozen=True)
class TablePlan:
    name: str
    num_rows: int
    dim: int
    dtype: str = "float32"
    key_space: str = "dense"
    key_seed: int = 0
    default_value: float = 0.0
    layout: Layout = field(default_factory=lambda: Layout("table", ()))
    next: Layout | None = None       # being filled (a move): writes go to it too
    reason: str = ""                 # why the planner chose the layout

    @property
    def row_keyed(self) -> bool:
        """Ids are rows of the shards (dense), or hash to them here (hashed)."""
        return self.key_space in SHARDED_KEY_SPACES

    def layouts(self) -> tuple[Layout, ...]:
        """Where a write goes: the layout, and the next one during a move."""
        return (self.layout,) if self.next is None else (self.layout, self.next)


@dataclass(frozen=True)
class Plan:
    cluster: str
    version: int
    parent: int = 0                  # the version it replaces (0: the first)
    created_unix: float = 0.0
    tables: dict[str, TablePlan] = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)  # the planner's figures, per node: informative only

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        try:
            doc = json.loads(text)
            tables = {name: _table(t) for name, t in doc.get("tables", {}).items()}
            plan = cls(cluster=doc["cluster"], version=int(doc["version"]), parent=int(doc.get("parent", 0)),
                       created_unix=float(doc.get("created_unix", 0.0)), tables=tables,
                       predicted=doc.get("predicted", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"not a shard plan: {e}") from None
        plan.check()
        return plan

    def successor(self, tables: dict[str, TablePlan], predicted: dict | None = None) -> Plan:
        """The plan that replaces this one (version + 1)."""
        return Plan(self.cluster, self.version + 1, self.version, time.time(), tables,
                    predicted if predicted is not None else {})

    def nodes(self) -> set[str]:
        return {n for t in self.tables.values() for lay in t.layouts() for n in lay.nodes()}

    def check(self) -> None:
        """PlanError unless every table's layouts cover its rows and columns exactly once."""
        for t in self.tables.values():
            for lay in t.layouts():
                check_layout(t, lay)


def _layout(d: dict) -> Layout:
    shards = tuple(Shard(name=s["name"], replicas=tuple(Replica(**r) for r in s["replicas"]),
                         index=int(s.get("index", 0)), rows=tuple(s.get("rows", (0, 0))),
                         columns=tuple(s["columns"]), num_rows=int(s["num_rows"])) for s in d["shards"])
    return Layout(d["sharding"], shards, d.get("split", ""))


def _table(d: dict) -> TablePlan:
    return TablePlan(name=d["name"], num_rows=int(d["num_rows"]), dim=int(d["dim"]), dtype=d.get("dtype", "float32"),
                     key_space=d.get("key_space", "dense"), key_seed=int(d.get("key_seed", 0)),
                     default_value=float(d.get("default_value", 0.0)), layout=_layout(d["layout"]),
                     next=_layout(d["next"]) if d.get("next") else None, reason=d.get("reason", ""))


def check_layout(t: TablePlan, lay: Layout) -> None:
    where = f"table {t.name!r}"
    if lay.sharding not in SHARDINGS:
        raise PlanError(f"{where}: sharding {lay.sharding!r} is not one of {', '.join(SHARDINGS)}")
    if not lay.shards:
        raise PlanError(f"{where}: a layout needs at least one shard")
    for s in lay.shards:
        if not s.replicas:
            raise PlanError(f"{where}: shard {s.name!r} has no replica")
        if len({r.node for r in s.replicas}) != len(s.replicas):
            raise PlanError(f"{where}: shard {s.name!r} names a node twice")
    if lay.sharding != "table" and not t.row_keyed:
        raise PlanError(f"{where}: a {t.key_space} table is placed table-wise (row- and column-wise need dense "
                        f"or hashed ids)")
    n = len(lay.shards)
    if lay.sharding == "table":
        s = lay.shards[0]
        if n != 1 or s.columns != (0, t.dim) or s.num_rows != t.num_rows:
            raise PlanError(f"{where}: table-wise is one shard of all {t.num_rows} rows and {t.dim} columns")
    elif lay.sharding == "column":
        edges = [lay.shards[0].columns[0]] + [s.columns[1] for s in lay.shards]
        if edges[0] != 0 or edges[-1] != t.dim or any(s.columns[0] != e for s, e in zip(lay.shards, edges)) \
                or any(s.dim <= 0 for s in lay.shards) or any(s.num_rows != t.num_rows for s in lay.shards):
            raise PlanError(f"{where}: column shards must cover columns [0, {t.dim}) in order, each all rows")
    else:
        if lay.split not in SPLITS:
            raise PlanError(f"{where}: row-wise split {lay.split!r} is not one of {', '.join(SPLITS)}")
        if lay.split == "range":
            bounds = [lay.shards[0].rows[0]] + [s.rows[1] for s in lay.shards]
            if bounds[0] != 0 or bounds[-1] != t.num_rows or any(
                    s.rows[0] != b or s.rows[1] <= s.rows[0] for s, b in zip(lay.shards, bounds)):
                raise PlanError(f"{where}: range shards must cover rows [0, {t.num_rows}) in order, none empty")
        for k, s in enumerate(lay.shards):
            if s.index != k or s.columns != (0, t.dim):
                raise PlanError(f"{where}: row shard {s.name!r} must be shard {k} with every column")
            want = (t.num_rows - k + n - 1) // n if lay.split == "mod" else s.rows[1] - s.rows[0]
            if s.num_rows != want or want < 1:
                raise PlanError(f"{where}: row shard {s.name!r} holds {s.num_rows} rows; its split gives {want} "
                                f"(a row-wise table needs at least a row per shard)")


def shard_name(table: str, version: int, sharding: str, k: int, n: int, columns: tuple[int, int]) -> str:
    part = {"table": "t", "row": f"r{k}of{n}", "column": f"c{columns[0]}-{columns[1]}"}[sharding]
    return f"{table}.v{version}.{part}"


def make_layout(t: TablePlan, version: int, sharding: str, replicas: list[list[Replica]], split: str = "mod",
                bounds: list[int] | None = None, column_edges: list[int] | None = None) -> Layout:
    """A layout of table t made by plan version: replicas[k] are shard k's; row-wise "range" needs
    bounds (n + 1 row edges), column-wise column_edges (n + 1 column edges; default: even)."""
    n = len(replicas)
    shards = []
    if sharding == "column" and column_edges is None:
        column_edges = [t.dim * k // n for k in range(n + 1)]
    for k, reps in enumerate(replicas):
        cols, rows, num_rows = (0, t.dim), (0, 0), t.num_rows
        if sharding == "column":
            cols = (column_edges[k], column_edges[k + 1])
        elif sharding == "row" and split == "mod":
            num_rows = (t.num_rows - k + n - 1) // n
        elif sharding == "row":
            rows = (bounds[k], bounds[k + 1])
            num_rows = rows[1] - rows[0]
        shards.append(Shard(shard_name(t.name, version, sharding, k, n, cols), tuple(reps), k if sharding == "row"
                            else 0, rows, cols, num_rows))
    lay = Layout(sharding, tuple(shards), split if sharding == "row" else "")
    check_layout(t, lay)
    return lay


def with_layout(t: TablePlan, layout: Layout, next: Layout | None = None, reason: str | None = None) -> TablePlan:
    return replace(t, layout=layout, next=next, reason=t.reason if reason is None else reason)


# ---- routing ---------------------------------------------------------------------------------------

def rows_of(t: TablePlan, ids: np.ndarray) -> np.ndarray:
    """The table rows of ids: dense ids are rows; a hashed table's hash to them.  ValueError names
    an id out of range."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if t.key_space == "hashed":
        return hashed_rows(ids, t.num_rows, t.key_seed)
    if ids.size and (ids.min() < 0 or ids.max() >= t.num_rows):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"ids: {bad} is out of range [0, {t.num_rows}) for table {t.name!r}")
    return ids


@dataclass(frozen=True)
class Part:
    """One shard's piece of a request: which of the request's ids it gets, and as which local ids."""

    shard: Shard
    picked: np.ndarray | None        # positions in the request's ids (None: all of them)
    local: np.ndarray                # the ids to send (local rows, or the keys as given)


def split_ids(t: TablePlan, lay: Layout, ids: np.ndarray) -> list[Part]:
    """The parts of ids per shard of lay (every shard of a column- or table-wise layout gets all ids)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if lay.sharding != "row":
        local = rows_of(t, ids) if t.key_space == "hashed" else ids
        return [Part(s, None, local) for s in lay.shards]
    rows = rows_of(t, ids)
    n = len(lay.shards)
    if lay.split == "mod":
        which, local = rows % n, rows // n
    else:
        bounds = np.array([s.rows[0] for s in lay.shards[1:]], dtype=np.int64)
        which = np.searchsorted(bounds, rows, side="right")
        local = rows - np.array([s.rows[0] for s in lay.shards], dtype=np.int64)[which]
    parts = []
    for k, s in enumerate(lay.shards):
        picked = np.flatnonzero(which == k)
        if picked.size:
            parts.append(Part(s, picked, local[picked]))
    return parts


def bag_lengths(picked: np.ndarray, bag_of: np.ndarray, bags: int) -> np.ndarray:
    """Per bag, how many of the picked ids it has (bag_of: each id's bag)."""
    return np.bincount(bag_of[picked], minlength=bags).astype(np.int32)


def merge_pooled(parts: list[tuple[Part, np.ndarray]], lay: Layout, lengths: np.ndarray, part_lengths: list,
                 mode: str, dim: int) -> np.ndarray:
    """The [bags, dim] pooled result from each part's pooled result.  Row-wise parts come back
    pooled with "sum" (mean, sum) or "max": summed here, a mean divided by the whole bag's length,
    a max taken over the parts that had ids of the bag.  Column-wise parts are put side by side;
    table-wise, the one part is the answer."""
    bags = lengths.size
    if lay.sharding == "table":
        return parts[0][1]
    if lay.sharding == "column":
        out = np.empty((bags, dim), dtype=np.float32)
        for part, pooled in parts:
            out[:, part.shard.columns[0]:part.shard.columns[1]] = pooled
        return out
    if mode == "max":
        out = np.full((bags, dim), -np.inf, dtype=np.float32)
        for (part, pooled), plen in zip(parts, part_lengths):
            has = plen > 0
            out[has] = np.maximum(out[has], pooled[has])
        out[lengths == 0] = 0.0
        return out
    out = np.zeros((bags, dim), dtype=np.float32)
    for _, pooled in parts:
        out += pooled
    if mode == "mean":
        out /= np.maximum(lengths, 1)[:, None].astype(np.float32)
    return out
