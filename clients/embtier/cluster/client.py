"""ClusterClient: several embtierd hosts as one store, routed by the shard plan in etcd.

It follows the current plan and the live daemons (a thread polls etcd; etcd unreachable: the
last plan and live set stay in force) and gives the methods of Client:

- reads (lookup, lookup_pooled) split each request by the plan, send each shard's part to the
  least-loaded live replica (fewest requests of this client in flight there), one request per
  daemon, all daemons in parallel, and merge: row-wise partial pools summed (a mean divided by
  the whole bag's length, a max over the shards that had ids of the bag), column slices put
  side by side.  A replica that answers UNAVAILABLE (or not within the attempt timeout) is
  left for another; a shard without a live replica fails the request at once with UNAVAILABLE
  naming the shard, the table and the daemons it lives on.
- writes go to every live replica of the row's shard in the plan's layout and, during a move,
  in the layout being filled too.  A live replica that does not answer is tried again until it
  answers or leaves the live set (its lease expires): an acknowledged write is on every replica
  the cluster still counts.  A failed write may have reached some replicas: assignments are
  idempotent, retry them.
- every request carries the plan version it was routed by; a daemon that has taken up a newer
  plan refuses it (FAILED_PRECONDITION) and the client reloads the plan and routes again.
"""

from __future__ import annotations

import copy
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import grpc
import numpy as np

from embtier.client import Client, EmbtierClientError, FabricTraffic, LookupShorthands, TlsOptions
from embtier.cluster.coord import Coordination, CoordinationUnavailable, NodeInfo, parse_cluster
from embtier.cluster.plan import (
    Layout,
    Part,
    Plan,
    Replica,
    Shard,
    TablePlan,
    bag_lengths,
    merge_pooled,
    split_ids,
)
from embtier.wire import PLAN_METADATA_KEY, POOL_MODES, TENANT_METADATA_KEY, TableInfo

FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
STALE_RE = re.compile(r"stale plan: .* serves version (\d+)")
STALE_RETRIES = 5
# a daemon that comes back is reached again within a second (gRPC's default backoff grows to 2 minutes)
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
             ("grpc.max_reconnect_backoff_ms", 1000))


class ClusterError(EmbtierClientError):
    pass


def _unavailable(message: str, method: str) -> ClusterError:
    return ClusterError(grpc.StatusCode.UNAVAILABLE, message, method)


@dataclass
class _Call:
    """One daemon's share of a read: shards (by name) -> what to send them."""

    node: str
    mode: str
    features: dict[str, tuple]


class ClusterClient(LookupShorthands):
    """`ClusterClient("prod@10.0.0.1:2379,10.0.0.2:2379")`: the cluster named prod, its etcd endpoints."""

    def __init__(self, cluster: str, timeout: float | None = 30.0, tls: TlsOptions | None = None,
                 tenant: str | None = None, attempt_timeout: float | None = None, refresh_seconds: float = 0.5,
                 max_workers: int = 16):
        """cluster: NAME@HOST:PORT[,HOST:PORT...]; timeout: each whole call's limit in seconds;
        attempt_timeout: one daemon's (default: the lease period of the daemons, so that a partitioned
        replica is given up for another within one lease)."""
        name, endpoints = parse_cluster(cluster)
        self.coord = Coordination(name, endpoints)
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.tls = tls
        self.tenant = tenant
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._plan: Plan | None = None
        self._nodes: dict[str, NodeInfo] = {}
        self._clients: dict[tuple[str, str, str], Client] = {}  # (node, address, incarnation) -> a client
        self._routed_clients: dict[tuple[str, int, int], Client] = {}  # ... and with a plan version's
        self._in_flight: dict[str, int] = {}
        self._missed: set[tuple[str, str]] = set()  # replicas a write skipped, recorded in etcd
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cluster")
        self._stop = threading.Event()
        self.refresh()
        self._watcher = threading.Thread(target=self._watch, name="cluster-plan", daemon=True)
        self._watcher.start()

    # ---- plan and membership ---------------------------------------------------------------------

    def refresh(self, at_least: int = 0) -> Plan | None:
        """Reloads the live daemons and the current plan (waiting, up to the timeout, for one at least
        version at_least); CoordinationUnavailable when etcd does not answer."""
        deadline = time.monotonic() + (self.timeout or 30.0)
        while True:
            nodes = self.coord.nodes()
            version = self.coord.current_version()
            plan = self._plan
            if version and (plan is None or plan.version != version):
                plan = self.coord.plan(version)
            with self._lock:
                self._nodes = nodes
                self._plan = plan
            if at_least == 0 or plan is not None and plan.version >= at_least or time.monotonic() > deadline:
                return plan
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.refresh()
            except (CoordinationUnavailable, LookupError):
                pass  # the last plan and live set stay in force

    @property
    def plan(self) -> Plan:
        plan = self._plan
        if plan is None:
            raise ClusterError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"cluster {self.coord.cluster!r} has no plan yet (create a table or apply a plan)",
                               "plan")
        return plan

    def nodes(self) -> dict[str, NodeInfo]:
        """The live daemons, by id."""
        return dict(self._nodes)

    def live(self, replica: Replica) -> bool:
        info = self._nodes.get(replica.node)
        return info is not None and info.incarnation == replica.incarnation

    def node_client(self, node: str) -> Client:
        """A client of live daemon node (UNAVAILABLE when it is not live)."""
        info = self._nodes.get(node)
        if info is None:
            raise _unavailable(f"node {node!r} is not live in cluster {self.coord.cluster!r}", "connect")
        key = (node, info.address, info.incarnation)
        client = self._clients.get(key)
        if client is None:
            with self._lock:
                client = self._clients.get(key)
                if client is None:
                    attempt = self.attempt_timeout or max(1.0, info.lease_seconds)
                    client = Client(info.address, timeout=min(attempt, self.timeout or attempt), tls=self.tls,
                                    retries=0, tenant=self.tenant, channel_options=RECONNECT)
                    self._clients[key] = client
        return client

    def _metadata(self, plan: Plan) -> tuple:
        md = ((PLAN_METADATA_KEY, str(plan.version)),)
        return md if self.tenant is None else md + ((TENANT_METADATA_KEY, self.tenant),)

    def _table(self, plan: Plan, name: str, method: str) -> TablePlan:
        t = plan.tables.get(name)
        if t is None:
            raise ClusterError(grpc.StatusCode.NOT_FOUND, f"table {name!r} is not in cluster "
                               f"{self.coord.cluster!r}'s plan (version {plan.version})", method)
        return t

    def _describe_down(self, t: TablePlan, shard: Shard) -> str:
        hosts = ", ".join(f"{r.node} at {self._nodes[r.node].address}" if self.live(r)
                          else f"{r.node} (down: not live with incarnation {r.incarnation})" for r in shard.replicas)
        return f"shard {shard.name} of table {t.name!r} on {hosts}"

    def _routed(self, method: str, op: Callable[[Plan], Any]) -> Any:
        """op(plan), again with a reloaded plan after a daemon said the plan was stale."""
        for _ in range(STALE_RETRIES):
            plan = self.plan
            try:
                return op(plan)
            except EmbtierClientError as e:
                m = STALE_RE.search(e.message) if e.code == grpc.StatusCode.FAILED_PRECONDITION else None
                if m is None:
                    raise
                self.refresh(at_least=int(m.group(1)))
        raise ClusterError(grpc.StatusCode.FAILED_PRECONDITION, f"the plan kept changing: {STALE_RETRIES} attempts "
                           f"were refused as stale", method)

    def _client_for(self, node: str, plan: Plan) -> Client:
        """A client of node whose requests carry plan's version (the node's channel, its own metadata)."""
        base = self.node_client(node)
        key = (node, id(base), plan.version)
        client = self._routed_clients.get(key)
        if client is None:
            client = copy.copy(base)
            client.metadata = self._metadata(plan)
            with self._lock:
                if len(self._routed_clients) > 64:
                    self._routed_clients.clear()
                self._routed_clients[key] = client
        return client

    def _count(self, node: str, n: int) -> None:
        """Changes node's requests in flight by n (what _pick balances by)."""
        with self._lock:
            self._in_flight[node] = self._in_flight.get(node, 0) + n

    def _call(self, node: str, plan: Plan, fn: Callable[[Client], Any]) -> Any:
        """fn(a client of node carrying plan's version), counted in node's requests in flight."""
        client = self._client_for(node, plan)
        self._count(node, 1)
        try:
            return fn(client)
        finally:
            self._count(node, -1)

    # ---- reads -----------------------------------------------------------------------------------

    def _pick(self, t: TablePlan, shard: Shard, avoid: set[str], method: str) -> str:
        """The least-loaded live replica of shard not in avoid."""
        live = [r.node for r in shard.replicas if self.live(r) and r.node not in avoid]
        if not live:
            raise _unavailable(f"no live replica answers for {self._describe_down(t, shard)}", method)
        random.shuffle(live)
        return min(live, key=lambda n: self._in_flight.get(n, 0))

    def _read(self, plan: Plan, method: str, tasks: list[tuple[TablePlan, Shard, str, tuple]],
              send: Callable[[Client, str, dict[str, tuple]], Callable[[], dict[str, Any]]]) -> dict[str, Any]:
        """Runs tasks (table, shard, mode, what to send) on one live replica per shard, one call per
        daemon and mode, all sent before any is waited for (gRPC's own completion queue: no thread
        hand-off), failing over to another replica on UNAVAILABLE; results by shard name.  send
        starts a daemon's call and returns the function that waits for it."""
        results: dict[str, Any] = {}
        avoid: dict[str, set[str]] = {}
        pending = tasks
        while pending:
            calls: dict[tuple[str, str], _Call] = {}
            for t, shard, mode, what in pending:
                node = self._pick(t, shard, avoid.setdefault(shard.name, set()), method)
                calls.setdefault((node, mode), _Call(node, mode, {})).features[shard.name] = what
            started = {key: self._start(c.node, plan, lambda cl, c=c: send(cl, c.mode, c.features))
                       for key, c in calls.items()}
            failed: set[str] = set()
            for (node, _), finish in started.items():
                try:
                    results.update(finish())
                except EmbtierClientError as e:
                    if e.code not in FAILOVER_CODES:
                        info = self._nodes.get(node)
                        raise ClusterError(e.code, f"{e.message} (daemon {node} at "
                                           f"{info.address if info else '?'}, plan version {plan.version})",
                                           e.method) from None
                    failed.add(node)
            pending = []
            for t, shard, mode, what in tasks:
                if shard.name not in results:
                    node = next(n for (n, m), c in calls.items() if shard.name in c.features)
                    if node in failed:
                        avoid[shard.name].add(node)
                        pending.append((t, shard, mode, what))
        return results

    def _start(self, node: str, plan: Plan, send: Callable[[Client], Callable[[], Any]]) -> Callable[[], Any]:
        """send(a client of node carrying plan's version) started, counted in node's requests in flight
        until the returned function (which waits for it) returns or raises."""
        try:
            client = self._client_for(node, plan)
            self._count(node, 1)
        except EmbtierClientError as e:
            def fail(error: EmbtierClientError = e):
                raise error
            return fail
        try:
            finish = send(client)
        except BaseException:
            self._count(node, -1)
            raise

        def wait():
            try:
                return finish()
            finally:
                self._count(node, -1)
        return wait

    def lookup_counted(self, table: str, ids, wire_dtype: str = "float32") -> tuple[np.ndarray, int]:
        """[len(ids), dim] float32 rows, and how many ids a managed table did not know."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)

        def op(plan: Plan):
            t = self._table(plan, table, "Lookup")
            return self.gather(plan, t, t.layout, ids, wire_dtype)

        return self._routed("Lookup", op)

    def gather(self, plan: Plan, t: TablePlan, lay: Layout, ids: np.ndarray,
               wire_dtype: str = "float32") -> tuple[np.ndarray, int]:
        """The rows of ids from layout lay of table t (a read of lookup; also a move's copy)."""
        parts = self._split(t, lay, ids, "Lookup")
        tasks = [(t, p.shard, "", (p.local,)) for p in parts]

        def send(client: Client, _mode: str, features: dict[str, tuple]) -> Callable[[], dict]:
            started = {name: client.lookup_counted_start(name, what[0], wire_dtype) for name, what in features.items()}
            return lambda: {name: finish() for name, finish in started.items()}

        got = self._read(plan, "Lookup", tasks, send)
        out = np.empty((ids.size, t.dim), dtype=np.float32)
        unknown = 0
        for p in parts:
            rows, u = got[p.shard.name]
            c0, c1 = p.shard.columns
            if p.picked is None:
                out[:, c0:c1] = rows
            else:
                out[p.picked, c0:c1] = rows
            unknown += u if lay.sharding != "column" or c0 == 0 else 0
        return out, unknown

    def _split(self, t: TablePlan, lay: Layout, ids: np.ndarray, method: str) -> list[Part]:
        try:
            return split_ids(t, lay, ids)
        except ValueError as e:
            raise ClusterError(grpc.StatusCode.INVALID_ARGUMENT, str(e), method) from None

    def lookup_pooled_counted(self, features: Mapping[str, tuple], mode: str = "sum", wire_dtype: str = "float32",
                              offload: str | None = None) -> tuple[dict[str, np.ndarray], FabricTraffic, dict[str, int]]:
        """{table: (ids, lengths[, weights])} -> {table: [bags, dim] float32}, pooled by the shards'
        daemons and merged here; the fabric accounting is added over the daemons."""
        if mode not in POOL_MODES:
            raise ValueError(f"mode must be one of {', '.join(POOL_MODES)}; got {mode!r}")
        inputs = {}
        for table, arrays in features.items():
            ids, lengths, *rest = arrays
            weights = rest[0] if rest and rest[0] is not None else None
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            lengths = np.ascontiguousarray(lengths, dtype=np.int32)
            if lengths.size and (lengths.min() < 0 or int(lengths.sum()) != ids.size):
                raise ClusterError(grpc.StatusCode.INVALID_ARGUMENT, f"table {table!r}: lengths must be >= 0 and "
                                   f"add up to the {ids.size} ids; they add up to {int(lengths.sum())}", "LookupPooled")
            inputs[table] = (ids, lengths, None if weights is None else np.ascontiguousarray(weights, np.float32))

        def op(plan: Plan):
            tasks, per_table = [], {}
            for table, (ids, lengths, weights) in inputs.items():
                t = self._table(plan, table, "LookupPooled")
                parts = self._split(t, t.layout, ids, "LookupPooled")
                part_mode = mode if t.layout.sharding != "row" else ("max" if mode == "max" else "sum")
                bag_of = np.repeat(np.arange(lengths.size), lengths) if t.layout.sharding == "row" else None
                plens = []
                for p in parts:
                    if p.picked is None:
                        what, plen = (p.local, lengths, weights), lengths
                    else:
                        plen = bag_lengths(p.picked, bag_of, lengths.size)
                        what = (p.local, plen, None if weights is None else weights[p.picked])
                    plens.append(plen)
                    tasks.append((t, p.shard, part_mode, what))
                per_table[table] = (t, parts, plens, lengths)

            traffic = [0, 0.0]

            def send(client: Client, part_mode: str, feats: dict[str, tuple]) -> Callable[[], dict]:
                started = client.lookup_pooled_start(feats, part_mode, wire_dtype, offload)

                def finish() -> dict:
                    out, tr, unknown = started()
                    traffic[0] += tr.host_link_bytes
                    traffic[1] = max(traffic[1], tr.modelled_seconds)
                    return {name: (out[name], unknown.get(name, 0)) for name in feats}
                return finish

            got = self._read(plan, "LookupPooled", tasks, send)
            out, unknown = {}, {}
            for table, (t, parts, plens, lengths) in per_table.items():
                pooled = [(p, got[p.shard.name][0]) for p in parts]
                if t.layout.sharding == "row" and not parts:  # no ids at all: every bag is empty
                    out[table] = np.zeros((lengths.size, t.dim), dtype=np.float32)
                else:
                    out[table] = merge_pooled(pooled, t.layout, lengths, plens, mode, t.dim)
                unknown[table] = sum(got[p.shard.name][1] for p in parts[:1 if t.layout.sharding == "column" else None])
            return out, FabricTraffic(offload or "", {}, traffic[0], traffic[1]), unknown

        return self._routed("LookupPooled", op)

    # ---- writes ----------------------------------------------------------------------------------

    def write_rows(self, table: str, ids, values, add: bool = False, scale: float = 1.0) -> int:
        """Writes values[i] (or adds scale * values[i]) to the row of ids[i] on every live replica of its
        shard (and, during a move, of its shard in the layout being filled); returns how many
        (shard, replica) writes were acknowledged."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        values = np.ascontiguousarray(values, dtype=np.float32)

        def op(plan: Plan) -> int:
            t = self._table(plan, table, "WriteRows")
            if values.shape != (ids.size, t.dim):
                raise ClusterError(grpc.StatusCode.INVALID_ARGUMENT, f"values has shape {values.shape}; expected "
                                   f"({ids.size}, {t.dim}) for table {table!r}", "WriteRows")
            jobs = []
            for lay in t.layouts():
                for p in self._split(t, lay, ids, "WriteRows"):
                    rows = values if p.picked is None else values[p.picked]
                    part = np.ascontiguousarray(rows[:, p.shard.columns[0]:p.shard.columns[1]])
                    if not any(self.live(r) for r in p.shard.replicas):
                        raise _unavailable(f"no live replica for {self._describe_down(t, p.shard)}", "WriteRows")
                    for r in p.shard.replicas:
                        jobs.append(self._pool.submit(self._write_replica, plan, t, p.shard, r, p.local, part,
                                                      add, scale))
            return sum(f.result() for f in jobs)

        return self._routed("WriteRows", op)

    def _write_replica(self, plan: Plan, t: TablePlan, shard: Shard, r: Replica, ids: np.ndarray, values: np.ndarray,
                       add: bool, scale: float) -> int:
        """1 once replica r acknowledged the write, 0 once it is out of the live set and the write that
        skipped it is recorded (coord.record_missed: that copy no longer counts)."""
        deadline = time.monotonic() + (self.timeout or 30.0)
        delay = 0.05
        while True:
            if not self.live(r) and self._skip(r):
                return 0
            try:
                self._call(r.node, plan, lambda c: c.write_rows(shard.name, ids, values, add=add, scale=scale))
                return 1
            except EmbtierClientError as e:
                if e.code not in FAILOVER_CODES or add and e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                if time.monotonic() > deadline:
                    raise _unavailable(f"write to {self._describe_down(t, shard)} not acknowledged by {r.node}: "
                                       f"{e.message}", "WriteRows") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                try:
                    self.refresh()
                except CoordinationUnavailable:
                    pass

    def _skip(self, r: Replica) -> bool:
        """Whether a write may be acknowledged without replica r, which is not live in this client's view:
        yes when its node came back under another incarnation (that copy is gone for good) or once the
        missed write is recorded in etcd while the node is unregistered; no when the node turned out to
        be registered (the view was old: the write must reach it) or etcd does not answer."""
        if (r.node, r.incarnation) in self._missed:
            return True
        info = self._nodes.get(r.node)
        if info is not None and info.incarnation != r.incarnation:
            return True
        try:
            if self.coord.record_missed(r.node, r.incarnation):
                with self._lock:
                    self._missed.add((r.node, r.incarnation))
                return True
            self.refresh()
        except CoordinationUnavailable:
            pass
        return False

    # ---- tables ----------------------------------------------------------------------------------

    def tables(self) -> list[TableInfo]:
        return [self.describe(name) for name in sorted(self.plan.tables)]

    def describe(self, name: str) -> TableInfo:
        """The table as the plan has it, with its rows and bytes per tier, versions (writes) and metadata
        added over one live replica of each shard."""
        plan = self.plan
        t = self._table(plan, name, "DescribeTable")
        rows_by_tier: dict[str, int] = {}
        bytes_by_tier: dict[str, int] = {}
        version = metadata = 0
        emulated: dict[str, bool] = {}
        for shard in t.layout.shards:
            node = self._pick(t, shard, set(), "DescribeTable")
            info = self._call(node, plan, lambda c, s=shard: c.describe(s.name))
            for tier, n in info.rows_by_tier.items():
                if t.layout.sharding != "column" or shard.columns[0] == 0:
                    rows_by_tier[tier] = rows_by_tier.get(tier, 0) + n
            for tier, n in info.bytes_by_tier.items():
                bytes_by_tier[tier] = bytes_by_tier.get(tier, 0) + n
            version += info.version
            metadata += info.metadata_bytes
            emulated.update(info.emulated_by_tier)
        return TableInfo(name=name, num_rows=t.num_rows, dim=t.dim, dtype=t.dtype, rows_by_tier=rows_by_tier,
                         bytes_by_tier=bytes_by_tier, version=version, metadata_bytes=metadata,
                         emulated_by_tier=emulated, key_space=t.key_space, key_seed=t.key_seed,
                         default_value=t.default_value)

    def create_table(self, name: str, num_rows: int, dim: int, dtype: str = "float32", initializer: str = "zeros",
                     seed: int = 0, init_scale: float = 0.0, *, key_space: str = "dense", key_seed: int = 0,
                     default_value: float = 0.0, sharding: str | None = None, shards: int = 0, replicas: int = 1,
                     **unsupported) -> TableInfo:
        """A new table in the cluster: its shards made on their daemons, then a new plan that names it.
        sharding: "table", "row" or "column" (None: table-wise on the daemon with the most free memory
        when it fits there, else row-wise over every live daemon); shards: how many (0: one per live
        daemon); replicas: copies of each shard, on distinct daemons.  A uniform initializer draws each
        shard from its own seed (seed + shard index).  (`embtier cluster plan` chooses placements with
        the cost model; this places one table at a time.)  Mapped tables and per-table tiering
        settings are not offered across a cluster (INVALID_ARGUMENT)."""
        given = {k: v for k, v in unsupported.items() if v not in (None, 0, "", False)}
        if given or key_space == "mapped":
            raise ClusterError(grpc.StatusCode.INVALID_ARGUMENT, f"create {name!r}: "
                               f"{', '.join(given) or 'key_space mapped'} not offered by a cluster (create it on "
                               f"one daemon)", "CreateTable")
        from embtier.cluster import placement

        def attempt() -> Plan:
            plan = self._plan or Plan(self.coord.cluster, 0)
            if name in plan.tables:
                raise ClusterError(grpc.StatusCode.ALREADY_EXISTS, f"table {name!r} exists in cluster "
                                   f"{self.coord.cluster!r}", "CreateTable")
            t = TablePlan(name, num_rows, dim, dtype, key_space, key_seed, default_value)
            try:
                lay, reason = placement.place_one(t, self._nodes, plan.version + 1, sharding, shards, replicas)
            except ValueError as e:
                raise ClusterError(grpc.StatusCode.INVALID_ARGUMENT, f"create {name!r}: {e}", "CreateTable") from None
            t = TablePlan(name, num_rows, dim, dtype, key_space, key_seed, default_value, lay, None, reason)
            placement.materialize(self, t, lay, initializer=initializer, seed=seed, init_scale=init_scale)
            new = plan.successor({**plan.tables, name: t}, plan.predicted)
            # (etcd unreachable: the shards stay, since the publish's answer may be lost with the plan in force)
            if not self.coord.publish(new):
                placement.drop_shards(self, lay)
                return None
            return new

        for _ in range(STALE_RETRIES):
            new = attempt()
            if new is not None:
                placement.wait_taken_up(self, new.version)
                self.refresh(at_least=new.version)
                return self.describe(name)
            self.refresh()
        raise ClusterError(grpc.StatusCode.ABORTED, f"create {name!r}: the plan kept changing", "CreateTable")

    def drop_table(self, name: str) -> None:
        """Removes the table from the plan, waits until the daemons took the plan up, then drops its shards."""
        from embtier.cluster import placement

        for _ in range(STALE_RETRIES):
            plan = self.plan
            t = self._table(plan, name, "DropTable")
            new = plan.successor({k: v for k, v in plan.tables.items() if k != name}, plan.predicted)
            if self.coord.publish(new):
                placement.wait_taken_up(self, new.version)
                for lay in t.layouts():
                    placement.drop_shards(self, lay)
                self.refresh(at_least=new.version)
                return
            self.refresh()
        raise ClusterError(grpc.StatusCode.ABORTED, f"drop {name!r}: the plan kept changing", "DropTable")

    def checkpoint(self, kind: str = "full", quant_bits: int = 0, quantizer: str = "adaptive") -> dict[str, Any]:
        """A checkpoint on every live daemon: {node: Checkpoint}."""
        futures = {n: self._pool.submit(lambda n=n: self.node_client(n).checkpoint(kind, quant_bits, quantizer))
                   for n in self._nodes}
        return {n: f.result() for n, f in futures.items()}

    def tiers(self) -> dict[str, list]:
        """Each live daemon's tiers: {node: [TierInfo]}."""
        return {n: self.node_client(n).tiers() for n in self._nodes}

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=5)
        self._pool.shutdown(wait=False)
        for c in self._clients.values():
            c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__: Sequence[str] = ("ClusterClient", "ClusterError")
