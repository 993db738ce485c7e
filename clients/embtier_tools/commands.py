"""The `embtier` commands that are tools rather than client calls: `simulate` (the offline
tiering simulator, which runs the daemon's own policies), `bench` (the load generator) and
`fabric` (the shaped-link test bed).  The client library's command line imports this module
only when one of them runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from embtier.cli import human_bytes
from embtier.client import Client, TlsOptions
from embtier.keys import hashed_rows

from embtier_tools.loadgen import LoadGenerator, Workload


def rows_of_keys(ids: np.ndarray, num_rows: int, key_space: str, seed: int, mapping=None) -> np.ndarray:
    """The rows a recorded trace's ids (a keyed table records them raw) read: a hashed table's are
    the hash; a mapped table's its mapping's (an embtier_tools.mapping.Mapping); a managed table's
    the rows its ids would take in order of first appearance (its first writes, approximately), so
    that a trace of more distinct ids than rows shares rows in turn (the evictions the trace would
    cause are not modelled); a dense table's are the ids."""
    if key_space == "mapped":
        return mapping.rows_of(ids)
    if key_space == "hashed":
        return hashed_rows(np.asarray(ids, dtype=np.int64), num_rows, seed)
    if key_space != "managed":
        return ids
    _, first, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse] % num_rows


def simulate_trace(args) -> None:
    """`embtier simulate TRACE ...`: predicted tier hit ratios of a recorded trace."""
    from embtierd.tiering.simulate import SimConfig, oracle_hit_ratios, simulate

    try:
        trace = np.load(args.trace, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise SystemExit(f"embtier simulate: cannot read {args.trace} as a .npy array: {e}") from None
    if trace.ndim != 1 or trace.dtype.kind not in "iu":
        raise SystemExit(f"embtier simulate: {args.trace} holds a {trace.dtype} array of shape {trace.shape}; "
                         f"expected a 1-D array of integer ids")
    meta_path = Path(args.trace).with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    def setting(name: str, flag: str, arg, default=None):
        if arg is not None:
            return arg
        if name not in meta and default is None:
            raise SystemExit(f"embtier simulate: {flag} is needed ({meta_path} has no {name})")
        return meta.get(name, default)

    num_rows = int(setting("num_rows", "--rows", args.rows))
    row_bytes = int(setting("row_bytes", "--row-bytes", args.row_bytes))
    shift = int(setting("heat_sample_shift", "--sample-shift", args.sample_shift, default=3))
    if args.ids_per_interval is not None:
        per_interval = args.ids_per_interval
    elif meta.get("seconds"):
        per_interval = max(1, round(trace.size / meta["seconds"] * meta["interval_seconds"]))
    else:
        raise SystemExit("embtier simulate: --ids-per-interval is needed (no recorded rate beside the trace)")
    bandwidth = args.budget if args.budget is not None else int(
        meta.get("bandwidth_bytes_per_second", 256 << 20) * meta.get("interval_seconds", 1.0))
    drams = args.dram or [meta.get("dram_rows", 0) * row_bytes]
    cxls = args.cxl or [meta.get("cxl_rows", 0) * row_bytes]
    if min(drams + cxls) < 0 or bandwidth < 0:
        raise SystemExit("embtier simulate: --dram, --cxl and --budget take sizes (\"none\" is for `embtier policy`)")
    policies = args.policy or [meta.get("policy", "lfu")]
    mapping = None
    if meta.get("key_space") == "mapped":  # `embtier record` saved the table's mapping beside the trace
        from embtier_tools.mapping import Mapping

        if "mapping_file" not in meta:
            raise SystemExit(f"embtier simulate: {meta_path} is of a mapped table but names no mapping file")
        try:
            mapping = Mapping.load(meta_path.with_name(meta["mapping_file"]))
        except ValueError as e:
            raise SystemExit(f"embtier simulate: {e}") from None
    trace = rows_of_keys(trace, num_rows, meta.get("key_space", "dense"), int(meta.get("key_seed", 0)), mapping)
    intervals = -(-trace.size // per_interval)
    warmup = min(args.warmup_intervals, max(0, intervals - 1))
    measured = np.asarray(trace[warmup * per_interval:])
    print(f"trace {args.trace}: {trace.size} ids over {num_rows} rows of {row_bytes} bytes; {intervals} intervals "
          f"of {per_interval} ids, budget {human_bytes(bandwidth)} per interval, heat sampled 1 in {1 << shift}; "
          f"hit ratios over the {intervals - warmup} intervals after {warmup} of warm-up")
    print(f"{'dram':>10} {'cxl':>10} {'policy':>6} {'unit':>5}   {'dram hit':>8} {'cxl hit':>8} {'scm hit':>8}   "
          f"{'oracle dram':>11} {'moved/interval':>14}")
    units = {"row": 1, "page": max(1, 4096 // row_bytes)}
    for dram in drams:
        for cxl in cxls:
            capacity = (dram // row_bytes, cxl // row_bytes)
            oracle = oracle_hit_ratios(measured, num_rows, capacity)
            for policy in policies:
                for unit in args.granularity:
                    config = SimConfig(num_rows, capacity, per_interval, bandwidth // row_bytes, policy,
                                       heat_sample_shift=shift, rows_per_unit=units[unit])
                    try:
                        result = simulate(trace, config)
                    except ValueError as e:
                        raise SystemExit(f"embtier simulate: {e}") from None
                    hit = result.hit_ratios(warmup)
                    print(f"{human_bytes(dram):>10} {human_bytes(cxl):>10} {policy:>6} {unit:>5}   "
                          f"{hit[0]:8.3f} {hit[1]:8.3f} {hit[2]:8.3f}   {oracle[0]:11.3f} "
                          f"{result.moved_rows[warmup:].mean():14.0f}")
    print("oracle: the most frequent rows of the measured part of the trace placed in DRAM beforehand (a bound).")


def print_tick(elapsed: float, tick) -> None:
    secs = 1.0
    print(f"{elapsed:6.1f}s  {tick.requests / secs:8.0f} req/s  {tick.rows / secs / 1e6:7.2f} M rows/s  "
          f"p50 {tick.percentile_ms(50):7.2f} ms  p99 {tick.percentile_ms(99):7.2f} ms", flush=True)


def bench(c: Client, args) -> None:
    """`embtier bench`: the load generator against a running daemon."""
    if args.scenario:  # an XRBench-style usage scenario instead (embtier_tools.xrbench)
        from embtier_tools import xrbench

        xrbench.bench(c, args, TlsOptions(args.ca, args.cert, args.key) if args.ca else None)
        return
    tables = {name: c.describe(name).num_rows for name in args.table}
    workload = Workload(tables, args.bags, args.pooling_factor, args.alpha, not args.raw)
    gen = LoadGenerator(args.target, workload, args.concurrency)
    stats = gen.run(args.duration, print_tick)
    print(f"total: {stats.requests} requests, {stats.errors} errors, {stats.rows / args.duration / 1e6:.2f} M rows/s, "
          f"p50 {stats.percentile_ms(50):.2f} ms, p99 {stats.percentile_ms(99):.2f} ms "
          f"({'pooled' if workload.pooled else 'raw'}, {args.concurrency} clients)")


def fabric_up(fabric, args) -> None:
    bed = fabric.TestBed(args.prefix, args.rate_bits_per_second, args.delay_seconds)
    bed.up()
    py = sys.executable
    print(f"test bed {bed.prefix} is up: {fabric.format_rate(bed.rate_bits_per_second)} each way, one-way delay "
          f"{fabric.format_delay(bed.delay_seconds)}")
    for side in fabric.SIDES:
        address = bed.host_address if side == "host" else bed.switch_address
        print(f"  {side:6} namespace {bed.namespaces[side]:24} {bed.ifnames[side]:16} {address}/{fabric.PREFIX_LENGTH}")
    print("run things in it, e.g.:")
    print(f"  ip netns exec {bed.namespaces['switch']} {py} -m embtierd --listen {bed.switch_address}:"
          f"{fabric.DAEMON_PORT} --metrics-listen 127.0.0.1:{fabric.METRICS_PORT} --state-dir DIR")
    print(f"  ip netns exec {bed.namespaces['host']} {py} -m embtier.cli --target {bed.switch_address}:"
          f"{fabric.DAEMON_PORT} tables")
    print(f"remove it (and everything running in it): embtier fabric down --prefix {bed.prefix}")


def fabric_down(fabric, args) -> None:
    fabric.TestBed(args.prefix).down()
    print(f"test bed {args.prefix} is down")


def describe_qdisc(fabric, q: dict) -> str:
    shaping = ""
    if q["kind"] == "tbf":
        shaping = (f" rate {fabric.format_rate(q['rate_bits_per_second'])} burst {human_bytes(q['burst_bytes'])} "
                   f"limit {human_bytes(q['limit_bytes'])}")
    elif q["kind"] == "netem":
        shaping = f" delay {fabric.format_delay(q['delay_seconds'])} limit {q['limit_packets']} packets"
    return (f"{q['kind']} {q['handle']} parent {q['parent']}{shaping}; sent {human_bytes(q['sent_bytes'])}, "
            f"dropped {q['dropped_packets']} packets")


def fabric_status(fabric, args) -> None:
    status = fabric.TestBed(args.prefix).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return
    print(f"test bed {status['prefix']}: {'up' if status['up'] else 'not up'}")
    for side in fabric.SIDES:
        s = status[side]
        if not s["exists"]:
            print(f"  {side:6} namespace {s['namespace']}: absent")
            continue
        link = s["link"]
        where = (f"{s['ifname']} {link['state']} {' '.join(link['addresses']) or 'no address'}, sent "
                 f"{human_bytes(link['tx_bytes'])}, received {human_bytes(link['rx_bytes'])}"
                 if link else f"{s['ifname']} absent")
        print(f"  {side:6} namespace {s['namespace']}: {where}; {len(s['pids'])} processes")
        for q in s["qdiscs"]:
            print(f"           {describe_qdisc(fabric, q)}")
        if s.get("delay_by") == "netfilter queue":
            print(f"           ingress delay {fabric.format_delay(s['delay_seconds'])} (netfilter queue)")


def fabric_run(fabric, args) -> None:
    import signal
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # tear down as on Ctrl-C
    with tempfile.TemporaryDirectory(prefix="embtier-fabric-") as state, \
            fabric.TestBed(args.prefix, args.rate_bits_per_second, args.delay_seconds) as bed:
        rate = bed.rate_bits_per_second
        print(f"test bed {bed.prefix}: {bed.host_address} ({bed.namespaces['host']}) <-> {bed.switch_address} "
              f"({bed.namespaces['switch']}), {fabric.format_rate(rate)} each way, one-way delay "
              f"{fabric.format_delay(bed.delay_seconds)}", flush=True)
        daemon, target = fabric.start_daemon(bed, Path(state))
        print(f"embtierd serving on {target}; table {args.rows} x {args.dim} float32, {args.bags} bags x "
              f"{args.pooling_factor} ids per request, {args.concurrency} clients, {args.duration:g} s per mode",
              flush=True)
        out = fabric.run_host_client(bed, [
            "loadgen", "--target", target, "--ifname", bed.ifnames["host"], "--rows", str(args.rows),
            "--dim", str(args.dim), "--duration", str(args.duration), "--concurrency", str(args.concurrency),
            "--bags", str(args.bags), "--pooling-factor", str(args.pooling_factor)], timeout=120 + 3 * args.duration)
        print(f"{'mode':7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'host->switch':>13} {'switch->host':>13} {'per request to/from':>22} {'link use':>9}")
        for mode, r in json.loads(out).items():
            per = max(r["requests"], 1)
            per_request = f"{human_bytes(r['host_to_switch_bytes'] / per)} / {human_bytes(r['switch_to_host_bytes'] / per)}"
            use = max(r["host_to_switch_bytes"], r["switch_to_host_bytes"]) * 8 / r["seconds"] / rate
            print(f"{mode:7} {r['requests']:>8} {r['errors']:>6} {r['requests'] / r['seconds']:>7.1f} "
                  f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {human_bytes(r['host_to_switch_bytes']):>13} "
                  f"{human_bytes(r['switch_to_host_bytes']):>13} "
                  f"{per_request:>22} {use:>9.0%}")
        fabric.stop_process(daemon, timeout=15)
        if daemon.returncode != 0:
            print(f"embtierd exited with {daemon.returncode}; its log:\n{(Path(state) / 'embtierd.log').read_text()}",
                  file=sys.stderr)


def fabric_bench(fabric, args) -> None:
    from embtier_tools import fabric_bench as bench

    rates = [fabric.parse_rate(r) for r in args.rates.split(",")]
    pooling_factors = [int(x) for x in args.pooling_factors.split(",")]
    bench.run(rates, pooling_factors, args.rounds, args.seconds, args.prefix, args.delay_seconds)


FABRIC_COMMANDS = {"up": fabric_up, "down": fabric_down, "status": fabric_status, "run": fabric_run,
                   "bench": fabric_bench}


def run_fabric(args) -> int:
    """`embtier fabric ...`: the shaped-link test bed (embtier_tools.fabric); needs root, no daemon."""
    from embtier_tools import fabric

    try:
        args.rate_bits_per_second = fabric.parse_rate(args.rate) if "rate" in args else None
        args.delay_seconds = fabric.parse_delay(args.delay) if "delay" in args else None
        FABRIC_COMMANDS[args.fabric_command](fabric, args)
    except fabric.FabricError as e:  # a sentence of its own ("embtier fabric needs root ...")
        print(e, file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"embtier fabric: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("embtier fabric: interrupted (the test bed of this command is down)", file=sys.stderr)
        return 130
    return 0
