"""The sharding planner: which nodes hold which part of which table, chosen by a cost model (Neo /
ZionEX's, TorchRec's planner's), as a plan.Plan ready to publish.

Cost model, per node, in seconds of work per second of traffic (its load; 1.0 = saturated):

    compute        = sum over the shard replicas it holds, per tier its rows live in, of
                     ids/s reaching the shard x row bytes (stride) / the node's pool_bytes_per_second
    communication  = sum of pooled output bytes/s (bags/s x shard dim x wire_bytes) / link_bytes_per_second

Ids reach a row-wise shard in proportion to its rows (or to the trace's accesses of its rows);
every column- and table-wise shard gets all of its table's ids.  A replicated shard's reads are
spread over its replicas; writes are not counted.  Which tier a row lives in is estimated per
node: its rows, hottest first by accesses per row (the trace's, else uniform), fill the node's
free DRAM, then CXL, then SCM -- what the tiering engine converges to.

Search (LPT): tables by standalone cost, largest first; each table tries table-wise on every node,
row-wise over 2..n nodes ("mod", and "range" with bounds balancing a trace's accesses),
column-wise over k nodes when its dim splits into k chunks of >= 8 columns, each on the
least-loaded nodes with room; it takes the option whose slowest node (over the whole cluster) is
least loaded, preferring fewer shards among options within 5% of it.  MANAGED and MAPPED tables
are table-wise only.  With a previous plan, a table keeps its layout (same shard names: nothing
moves) while its nodes are live in the same incarnation, it fits, and the slowest node stays
within 10% of a fresh plan's.

    new, report = plan(tables, coordination.nodes(), coordination.current_plan(), "prod")
    print(report.text())
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
from embtier.cli import human_bytes
from embtier.cluster.coord import NodeInfo
from embtier.cluster.plan import (
    SHARDED_KEY_SPACES,
    Layout,
    Plan,
    Replica,
    Shard,
    TablePlan,
    make_layout,
    rows_of,
    with_layout,
)
from embtier.wire import TIERS
from embtierd.keys.space import rows_inside
from embtierd.native import DTYPES, KEY_SPACES, row_stride

SPLIT_TOLERANCE = 0.05        # a split must lower the slowest node by more than this to beat fewer shards
KEEP_TOLERANCE = 0.10         # a previous layout stays while the slowest node is within this of a fresh plan's
MIN_COLUMNS_PER_SHARD = 8
# A daemon's fixed CPU per call it serves, whatever its size (gRPC, protobuf, thread hand-offs): 1.2-1.3 ms
# per LookupPooled on the 2-core development VM at pooling factor 1 to 32 (bench_cluster).  Every shard a
# request reaches costs its daemon one, which is what keeps small and moderately loaded tables whole.
CALL_SECONDS = 1.2e-3
PROFILE_SEGMENTS = 24         # a shard's heat curve, hottest rows first, in this many geometric steps


@dataclass(frozen=True)
class TableSpec:
    """A table to place and the traffic it gets."""

    name: str
    num_rows: int
    dim: int
    dtype: str = "float32"
    key_space: str = "dense"
    key_seed: int = 0
    pooling_factor: float = 1.0          # ids per bag, on average
    requests_per_second: float = 0.0
    bags_per_request: int = 128
    replicas: int = 1
    default_value: float = 0.0
    trace: np.ndarray | None = field(default=None, compare=False, repr=False)  # recorded ids of its lookups

    def __post_init__(self) -> None:
        where = f"table {self.name!r}"
        if self.dtype not in DTYPES:
            raise ValueError(f"{where}: dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"{where}: key_space must be one of {', '.join(KEY_SPACES)}; got {self.key_space!r}")
        if self.num_rows < 1 or self.dim < 1 or self.replicas < 1 or self.bags_per_request < 0:
            raise ValueError(f"{where}: num_rows, dim and replicas must be >= 1 and bags_per_request >= 0; got "
                             f"{self.num_rows}, {self.dim}, {self.replicas}, {self.bags_per_request}")
        if not (self.pooling_factor >= 0 and self.requests_per_second >= 0):
            raise ValueError(f"{where}: pooling_factor and requests_per_second must be >= 0; got "
                             f"{self.pooling_factor}, {self.requests_per_second}")

    @classmethod
    def from_trace(cls, name: str, ids: np.ndarray, lengths: np.ndarray, num_rows: int, dim: int,
                   requests_per_second: float, **kwargs) -> TableSpec:
        """A spec whose pooling factor is the recorded bags' mean length and whose access
        distribution is the recorded ids'."""
        lengths = np.asarray(lengths)
        pooling = float(lengths.mean()) if lengths.size else 0.0
        return cls(name, num_rows, dim, requests_per_second=requests_per_second, pooling_factor=pooling,
                   trace=np.ascontiguousarray(ids, dtype=np.int64), **kwargs)

    @property
    def row_keyed(self) -> bool:
        return self.key_space in SHARDED_KEY_SPACES

    @property
    def ids_per_second(self) -> float:
        return self.requests_per_second * self.bags_per_request * self.pooling_factor

    @property
    def bags_per_second(self) -> float:
        return self.requests_per_second * self.bags_per_request

    def table_plan(self) -> TablePlan:
        return TablePlan(self.name, self.num_rows, self.dim, self.dtype, self.key_space, self.key_seed,
                         self.default_value)


def shard_bytes(t: TablePlan | TableSpec, shard: Shard) -> int:
    """Bytes one replica of the shard takes: its rows (a managed table's default row too) x its stride."""
    rows = shard.num_rows
    if rows == t.num_rows:
        rows = rows_inside({"key_space": t.key_space, "num_rows": rows})
    return rows * row_stride(shard.dim, t.dtype)


def _whole_bytes(t: TablePlan | TableSpec) -> int:
    return shard_bytes(t, Shard("", (), columns=(0, t.dim), num_rows=t.num_rows))


# ---- the cost model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Piece:
    """One replica of one shard as its node sees it."""

    stride: int
    segments: tuple[tuple[int, float], ...]   # (rows, ids per second), hottest first
    output_bytes_per_second: float
    calls_per_second: float = 0.0             # the requests that reach it, each a call on its node

    @property
    def bytes(self) -> int:
        return sum(rows for rows, _ in self.segments) * self.stride


@dataclass
class NodeLoad:
    """A node's predicted work and memory.  load = compute + communication, in seconds of work per
    second (its utilisation)."""

    node: str
    compute_seconds_per_second: float = 0.0
    communication_seconds_per_second: float = 0.0
    bytes_by_tier: dict[str, int] = field(default_factory=dict)
    free_bytes_by_tier: dict[str, int] = field(default_factory=dict)   # what the plan may use

    @property
    def load(self) -> float:
        return self.compute_seconds_per_second + self.communication_seconds_per_second

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_tier.values())

    @property
    def free_bytes(self) -> int:
        return sum(self.free_bytes_by_tier.values())


class _Access:
    """A table's recorded accesses per row: distinct rows (ascending) and how often each was read."""

    def __init__(self, spec: TableSpec):
        ids = np.asarray(spec.trace, dtype=np.int64)
        rows = rows_of(spec.table_plan(), ids) if spec.row_keyed else ids
        self.rows, self.counts = np.unique(rows, return_counts=True)
        self.total = max(int(self.counts.sum()), 1)

    def share(self, picked: np.ndarray) -> float:
        return float(self.counts[picked].sum()) / self.total

    def range_bounds(self, k: int, num_rows: int) -> list[int]:
        """k + 1 row edges cutting the accesses into k nearly equal parts (each part >= 1 row)."""
        cumulative = np.cumsum(self.counts)
        cuts = np.searchsorted(cumulative, [self.total * j / k for j in range(1, k)])
        bounds = [0] + [int(self.rows[min(c, self.rows.size - 1)]) + 1 for c in cuts] + [num_rows]
        for j in range(1, k):
            bounds[j] = min(max(bounds[j], bounds[j - 1] + 1), num_rows - (k - j))
        return bounds

    def skewed_over(self, k: int) -> bool:
        """Whether "mod" over k shards would leave them unequal in accesses by more than 10%."""
        shares = [self.share(self.rows % k == j) for j in range(k)]
        return max(shares) > 1.1 / k


def _segments(counts: np.ndarray, rows: int, ids_per_count: float) -> tuple[tuple[int, float], ...]:
    """A shard of rows whose seen rows were read counts times, as (rows, ids/s) steps, hottest first,
    then the rows never seen (a table keeping fewer keys than were seen keeps the hottest)."""
    counts = np.sort(counts)[::-1][:rows]
    cold_rows = rows - counts.size
    steps_at = np.geomspace(1, counts.size, PROFILE_SEGMENTS).astype(int) if counts.size else []
    edges = np.unique(np.concatenate(([0, counts.size], steps_at))).astype(int)
    summed = np.concatenate(([0], np.cumsum(counts)))
    steps = [(int(b - a), float(summed[b] - summed[a]) * ids_per_count) for a, b in pairwise(edges) if b > a]
    return tuple(steps + ([(cold_rows, 0.0)] if cold_rows > 0 else []))


class _Model:
    """The cost model over one set of tables and nodes."""

    def __init__(self, tables: list[TableSpec], nodes: dict[str, NodeInfo], link_bytes_per_second: float,
                 wire_bytes: int, call_seconds: float = 0.0):
        if link_bytes_per_second <= 0 or wire_bytes <= 0:
            raise ValueError(f"link_bytes_per_second and wire_bytes must be > 0; got {link_bytes_per_second}, "
                             f"{wire_bytes}")
        for info in nodes.values():
            for tier in TIERS:
                if info.capacity_bytes.get(tier, 0) > 0 and info.pool_bytes_per_second.get(tier, 0) <= 0:
                    raise ValueError(f"node {info.id!r} has {tier} capacity but no pool_bytes_per_second for it")
        self.specs = {t.name: t for t in tables}
        self.nodes = nodes
        self.link = link_bytes_per_second
        self.wire_bytes = wire_bytes
        self.call_seconds = call_seconds
        self.access = {t.name: _Access(t) for t in tables if t.trace is not None and len(t.trace)}
        self._pieces: dict[tuple, _Piece] = {}

    def piece(self, spec: TableSpec, layout: Layout, shard: Shard) -> _Piece:
        """What one replica of shard serves (its reads divided among the shard's replicas)."""
        key = (spec.name, layout.sharding, layout.split, len(layout.shards), shard.index, shard.rows,
               shard.columns, len(shard.replicas))
        if key not in self._pieces:
            self._pieces[key] = self._make_piece(spec, layout, shard)
        return self._pieces[key]

    def _make_piece(self, spec: TableSpec, layout: Layout, shard: Shard) -> _Piece:
        share = 1.0 / len(shard.replicas)
        rows = shard_bytes(spec, shard) // row_stride(shard.dim, spec.dtype)
        access = self.access.get(spec.name)
        if access is None:
            ids = spec.ids_per_second * share * (shard.num_rows / spec.num_rows if layout.sharding == "row" else 1.0)
            segments = ((rows, ids),)
        else:
            picked = np.ones(access.rows.size, dtype=bool)
            if layout.sharding == "row" and layout.split == "mod":
                picked = access.rows % len(layout.shards) == shard.index
            elif layout.sharding == "row":
                picked = (access.rows >= shard.rows[0]) & (access.rows < shard.rows[1])
            seen = access.counts[picked]
            segments = _segments(seen, rows, spec.ids_per_second * share / access.total)
        output = spec.bags_per_second * shard.dim * self.wire_bytes * share
        return _Piece(row_stride(shard.dim, spec.dtype), segments, output, spec.requests_per_second * share)

    def node_load(self, node: str, free: dict[str, int], pieces: list[_Piece]) -> NodeLoad:
        """The node's load with these pieces: the hottest rows fill its free DRAM, then CXL, then SCM
        (what does not fit anywhere is counted in its slowest tier)."""
        rate = self.nodes[node].pool_bytes_per_second
        tiers = [t for t in TIERS if free.get(t, 0) > 0] or [t for t in TIERS if rate.get(t, 0) > 0][-1:] or ["scm"]
        steps = sorted(((ids / rows, rows * p.stride, ids * p.stride) for p in pieces for rows, ids in p.segments
                        if rows > 0), key=lambda s: -s[0])
        used = dict.fromkeys(TIERS, 0)
        compute = 0.0
        level = 0
        for _, size, read_bytes_per_second in steps:
            left = size
            while left > 0:
                tier = tiers[level]
                last = level == len(tiers) - 1
                take = left if last else min(left, free[tier] - used[tier])
                used[tier] += take
                compute += read_bytes_per_second * take / size / rate[tier] if rate.get(tier, 0) > 0 else math.inf
                left -= take
                if left > 0:
                    level += 1
        compute += sum(p.calls_per_second for p in pieces) * self.call_seconds
        output = sum(p.output_bytes_per_second for p in pieces)
        return NodeLoad(node, compute, output / self.link, used, dict(free))


def _free_bytes(info: NodeInfo, previous: Plan | None) -> dict[str, int]:
    """Per tier, what a plan may use of the node: its capacity less what it holds besides the
    previous plan's shards (the used bytes not theirs, taken from each tier in proportion)."""
    held = 0
    if previous is not None:
        for t in previous.tables.values():
            for lay in t.layouts():
                held += sum(shard_bytes(t, s) for s in lay.shards for r in s.replicas
                            if r.node == info.id and r.incarnation == info.incarnation)
    used = sum(info.used_bytes.values())
    other = max(0, used - held)
    return {tier: max(0, info.capacity_bytes.get(tier, 0) - (info.used_bytes.get(tier, 0) * other // used
                                                              if used else 0)) for tier in TIERS}


# ---- the report -------------------------------------------------------------------------------------

@dataclass
class Report:
    """A plan's predicted load and memory per node, and what it changes."""

    cluster: str
    version: int
    nodes: dict[str, NodeLoad]
    tables: dict[str, TablePlan]
    moves: list[str] = field(default_factory=list)      # tables of the previous plan whose layout changed
    added: list[str] = field(default_factory=list)      # tables new in this plan
    dropped: list[str] = field(default_factory=list)    # tables of the previous plan not in this one

    @property
    def slowest_node(self) -> str:
        return max(sorted(self.nodes), key=lambda n: self.nodes[n].load) if self.nodes else ""

    @property
    def slowest_load(self) -> float:
        return self.nodes[self.slowest_node].load if self.nodes else 0.0

    def predicted(self) -> dict:
        """The per-node figures as the plan document keeps them."""
        return {n: {"load": x.load, "compute_seconds_per_second": x.compute_seconds_per_second,
                    "communication_seconds_per_second": x.communication_seconds_per_second,
                    "bytes_by_tier": dict(x.bytes_by_tier)} for n, x in sorted(self.nodes.items())}

    def text(self) -> str:
        head = (f"plan v{self.version} of {self.cluster}: slowest node {self.slowest_node or '-'} at load "
                f"{self.slowest_load:.3f} (seconds of work per second)")
        columns = "  ".join(f"{tier + ' used/free':>24}" for tier in TIERS)
        lines = [head, f"{'node':12} {'load':>7} {'compute':>8} {'comm':>7}  {columns}"]
        for name, x in sorted(self.nodes.items()):
            memory = "  ".join(f"{_used_of(x.bytes_by_tier.get(t, 0), x.free_bytes_by_tier.get(t, 0)):>24}"
                               for t in TIERS)
            lines.append(f"{name:12} {x.load:7.3f} {x.compute_seconds_per_second:8.3f} "
                         f"{x.communication_seconds_per_second:7.3f}  {memory}")
        lines.append(f"{'table':20} {'sharding':15} {'shards':>9}  {'nodes':24} reason")
        for name, t in sorted(self.tables.items()):
            lay = t.layout
            sharding = f"{lay.sharding}-wise" + (f" {lay.split}" if lay.split else "")
            shape = f"{len(lay.shards)} x {len(lay.shards[0].replicas)}"
            lines.append(f"{name:20} {sharding:15} {shape:>9}  {','.join(sorted(lay.nodes())):24} {t.reason}")
        for label, names in (("moves", self.moves), ("added", self.added), ("dropped", self.dropped)):
            lines.append(f"{label}: {', '.join(names) if names else 'none'}")
        return "\n".join(lines)


def _used_of(used: int, free: int) -> str:
    return f"{human_bytes(used)} / {human_bytes(free)}"


def predict(plan: Plan, tables: list[TableSpec], nodes: dict[str, NodeInfo], previous: Plan | None = None,
            link_bytes_per_second: float = 1.25e9, wire_bytes: int = 4, call_seconds: float = CALL_SECONDS) -> Report:
    """The cost model applied to any plan (the reads of each table's serving layout; the memory of
    a layout being filled too).  ValueError names a table the plan lacks or a node not in nodes."""
    model = _Model(tables, nodes, link_bytes_per_second, wire_bytes, call_seconds)
    pieces: dict[str, list[_Piece]] = {n: [] for n in nodes}
    for spec in tables:
        if spec.name not in plan.tables:
            raise ValueError(f"plan v{plan.version} has no table {spec.name!r}")
        t = plan.tables[spec.name]
        for lay in t.layouts():
            for shard in lay.shards:
                piece = model.piece(spec, lay, shard)
                if lay is not t.layout:   # being filled: its memory, no reads
                    piece = _Piece(piece.stride, tuple((rows, 0.0) for rows, _ in piece.segments), 0.0)
                for r in shard.replicas:
                    if r.node not in pieces:
                        raise ValueError(f"table {spec.name!r}: shard {shard.name!r} is on node {r.node!r}, "
                                         f"which is not among the nodes ({', '.join(sorted(nodes))})")
                    pieces[r.node].append(piece)
    loads = {n: model.node_load(n, _free_bytes(info, previous), pieces[n]) for n, info in nodes.items()}
    return _report(plan, loads, previous)


def _report(plan: Plan, loads: dict[str, NodeLoad], previous: Plan | None) -> Report:
    before = previous.tables if previous is not None else {}
    moves = sorted(n for n, t in plan.tables.items() if n in before and _target(before[n]) != t.layout)
    return Report(plan.cluster, plan.version, loads, dict(plan.tables), moves,
                  sorted(set(plan.tables) - set(before)), sorted(set(before) - set(plan.tables)))


def _target(t: TablePlan) -> Layout:
    """Where a table of a plan is headed: the layout being filled, else the one serving."""
    return t.next if t.next is not None else t.layout


# ---- the search -------------------------------------------------------------------------------------

@dataclass
class _Option:
    layout: Layout
    slowest: float                    # the cluster's slowest node's load with this option
    local: float                      # the slowest of the nodes it uses
    added: float                      # load it adds over all nodes
    loads: dict[str, NodeLoad]
    bytes: dict[str, int]


class _Placement:
    """Tables placed so far: per node, the pieces it serves, its bytes and load."""

    def __init__(self, model: _Model, free: dict[str, dict[str, int]], version: int):
        self.model = model
        self.free = free
        self.version = version
        self.pieces: dict[str, list[_Piece]] = {n: [] for n in free}
        self.loads = {n: model.node_load(n, free[n], []) for n in free}
        self.layouts: dict[str, Layout] = {}
        self.reasons: dict[str, str] = {}

    def room(self, node: str) -> int:
        return self.loads[node].free_bytes - self.loads[node].bytes

    @property
    def slowest(self) -> float:
        return max((x.load for x in self.loads.values()), default=0.0)

    def evaluate(self, spec: TableSpec, layout: Layout) -> _Option | None:
        """The option of placing spec by layout; None when a node lacks the room."""
        added: dict[str, list[_Piece]] = defaultdict(list)
        for shard in layout.shards:
            for r in shard.replicas:
                added[r.node].append(self.model.piece(spec, layout, shard))
        need = {n: sum(p.bytes for p in ps) for n, ps in added.items()}
        if any(n not in self.loads or need[n] > self.room(n) for n in need):
            return None
        loads = {n: self.model.node_load(n, self.free[n], self.pieces[n] + ps) for n, ps in added.items()}
        others = max((x.load for n, x in self.loads.items() if n not in loads), default=0.0)
        local = max(x.load for x in loads.values())
        return _Option(layout, max(others, local), local, sum(loads[n].load - self.loads[n].load for n in loads),
                       loads, need)

    def take(self, spec: TableSpec, option: _Option, reason: str) -> None:
        for shard in option.layout.shards:
            for r in shard.replicas:
                self.pieces[r.node].append(self.model.piece(spec, option.layout, shard))
        self.loads.update(option.loads)
        self.layouts[spec.name] = option.layout
        self.reasons[spec.name] = reason

    def options(self, spec: TableSpec, replicas: int) -> list[_Option]:
        """Every layout the search considers for spec, on the least-loaded nodes with room."""
        t = spec.table_plan()
        nodes = sorted(self.loads, key=lambda n: (self.loads[n].load, -self.room(n), n))
        incarnation = {n: self.model.nodes[n].incarnation for n in nodes}

        def layout(sharding: str, k: int, split: str = "mod", bounds: list[int] | None = None) -> Layout | None:
            probe = make_layout(t, self.version, sharding, [[Replica(n, "")] for n in nodes[:1]] * k, split, bounds)
            biggest = max(shard_bytes(t, s) for s in probe.shards)
            fit = [n for n in nodes if self.room(n) >= biggest]
            m = min(len(fit), k * replicas)
            if m < replicas:
                return None
            placed = [[Replica(fit[(j * replicas + i) % m], incarnation[fit[(j * replicas + i) % m]])
                       for i in range(replicas)] for j in range(k)]
            return make_layout(t, self.version, sharding, placed, split, bounds)

        layouts = []
        whole = _whole_bytes(t)
        for first in sorted(nodes):
            others = [n for n in nodes if n != first and self.room(n) >= whole][:replicas - 1]
            if self.room(first) >= whole and len(others) == replicas - 1:
                reps = [Replica(n, incarnation[n]) for n in [first, *others]]
                layouts.append(make_layout(t, self.version, "table", [reps]))
        if spec.row_keyed:
            access = self.model.access.get(spec.name)
            for k in range(2, min(len(nodes), t.num_rows) + 1):
                layouts.append(layout("row", k))
                if access is not None and access.skewed_over(k):
                    layouts.append(layout("row", k, "range", access.range_bounds(k, t.num_rows)))
                if t.dim % k == 0 and t.dim // k >= MIN_COLUMNS_PER_SHARD:
                    layouts.append(layout("column", k))
        return [o for lay in layouts if lay is not None and (o := self.evaluate(spec, lay)) is not None]


def _choose(options: list[_Option]) -> _Option:
    """The option with the least loaded slowest node, fewer shards first among those within
    SPLIT_TOLERANCE of it, then the one finishing its own nodes' work earliest."""
    best = min(o.slowest for o in options)
    near = [o for o in options if o.slowest <= best * (1 + SPLIT_TOLERANCE) + 1e-12]
    return min(near, key=lambda o: (len(o.layout.shards), o.local, o.added))


def _describe(spec: TableSpec, option: _Option, options: list[_Option], place: _Placement, replicas: int,
              live: int) -> str:
    lay = option.layout
    size = human_bytes(sum(option.bytes.values()) / replicas)
    nodes = ",".join(sorted(lay.nodes()))
    if lay.sharding == "table":
        why = (f"table-wise on {nodes}: {spec.key_space} ids stay on one shard" if not spec.row_keyed else
               f"table-wise on {nodes}: {size}, the node that ends least loaded (splitting gains under "
               f"{SPLIT_TOLERANCE:.0%})")
    else:
        how = {"row": f"row-wise ({lay.split}) over {len(lay.shards)} nodes",
               "column": f"column-wise in {len(lay.shards)} x {lay.shards[0].dim} columns"}[lay.sharding]
        whole = [o for o in options if o.layout.sharding == "table"]
        most_room = max(place.room(n) for n in place.loads)
        if whole:
            why = f"slowest node at load {option.slowest:.3f}, not {min(o.slowest for o in whole):.3f} table-wise"
        elif sum(option.bytes.values()) / replicas > most_room:
            why = f"{size} exceeds any node's free {human_bytes(most_room)}"
        else:
            why = f"no {replicas} nodes have room for {size} whole"
        split = ", bounds balancing the trace's accesses" if lay.split == "range" else ""
        why = f"{how}: {why}{split}"
    if replicas < spec.replicas:
        why += f"; {replicas} replicas, not {spec.replicas}: only {live} nodes"
    return why


def _place(model: _Model, order: list[TableSpec], free: dict[str, dict[str, int]], version: int,
           keep: dict[str, TablePlan], keep_below: float) -> _Placement:
    """Places the tables in order; a table in keep keeps that layout while the slowest node stays
    at or under keep_below.  ValueError names a table that fits nowhere."""
    place = _Placement(model, free, version)
    for spec in order:
        replicas = min(spec.replicas, len(free))
        kept = keep.get(spec.name)
        if kept is not None:
            option = place.evaluate(spec, _target(kept))
            if option is not None and option.slowest <= keep_below:
                place.take(spec, option, kept.reason if kept.reason.startswith("kept") else
                           f"kept from v{version - 1}: {kept.reason}")
                continue
        options = place.options(spec, replicas)
        if not options:
            need = human_bytes(_whole_bytes(spec))
            rooms = ", ".join(f"{n} {human_bytes(place.room(n))}" for n in sorted(free))
            raise ValueError(f"table {spec.name!r} ({need} x {replicas} replicas) fits on no layout: free memory "
                             f"per node {rooms or 'none (no live nodes)'}")
        option = _choose(options)
        place.take(spec, option, _describe(spec, option, options, place, replicas, len(free)))
    return place


def _still_valid(t: TablePlan, spec: TableSpec, nodes: dict[str, NodeInfo]) -> bool:
    """Whether a previous plan's table still describes spec on live nodes of the same incarnation."""
    same = (t.num_rows, t.dim, t.dtype, t.key_space, t.key_seed) == (spec.num_rows, spec.dim, spec.dtype,
                                                                      spec.key_space, spec.key_seed)
    lay = _target(t)
    return same and all(len(s.replicas) == min(spec.replicas, len(nodes)) and all(
        r.node in nodes and nodes[r.node].incarnation == r.incarnation for r in s.replicas) for s in lay.shards)


def _same_placement(a: Layout, b: Layout) -> bool:
    """Equal but for the shard names (the plan version in them)."""
    return (a.sharding, a.split, len(a.shards)) == (b.sharding, b.split, len(b.shards)) and all(
        (x.replicas, x.index, x.rows, x.columns, x.num_rows) == (y.replicas, y.index, y.rows, y.columns, y.num_rows)
        for x, y in zip(a.shards, b.shards))


def plan(tables: list[TableSpec], nodes: dict[str, NodeInfo], previous: Plan | None, cluster: str,
         link_bytes_per_second: float = 1.25e9, wire_bytes: int = 4,
         call_seconds: float = CALL_SECONDS) -> tuple[Plan, Report]:
    """The next plan for tables over the live nodes (see the module's doc), and its report."""
    if len({t.name for t in tables}) != len(tables):
        raise ValueError("tables: a name appears twice")
    model = _Model(tables, nodes, link_bytes_per_second, wire_bytes, call_seconds)
    free = {n: _free_bytes(info, previous) for n, info in sorted(nodes.items())}
    version = previous.version + 1 if previous is not None else 1

    def cost(spec: TableSpec) -> float:
        fastest = max((info.pool_bytes_per_second.get("dram", 0.0) for info in nodes.values()), default=1.0)
        return (spec.ids_per_second * row_stride(spec.dim, spec.dtype) / max(fastest, 1.0)
                + spec.bags_per_second * spec.dim * wire_bytes / link_bytes_per_second)

    order = sorted(tables, key=lambda s: (-cost(s), -s.num_rows * row_stride(s.dim, s.dtype), s.name))
    fresh = _place(model, order, free, version, {}, 0.0)
    chosen = fresh
    before = previous.tables if previous is not None else {}
    keep = {s.name: before[s.name] for s in tables if s.name in before and _still_valid(before[s.name], s, nodes)}
    if keep:
        limit = fresh.slowest * (1 + KEEP_TOLERANCE) + 1e-12
        try:
            stable = _place(model, order, free, version, keep, limit)
        except ValueError:
            stable = None
        if stable is not None and stable.slowest <= limit:
            chosen = stable
    planned = {}
    for spec in tables:
        lay = chosen.layouts[spec.name]
        old = before.get(spec.name)
        if old is not None and _same_placement(lay, _target(old)):
            lay = _target(old)
        planned[spec.name] = with_layout(spec.table_plan(), lay, reason=chosen.reasons[spec.name])
    new = (previous.successor(planned) if previous is not None
           else Plan(cluster, 1, 0, time.time(), planned))
    report = _report(new, chosen.loads, previous)
    new = Plan(new.cluster, new.version, new.parent, new.created_unix, new.tables, report.predicted())
    new.check()
    report.tables = dict(new.tables)
    return new, report


def greedy_table_wise(tables: list[TableSpec], nodes: dict[str, NodeInfo], cluster: str) -> tuple[Plan, Report]:
    """The baseline: each table whole on the nodes with the least memory used so far (no cost model);
    ValueError names a table no node has room for."""
    free = {n: sum(_free_bytes(info, None).values()) for n, info in sorted(nodes.items())}
    used = dict.fromkeys(free, 0)
    planned = {}
    for spec in tables:
        t = spec.table_plan()
        whole = _whole_bytes(t)
        fit = sorted((n for n in free if used[n] + whole <= free[n]), key=lambda n: (used[n], n))
        replicas = min(spec.replicas, len(free))
        if len(fit) < replicas:
            raise ValueError(f"table {spec.name!r} ({human_bytes(whole)}) fits on fewer than {replicas} nodes")
        for n in fit[:replicas]:
            used[n] += whole
        reps = [Replica(n, nodes[n].incarnation) for n in fit[:replicas]]
        planned[spec.name] = with_layout(t, make_layout(t, 1, "table", [reps]),
                                         reason=f"table-wise on {','.join(fit[:replicas])}: the least memory used")
    baseline = Plan(cluster, 1, 0, time.time(), planned)
    return baseline, predict(baseline, tables, nodes)
