"""The cluster's state in etcd, and the one place that knows where it lives:

    /embtier/<cluster>/nodes/<node id>     a daemon's registration (NodeInfo as JSON), under its
                                           lease: it disappears when the daemon stops renewing it
    /embtier/<cluster>/plan/<version>      a shard plan (plan.Plan as JSON), written once, never
                                           changed; versions count up from 1 (12 digits, zero-padded)
    /embtier/<cluster>/plan/current        the version in force, as a decimal string; changed only
                                           by compare-and-swap from the version it replaces
    /embtier/<cluster>/missed/<node id>/<incarnation>
                                           written by a client before it acknowledges a write that
                                           skipped that copy (the node was not live): the copy is
                                           stale for good, and the node takes a new incarnation

The last two keys decide, atomically, whether a daemon that lost its lease may come back with
its copies still counting: a client records a missed write only while the node is unregistered
(a transaction on the node's key), and a daemon re-registers its incarnation only while no
missed write is recorded for it (a transaction on the missed key).  So an etcd outage (no one
could skip the daemon) costs nothing, and a partitioned daemon that writes went on without comes
back under a new incarnation.

etcd is reached through its v3 HTTP gateway with etcd3gw (OpenStack's client: maintained,
plain HTTP + JSON, so no second copy of etcd's protobuf stubs next to ours).  Every endpoint of
the cluster is tried in turn; CoordinationUnavailable when none answers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import etcd3gw
import requests
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.utils import _encode

from embtier.cluster.plan import Plan

ROOT = "/embtier"
CLUSTER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CoordinationUnavailable(ConnectionError):
    """No etcd endpoint of the cluster answered."""


@dataclass(frozen=True)
class NodeInfo:
    """What a daemon registers: where it is reached, which incarnation of it this is (a new one at
    every start and after a lost lease: its rows may have missed writes meanwhile), its tiers'
    capacities and measured pooling rates, and the plan version it has taken up."""

    id: str
    address: str
    incarnation: str
    capacity_bytes: dict[str, int] = field(default_factory=dict)       # per tier
    used_bytes: dict[str, int] = field(default_factory=dict)           # per tier, at the last renewal
    pool_bytes_per_second: dict[str, float] = field(default_factory=dict)  # per tier: rows gathered and pooled
    plan_version: int = 0
    lease_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeInfo:
        return cls(**json.loads(text))


def parse_cluster(spec: str) -> tuple[str, list[str]]:
    """'NAME@HOST:PORT[,HOST:PORT...]' -> (name, endpoints); ValueError saying what is wrong."""
    name, at, rest = spec.partition("@")
    endpoints = [e.strip() for e in rest.split(",") if e.strip()]
    if not at or not name or not set(name) <= CLUSTER_NAME_CHARS or not endpoints:
        raise ValueError(f"cluster must be NAME@HOST:PORT[,HOST:PORT...] (name of letters, digits, '_', '.', "
                         f"'-'); got {spec!r}")
    for e in endpoints:
        host, _, port = e.removeprefix("http://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {e!r} in cluster {spec!r} is not HOST:PORT")
    return name, endpoints


class Coordination:
    """One cluster's keys in etcd (see the module's doc)."""

    def __init__(self, cluster: str, endpoints: Sequence[str], timeout: float = 2.0):
        self.cluster = cluster
        self.prefix = f"{ROOT}/{cluster}"
        self._clients = []
        for e in endpoints:
            host, _, port = e.removeprefix("http://").rpartition(":")
            self._clients.append(etcd3gw.client(host=host, port=int(port), timeout=timeout, api_path="/v3/"))
        self._good = 0
        self._lock = threading.Lock()

    # -- keys --
    def node_key(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    def plan_key(self, version: int) -> str:
        return f"{self.prefix}/plan/{version:012d}"

    @property
    def current_key(self) -> str:
        return f"{self.prefix}/plan/current"

    def _do(self, fn):
        """fn(client) on the endpoint that answered last, then on each other in turn."""
        n = len(self._clients)
        start = self._good
        last: Exception | None = None
        for i in range(n):
            k = (start + i) % n
            try:
                out = fn(self._clients[k])
                self._good = k
                return out
            except (requests.RequestException, Etcd3Exception, OSError) as e:
                last = e
        raise CoordinationUnavailable(f"etcd of cluster {self.cluster!r} unreachable: {last}")

    # -- nodes --
    def nodes(self) -> dict[str, NodeInfo]:
        """The live daemons (their leases unexpired), by id."""
        found = self._do(lambda c: c.get_prefix(f"{self.prefix}/nodes/"))
        out = {}
        for value, _meta in found:
            info = NodeInfo.from_json(value)
            out[info.id] = info
        return out

    def missed_key(self, node: str, incarnation: str) -> str:
        return f"{self.prefix}/missed/{node}/{incarnation}"

    def _put_if_absent(self, absent: str, key: str, value: str, lease=None) -> bool:
        put = {"key": _encode(key), "value": _encode(value)}
        if lease is not None:
            put["lease"] = lease.id
        txn = {"compare": [{"key": _encode(absent), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
               "success": [{"request_put": put}], "failure": []}
        return bool(self._do(lambda c: c.transaction(txn)).get("succeeded", False))

    def record_missed(self, node: str, incarnation: str) -> bool:
        """Records that a write is acknowledged without node's copy (incarnation), unless node is registered
        now (then False: it is live again, and the write must reach it)."""
        return self._put_if_absent(self.node_key(node), self.missed_key(node, incarnation), "1")

    def register_unless_missed(self, info: NodeInfo, lease) -> bool:
        """Registers info unless a write that skipped its incarnation was recorded (then False)."""
        return self._put_if_absent(self.missed_key(info.id, info.incarnation), self.node_key(info.id),
                                   info.to_json(), lease)

    def grant(self, ttl_seconds: int):
        return self._do(lambda c: c.lease(ttl_seconds))

    def register(self, info: NodeInfo, lease) -> None:
        self._do(lambda c: c.put(self.node_key(info.id), info.to_json(), lease=lease))

    def refresh(self, lease) -> int:
        """The lease's new TTL; -1 when it had expired."""
        return self._do(lambda c: lease.refresh())

    def revoke(self, lease) -> None:
        self._do(lambda c: lease.revoke())

    # -- plans --
    def current_version(self) -> int:
        values = self._do(lambda c: c.get(self.current_key))
        return int(values[0]) if values else 0

    def plan(self, version: int) -> Plan:
        values = self._do(lambda c: c.get(self.plan_key(version)))
        if not values:
            raise LookupError(f"cluster {self.cluster!r} has no plan version {version}")
        return Plan.from_json(values[0])

    def current_plan(self) -> Plan | None:
        version = self.current_version()
        return self.plan(version) if version else None

    def publish(self, plan: Plan) -> bool:
        """Writes plan (version = parent + 1) and makes it current, in one transaction that holds only
        while the current version is still plan.parent; False when another plan became current first
        (nothing changed then).  (A plan document left by a transaction whose answer was lost, which was
        never current, is overwritten.)"""
        plan.check()
        if plan.version != plan.parent + 1:
            raise ValueError(f"plan version {plan.version} must follow its parent {plan.parent}")
        current = _encode(self.current_key)
        compare = ({"key": current, "result": "EQUAL", "target": "CREATE", "create_revision": 0} if plan.parent == 0
                   else {"key": current, "result": "EQUAL", "target": "VALUE", "value": _encode(str(plan.parent))})
        txn = {"compare": [compare], "failure": [],
               "success": [{"request_put": {"key": _encode(self.plan_key(plan.version)), "value": _encode(plan.to_json())}},
                           {"request_put": {"key": current, "value": _encode(str(plan.version))}}]}
        return bool(self._do(lambda c: c.transaction(txn)).get("succeeded", False))
