"""Putting a plan into effect: shards made on their daemons, plans published, and the move
that takes a table from one layout to another while lookups and writes go on.

The hand-off of a move (apply_plan), per table whose layout changes:

1. the new layout's shards are made on their daemons as receiving tables (they remember which
   rows plain writes set);
2. plan v+1 is published with the old layout serving reads and the new one as `next`: every
   write goes to both.  The move waits until every live daemon has taken up v+1: a daemon takes
   up a plan only after the requests routed by older plans (which wrote the old layout alone)
   have finished, and refuses those from then on (the fence), so from here every write reaches
   the new layout;
3. the rows are copied from the old layout to the new one with fill writes, which skip every row
   a plain write set meanwhile: a copy never overwrites a newer write;
4. plan v+2 makes the new layout the only one; once every live daemon has taken it up, the old
   shards are dropped.

A move that fails part-way (a daemon of the new layout died, a plan was published meanwhile)
leaves v+1 in force: reads still come from the old layout and writes reach both, nothing is
lost; applying a plan again starts over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc
import numpy as np

from embtier.client import EmbtierClientError
from embtier.cluster.coord import NodeInfo
from embtier.cluster.plan import Layout, Plan, Replica, TablePlan, make_layout, split_ids
from embtier.sizes import row_stride

if TYPE_CHECKING:
    from embtier.cluster.client import ClusterClient

log = logging.getLogger(__name__)

COPY_ROWS = 32768   # rows per copy step of a move


def free_bytes(info: NodeInfo) -> int:
    return sum(info.capacity_bytes.values()) - sum(info.used_bytes.values())


def row_bytes(t: TablePlan) -> int:
    return row_stride(t.dim, t.dtype)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def place_one(t: TablePlan, nodes: dict[str, NodeInfo], version: int, sharding: str | None, shards: int,
              replicas: int) -> tuple[Layout, str]:
    """A layout for one new table without the cost model: table-wise on the daemon with the most free
    memory when it fits there, else row-wise over every live daemon (or as asked)."""
    if not nodes:
        raise ValueError("no live daemon in the cluster")
    if replicas > len(nodes):
        raise ValueError(f"replicas = {replicas} needs as many live daemons; the cluster has {len(nodes)}")
    by_free = sorted(nodes.values(), key=lambda n: (-free_bytes(n), n.id))
    whole = t.num_rows * row_bytes(t) * replicas
    if sharding is None:
        sharding = "table" if whole <= free_bytes(by_free[min(replicas, len(by_free)) - 1]) or not t.row_keyed \
            else "row"
        reason = (f"table-wise: {gib(whole)} fits on {by_free[0].id}" if sharding == "table" else
                  f"row-wise: {gib(whole)} fits on no single daemon")
    else:
        reason = f"{sharding}-wise as asked"
    n = 1 if sharding == "table" else shards or len(nodes)
    reps = [[Replica(by_free[(k + j) % len(by_free)].id, by_free[(k + j) % len(by_free)].incarnation)
             for j in range(replicas)] for k in range(n)]
    return make_layout(t, version, sharding, reps), reason


def _on_node(client: ClusterClient, node: str, fn, seconds: float = 10.0):
    """fn(a client of node), again while node answers UNAVAILABLE (not reached yet: a daemon that just
    came back, a channel still backing off) for up to seconds."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn(client.node_client(node))
        except EmbtierClientError as e:
            if e.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def materialize(client: ClusterClient, t: TablePlan, lay: Layout, receiving: bool = False, initializer: str = "zeros",
                seed: int = 0, init_scale: float = 0.0) -> None:
    """Makes lay's shards of table t on each of their replicas (dense tables, but for a table-wise managed
    or mapped table, which keeps its key space)."""
    key_space = "dense" if t.row_keyed else t.key_space
    for shard in lay.shards:
        for r in shard.replicas:
            _on_node(client, r.node, lambda c, s=shard: c.create_table(
                s.name, s.num_rows, s.dim, t.dtype, initializer, seed + s.index, init_scale,
                key_space=key_space, default_value=t.default_value,
                key_seed=0 if t.row_keyed else t.key_seed, receiving=receiving))


def drop_shards(client: ClusterClient, lay: Layout) -> None:
    """Drops lay's shards where their daemons are live (a gone daemon's copies go with it)."""
    for shard in lay.shards:
        for r in shard.replicas:
            try:
                _on_node(client, r.node, lambda c, s=shard: c.drop_table(s.name), seconds=2.0)
            except EmbtierClientError as e:
                if e.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise


def wait_taken_up(client: ClusterClient, version: int, timeout: float = 60.0) -> None:
    """Returns once every live daemon reports plan version (or a later one) in its registration."""
    deadline = time.monotonic() + timeout
    while True:
        behind = {n.id: n.plan_version for n in client.coord.nodes().values() if n.plan_version < version}
        if not behind:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemons {behind} did not take up plan version {version} within {timeout:g} s")
        time.sleep(0.05)


def _dense(t: TablePlan) -> TablePlan:
    """t with its rows as ids: the view a copy reads and writes shards by."""
    return replace(t, key_space="dense")


def copy_rows(client: ClusterClient, plan: Plan, t: TablePlan) -> int:
    """Copies every row of t from its layout into its next one with fill writes; returns the rows written."""
    twin = _dense(t)
    written = 0
    for lo in range(0, t.num_rows, COPY_ROWS):
        rows = np.arange(lo, min(lo + COPY_ROWS, t.num_rows), dtype=np.int64)
        values, _ = client.gather(plan, twin, t.layout, rows)
        for p in split_ids(twin, t.next, rows):
            part = values if p.picked is None else values[p.picked]
            part = np.ascontiguousarray(part[:, p.shard.columns[0]:p.shard.columns[1]])
            for r in p.shard.replicas:
                written += client._call(r.node, plan, lambda c, s=p.shard, ids=p.local, v=part: c.fill_rows(s.name, ids, v))
    return written


def apply_plan(client: ClusterClient, target: Plan, timeout: float = 120.0) -> Plan:
    """Puts target (a plan made from the current one: its successor, as the planner makes it) into
    effect, moving every table whose layout changed (see the module's doc); returns the final plan.
    A table with a shard that no live replica holds stays as it is (logged: nothing to copy from)."""
    current = client.refresh() or Plan(client.coord.cluster, 0)
    if target.parent != current.version:
        raise ValueError(f"the plan was made from version {target.parent}; the current one is {current.version}: "
                         f"plan again")
    moving, tables, stuck = {}, {}, []
    for name, t in target.tables.items():
        old = current.tables.get(name)
        if old is None:  # a new table: made, and in the plan at once
            materialize(client, t, t.layout)
            tables[name] = replace(t, next=None)
        elif _names(old.layout) == _names(t.layout):
            tables[name] = replace(old, reason=t.reason)
        else:
            if not old.row_keyed:
                raise ValueError(f"table {name!r} is {old.key_space}: its rows cannot be moved (only dense and "
                                 f"hashed tables are); keep its layout")
            unreadable = [s.name for s in old.layout.shards if not any(client.live(r) for r in s.replicas)]
            if unreadable:  # nowhere to copy those rows from: the table stays as it is
                log.warning("table %s stays where it is: shard(s) %s have no live replica to copy from", name,
                            ", ".join(unreadable))
                stuck.append(name)
                tables[name] = old
                continue
            materialize(client, t, t.layout, receiving=True)
            moving[name] = t.layout
            tables[name] = replace(old, next=t.layout, reason=t.reason)
    dropped = [current.tables[n] for n in current.tables if n not in target.tables]
    step = replace(target, version=current.version + 1, parent=current.version, tables=tables)
    if not client.coord.publish(step):
        raise RuntimeError("another plan was published meanwhile: plan again")
    client.refresh(at_least=step.version)
    wait_taken_up(client, step.version, timeout)
    for name in moving:
        start = time.monotonic()
        n = copy_rows(client, step, step.tables[name])
        log.info("moved table %s: %d rows filled in %.2f s", name, n, time.monotonic() - start)
    final = replace(step, version=step.version + 1, parent=step.version, created_unix=time.time(), tables={
        name: replace(t, layout=t.next, next=None) if name in moving else t for name, t in tables.items()})
    if not client.coord.publish(final):
        raise RuntimeError(f"another plan was published during the move (plan {step.version} stays in force: "
                           f"reads from the old layouts, writes to both)")
    client.refresh(at_least=final.version)
    wait_taken_up(client, final.version, timeout)
    for name in moving:
        drop_shards(client, current.tables[name].layout)
    for t in dropped:
        for lay in t.layouts():
            drop_shards(client, lay)
    return final


def _names(lay: Layout) -> tuple:
    return tuple((s.name, s.replicas) for s in lay.shards)
