"""embtierd: the embtier daemon.  `embtierd --help` lists the flags; flags override the file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from embtier.cluster.coord import parse_cluster
from embtier.wire import ROLES

from embtierd import config as config_mod
from embtierd.errors import ConfigError, EmbtierError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="embtierd", description=__doc__)
    p.add_argument("--config", help="TOML configuration file (default: the embedded configuration)")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="listen address, repeatable: unix:///path or host:port")
    p.add_argument("--state-dir", help="directory for the SCM file and state")
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="Prometheus /metrics endpoint ('' turns it off)")
    p.add_argument("--shared-memory", action="store_true",
                   help="let clients on the Unix socket pass LookupPooled's ids and results through shared memory")
    p.add_argument("--anonymous-role", choices=ROLES,
                   help="the role of peers without an identity (auth.anonymous; default reader): more only where "
                        "no one else can reach the listeners, as on an isolated test bed")
    p.add_argument("--dram-bytes", metavar="SIZE", help="DRAM tier capacity (e.g. 512M, 4G, 25%%)")
    p.add_argument("--cxl-bytes", metavar="SIZE", help="CXL tier capacity")
    p.add_argument("--scm-bytes", metavar="SIZE", help="SCM tier capacity")
    p.add_argument("--cluster", metavar="NAME@HOST:PORT[,HOST:PORT...]",
                   help="be a host of cluster NAME, coordinated through the etcd at these endpoints")
    p.add_argument("--node-id", metavar="ID", help="this daemon's id in the cluster (default: the host name)")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="the address the cluster's clients reach this daemon at (default: the first TCP --listen)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    p.add_argument("--salvage", action="store_true",
                   help="when the checkpoints and the write-ahead log cannot rebuild every table, start with every "
                        "table that is intact and list what is lost (default: refuse to start)")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    if args.state_dir:
        out["state_dir"] = args.state_dir
    server = {}
    if args.listen:
        server["listen"] = args.listen
    if args.metrics_listen is not None:
        server["metrics_listen"] = args.metrics_listen
    if args.shared_memory:
        server["shared_memory"] = True
    if server:
        out["server"] = server
    tiers = {name: {"capacity": value} for name, value in
             (("dram", args.dram_bytes), ("cxl", args.cxl_bytes), ("scm", args.scm_bytes)) if value is not None}
    if tiers:
        out["tiers"] = tiers
    if args.anonymous_role is not None:
        out["auth"] = {"anonymous": args.anonymous_role}
    cluster = {}
    if args.cluster is not None:
        try:
            cluster["name"], cluster["endpoints"] = parse_cluster(args.cluster)
        except ValueError as e:
            raise ConfigError(f"--cluster: {e}") from None
    if args.node_id is not None:
        cluster["node_id"] = args.node_id
    if args.advertise is not None:
        cluster["advertise"] = args.advertise
    if cluster:
        out["cluster"] = cluster
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.umask(0o077)  # every file the daemon makes is private: the log and checkpoints hold every row
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_mod.load(args.config, overrides(args))
        if args.print_config:
            print(json.dumps(asdict(cfg), indent=2, default=str))
            return 0
        from embtierd.rpc.server import Daemon

        return Daemon(cfg, salvage=args.salvage).serve()
    except (EmbtierError, OSError) as e:
        logging.getLogger("embtierd").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
