"""`embtier --cluster NAME@HOST:PORT cluster status | plan [--workload FILE.toml] [--apply]`.

status: the live daemons (address, incarnation, the plan version each took up, memory per tier,
measured pooling rates) and the current plan's tables with their shards and replicas (a replica
whose daemon is gone or came back under another incarnation is marked down).

plan: the cost-model planner (embtier_tools/planner.py) over the tables of the current plan and
those the workload file declares, and the live daemons; prints the predicted load and memory per
daemon and why each table got its sharding.  --apply puts it into effect (moving the tables whose
layout changed while lookups and writes go on: embtier/cluster/placement.py).

The workload file (TOML), one table per section, every key optional but for a new table's
num_rows and dim:

    [tables.clicks]
    num_rows = 10000000          # a table not in the plan yet: made where the planner puts it
    dim = 64
    dtype = "float32"
    pooling_factor = 32          # ids per bag, on average
    requests_per_second = 500
    bags_per_request = 128
    replicas = 2
    trace = "clicks.npy"         # recorded ids (embtier record): their skew, and range bounds
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np
from embtier.cluster.client import ClusterClient
from embtier.cluster.placement import apply_plan
from embtier.keys import hashed_rows

from embtier_tools.planner import TableSpec, plan

SPEC_KEYS = {"num_rows", "dim", "dtype", "key_space", "key_seed", "pooling_factor", "requests_per_second",
             "bags_per_request", "replicas", "default_value", "trace"}


def workload_specs(client: ClusterClient, path: str | None, replicas: int) -> list[TableSpec]:
    """A spec per table of the current plan (its geometry; traffic from the file or 1 request/s of PF 1)
    and per table the file adds."""
    declared: dict = {}
    if path:
        try:
            declared = tomllib.loads(Path(path).read_text()).get("tables", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SystemExit(f"embtier cluster plan: --workload {path}: {e}") from None
    current = client._plan.tables if client._plan else {}
    specs = []
    for name in sorted(set(current) | set(declared)):
        given = dict(declared.get(name, {}))
        unknown = set(given) - SPEC_KEYS
        if unknown:
            raise SystemExit(f"embtier cluster plan: tables.{name}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(SPEC_KEYS))}")
        t = current.get(name)
        base = ({"num_rows": t.num_rows, "dim": t.dim, "dtype": t.dtype, "key_space": t.key_space,
                 "key_seed": t.key_seed, "default_value": t.default_value} if t else {})
        if t is None and not {"num_rows", "dim"} <= set(given):
            raise SystemExit(f"embtier cluster plan: tables.{name} is not in the plan: give its num_rows and dim")
        fields = {"pooling_factor": 1.0, "requests_per_second": 1.0, "replicas": replicas, **base, **given}
        trace = fields.pop("trace", None)
        if trace is not None:
            ids = np.load(trace).astype(np.int64)
            fields["trace"] = hashed_rows(ids, fields["num_rows"], fields.get("key_seed", 0)) \
                if fields.get("key_space") == "hashed" else ids
        try:
            specs.append(TableSpec(name, **fields))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"embtier cluster plan: tables.{name}: {e}") from None
    return specs


def cmd_status(client: ClusterClient) -> None:
    nodes = client.nodes()
    current = client._plan
    print(f"cluster {client.coord.cluster}: {len(nodes)} live daemon(s), plan version "
          f"{current.version if current else 0}")
    for n in sorted(nodes.values(), key=lambda n: n.id):
        mem = ", ".join(f"{t} {n.used_bytes.get(t, 0) / 2**30:.2f}/{c / 2**30:.2f} GiB"
                        for t, c in n.capacity_bytes.items())
        rates = ", ".join(f"{t} {r / 1e9:.2f} GB/s" for t, r in n.pool_bytes_per_second.items())
        print(f"  {n.id:10} {n.address:22} incarnation {n.incarnation}  plan v{n.plan_version}  {mem}  pools {rates}")
    if current is None:
        return
    for t in current.tables.values():
        print(f"  table {t.name}: {t.num_rows} x {t.dim} {t.dtype} {t.key_space}, {t.layout.sharding}-wise"
              f"{' (' + t.layout.split + ')' if t.layout.split else ''}, {len(t.layout.shards)} shard(s)"
              f"{'; moving to ' + t.next.sharding + '-wise' if t.next else ''}")
        for s in t.layout.shards:
            reps = ", ".join(r.node + ("" if client.live(r) else " (down)") for r in s.replicas)
            print(f"    {s.name}: {s.num_rows} rows, columns {s.columns[0]}-{s.columns[1]} on {reps}")


def main(client: ClusterClient, args) -> int:
    if args.cluster_command == "status":
        cmd_status(client)
        return 0
    specs = workload_specs(client, args.workload, args.replicas)
    if not specs:
        raise SystemExit("embtier cluster plan: no table to place (the plan has none and --workload adds none)")
    try:
        target, report = plan(specs, client.nodes(), client._plan, client.coord.cluster)
    except ValueError as e:
        raise SystemExit(f"embtier cluster plan: {e}") from None
    print(report.text())
    if args.apply:
        final = apply_plan(client, target)
        print(f"applied: plan version {final.version} is in force", file=sys.stderr)
        for t in final.tables.values():
            lost = [s.name for s in t.layout.shards if not any(client.live(r) for r in s.replicas)]
            if lost:
                print(f"table {t.name} stays as it was: no live replica of {', '.join(lost)} to copy from "
                      f"(restart its daemon under its old incarnation, or drop and re-create it)", file=sys.stderr)
    return 0
