"""embtier: the command line of the embtier daemon.

    embtier [--target ADDR] tables | describe T | create T --rows N --dim D [--key-space K] | drop T
            | import T FILE.npy | import-torch MODEL.pt [--tensor KEY=T] | lookup T ID... | tiers | heat T
            | policy T [--set ...]
            | record T --ids N -o FILE.npy | simulate FILE.npy [--dram SIZES] [--cxl SIZES]
            | bench --table T ... | bench --scenario FILE [--streams N | --load X] [--capacity]
            | checkpoint [--kind K --bits B] | checkpoints | restore ID
            | fabric up|down|status|run|bench   (the shaped-link test bed; root)
            | mapping build --trace FILE.npy --kind K --rows N -o FILE.npz | mapping stats | mapping export T
    embtier --cluster NAME@HOST:PORT[,...] tables | describe T | create T ... [--sharding S --shards N
            --replicas R] | drop T | import T FILE.npy | lookup T ID... | checkpoint
            | cluster status | cluster plan [--workload FILE.toml] [--apply]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .client import Client, EmbtierClientError, TlsOptions
from .sizes import parse_bytes
from .wire import (
    CHECKPOINT_KINDS,
    DTYPES,
    INITIALIZERS,
    KEY_SPACES,
    POLICIES,
    POOL_MODES,
    QUANT_BITS,
    QUANTIZERS,
    TIERS,
    TableInfo,
)


def default_target() -> str:
    """The daemon's default Unix socket if one exists, else its default TCP port."""
    candidates = [Path("/run/embtier/embtierd.sock")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "embtier" / "embtierd.sock")
    for path in candidates:
        if path.exists():
            return f"unix://{path}"
    return "127.0.0.1:50051"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(info: TableInfo) -> str:
    tiers = ", ".join(f"{t} {info.rows_by_tier.get(t, 0)}" for t in TIERS)
    keys = "" if info.key_space == "dense" else f"  ({info.key_space} ids)"
    return f"{info.name:24} {info.num_rows:>12} x {info.dim:<5} {info.dtype:8} v{info.version:<6} rows: {tiers}{keys}"


def cmd_tables(c: Client, args) -> None:
    for info in c.tables():
        print(format_table(info))


def cmd_describe(c: Client, args) -> None:
    info = c.describe(args.name)
    print(format_table(info))
    for tier in TIERS:
        emulated = " (emulated)" if info.emulated_by_tier.get(tier) else ""
        print(f"  {tier:5} {info.rows_by_tier.get(tier, 0):>12} rows  "
              f"{human_bytes(info.bytes_by_tier.get(tier, 0)):>12}{emulated}")
        if tier == "cxl" and info.rows_by_port:
            print("        ports: " + ", ".join(f"{port} {n}" for port, n in info.rows_by_port.items()))
    print(f"  metadata {human_bytes(info.metadata_bytes)} ({info.metadata_bytes / info.num_rows:.2f} bytes/row)")
    print(f"  keys {describe_keys(info)}")


def describe_keys(info: TableInfo) -> str:
    """What a table's ids are, and for a managed table how its map is doing."""
    if info.key_space == "hashed":
        return f"hashed (seed {info.key_seed}): any int64 id, row = embtier.keys.hashed_rows(id, {info.num_rows}, seed)"
    if info.key_space == "mapped":
        return (f"mapped (seed {info.key_seed}): {info.mapped_ids} listed ids, map {human_bytes(info.map_bytes)}; any "
                f"other id hashes into rows [{info.mapping_hash_from}, {info.num_rows}) (embtier.keys.mapped_rows)")
    if info.key_space != "managed":
        return f"{info.key_space}: ids are rows in [0, {info.num_rows})"
    per_id = f"{info.map_bytes / info.live_ids:.2f} bytes/live id" if info.live_ids else "no live ids"
    return (f"managed: {info.live_ids} live ids of {info.num_rows}, {info.key_evictions} evicted "
            f"({info.recent_key_evictions} written within the hour before), {info.unknown_ids} unknown looked up, "
            f"default value {info.default_value:g}; map {human_bytes(info.map_bytes)} ({per_id}, "
            f"{info.map_bytes / info.num_rows:.2f} bytes/row)")


def cmd_create(c: Client, args) -> None:
    mapping, key_space, key_seed = {}, args.key_space, args.key_seed
    if args.mapping:  # a mapped table: the file's mapping, seed and rows
        from embtier_tools.mapping import Mapping

        try:
            m = Mapping.load(args.mapping)
        except ValueError as e:
            raise SystemExit(f"embtier create: --mapping {e}") from None
        if m.num_rows != args.rows:
            raise SystemExit(f"embtier create: --mapping {args.mapping} maps onto {m.num_rows} rows, not --rows "
                             f"{args.rows}")
        if key_space not in ("dense", "mapped") or (args.key_seed and args.key_seed != m.seed):
            raise SystemExit("embtier create: --mapping makes a mapped table with the file's seed; drop "
                             "--key-space and --key-seed, or give the file's")
        mapping = {"mapping_ids": m.ids, "mapping_rows": m.rows, "mapping_hash_from": m.hash_from}
        key_space, key_seed = "mapped", m.seed
    elif args.mapping_from:
        mapping, key_space = {"mapping_from": args.mapping_from}, "mapped"
    if args.cluster:
        mapping.update(sharding=args.sharding, shards=args.shards, replicas=args.replicas)
    print(format_table(c.create_table(args.name, args.rows, args.dim, args.dtype, args.init, args.seed,
                                      args.scale, key_space=key_space, default_value=args.default_value,
                                      key_seed=key_seed, **mapping)))


def cmd_drop(c: Client, args) -> None:
    c.drop_table(args.name)


def cmd_tiers(c: Client, args) -> None:
    for t in c.tiers():
        where = t.path or (f"NUMA node {t.numa_node}" if t.numa_node >= 0 else "")
        print(f"{t.name:5} {human_bytes(t.used_bytes):>12} used of {human_bytes(t.capacity_bytes):>12}  "
              f"{'emulated ' if t.emulated else ''}{where}")
        for p in t.ports:
            node = f"NUMA node {p.numa_node}" if p.numa_node >= 0 else "emulated"
            print(f"  port {p.name:5} {human_bytes(p.used_bytes):>10} used of {human_bytes(p.capacity_bytes):>10}  "
                  f"{node}")


def cmd_heat(c: Client, args) -> None:
    bins, tiers = c.heat(args.name)
    width = 40
    most = max((n for counts in tiers.values() for n in counts), default=1) or 1
    print(f"heat of {args.name} (sampled access counts, aged by the tiering policy), rows per bin:")
    for tier, counts in tiers.items():
        print(f"  {tier} ({sum(counts)} rows)")
        for label, n in zip(bins, counts):
            bar = "#" * max(1 if n else 0, round(width * n / most))
            print(f"    {label:>8} {n:>12}  {bar}")


def size_or_none(text: str) -> int:
    """A size in bytes ("64M", "1G", 4096), or -1 for "none" (no limit)."""
    if text.lower() == "none":
        return -1
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_policy(c: Client, args) -> None:
    changes = {"policy": args.policy, "pin_tier": None if args.pin is None else ("" if args.pin == "none" else args.pin),
               "dram_capacity_bytes": args.dram, "cxl_capacity_bytes": args.cxl}
    p = c.set_policy(args.name, **changes) if any(v is not None for v in changes.values()) else c.policy(args.name)

    def limit(n: int) -> str:
        return "none (the tier's capacity)" if n < 0 else human_bytes(n)

    print(f"table {p.table}: policy {p.policy}, pinned to {p.pin_tier or 'no tier'}")
    print(f"  own limit in dram: {limit(p.dram_capacity_bytes)}, in cxl: {limit(p.cxl_capacity_bytes)}")
    state = "on" if p.tiering_enabled else "off"
    print(f"  engine {state}: every {p.interval_seconds:g} s, budget {human_bytes(p.bandwidth_bytes_per_second)}/s; "
          f"last interval moved {p.rows_moved} rows, backlog {p.migration_backlog_rows} rows")


def cmd_record(c: Client, args) -> None:
    trace = c.record_trace(args.name, args.ids, args.timeout)
    out = Path(args.output)
    np.save(out, trace.ids)
    np.save(out.with_suffix(".bags.npy"), trace.lengths)  # the bags the ids came in (embtier mapping build)
    meta = {"table": args.name, "num_rows": trace.num_rows, "row_bytes": trace.row_bytes,
            "dram_rows": trace.dram_rows, "cxl_rows": trace.cxl_rows, "seconds": trace.seconds,
            "interval_seconds": trace.interval_seconds, "bandwidth_bytes_per_second": trace.bandwidth_bytes_per_second,
            "heat_sample_shift": trace.heat_sample_shift, "policy": trace.policy,
            "key_space": trace.key_space, "key_seed": trace.key_seed}
    if trace.key_space == "mapped":  # what `embtier simulate` maps the ids to rows with
        from embtier_tools.mapping import Mapping

        exported = c.export_mapping(args.name)
        Mapping(exported.ids, exported.rows, exported.num_rows, exported.hash_from, exported.seed,
                "exported").save(out.with_suffix(".mapping.npz"))
        meta["mapping_file"] = out.with_suffix(".mapping.npz").name
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    rate = trace.ids.size / trace.seconds if trace.seconds > 0 else float("nan")
    print(f"recorded {trace.ids.size} ids in {trace.lengths.size} bags of {args.name} in {trace.seconds:.1f} s "
          f"({rate:,.0f} ids/s) -> {out} (+ {out.with_suffix('.json').name}: what `embtier simulate {out}` needs to "
          f"replay it; {out.with_suffix('.bags.npy').name}: the bags)")


def cmd_simulate(args) -> None:
    from embtier_tools import commands

    commands.simulate_trace(args)


def cmd_bench(c: Client, args) -> None:
    from embtier_tools import commands

    commands.bench(c, args)


def cmd_fabric(args) -> int:
    from embtier_tools import commands

    return commands.run_fabric(args)


def describe_checkpoint(info) -> str:
    quant = f"{info.quant_bits}-bit {info.quantizer}" if info.quant_bits else "exact"
    parent = f" on {info.parent_id}" if info.parent_id else ""
    return f"{info.id:>6} {info.kind + parent:<22} {quant:<16} {info.rows_written:>12} {human_bytes(info.bytes_written):>10}"


CHECKPOINT_HEADER = f"{'id':>6} {'kind':<22} {'values':<16} {'rows':>12} {'bytes':>10}"


def cmd_checkpoint(c: Client, args) -> None:
    taken = c.checkpoint(args.kind, args.bits, args.quantizer)
    for node, info in (taken.items() if isinstance(taken, dict) else [("", taken)]):  # (a cluster: each daemon's)
        print(f"{node}:" if node else CHECKPOINT_HEADER)
        if node:
            print(CHECKPOINT_HEADER)
        print(describe_checkpoint(info))
        print(f"in {info.duration_seconds:.2f} s (writes held {info.snapshot_seconds * 1e3:.1f} ms), covering the "
              f"log up to record {info.lsn}")


def cmd_checkpoints(c: Client, args) -> None:
    listed = c.checkpoints()
    print(f"{CHECKPOINT_HEADER}  {'log up to':>9}  created (UTC)        restart")
    for info in listed:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(info.created_unix_seconds))
        usable = ("DAMAGED: " + info.damage if info.damage else
                  "recovers from it" if info.exact_chain else "lossy: restore only")
        print(f"{describe_checkpoint(info)}  {info.lsn:>9}  {created}  {usable}")
    if not listed:
        print("(no checkpoints)")


def cmd_restore(c: Client, args) -> None:
    restored, saved = c.restore(args.id)
    published = (f"published as full checkpoint {saved.id} in {saved.duration_seconds:.2f} s" if saved else
                 "its full checkpoint could not be written (the log holds the restore; see the daemon's log)")
    print(f"restored checkpoint {restored.id} ({', '.join(restored.tables) or 'no tables'}); {published}")


def cmd_lookup(c: Client, args) -> None:
    ids = np.array(args.ids, dtype=np.int64)
    if args.pooled:
        out, _, unknown = c.lookup_pooled_counted({args.name: (ids, np.array([ids.size], np.int32))}, mode=args.mode)
        rows, unknown = out[args.name], unknown[args.name]
    else:
        rows, unknown = c.lookup_counted(args.name, ids)
    np.set_printoptions(precision=5, suppress=True, linewidth=120)
    print(rows)
    if unknown:
        print(f"{unknown} of the {ids.size} ids are unknown to {args.name} (they read its default row)")


def progress(done: int, total: int, start: float) -> None:
    width = 40
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - start, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows  {rate:,.0f} rows/s")
    sys.stderr.flush()


def cmd_import(c: Client, args) -> None:
    values = np.load(args.file, mmap_mode="r")
    if values.ndim != 2:
        raise SystemExit(f"{args.file}: expected a 2-D array [rows, dim], got shape {values.shape}")
    rows, dim = values.shape
    if args.create:
        c.create_table(args.name, rows, dim, args.dtype)
    start = time.monotonic()
    for first in range(0, rows, args.chunk_rows):
        chunk = np.ascontiguousarray(values[first:first + args.chunk_rows], dtype=np.float32)
        c.write_rows(args.name, np.arange(first, first + chunk.shape[0]), chunk)
        progress(first + chunk.shape[0], rows, start)
    sys.stderr.write("\n")


def cmd_import_torch(c: Client, args) -> None:
    try:
        from .torch import tables as transfer
    except ImportError as e:
        raise SystemExit(f"embtier import-torch needs torch ({e}): pip install 'embtier[torch]'") from None
    chosen = dict(args.tensor) if args.tensor else None
    bar = StageBar()
    try:
        found = transfer.tables_in_file(args.file, chosen)
        for table, weight in found.items():
            name = args.prefix + table
            rows, dim = weight.shape
            started = time.monotonic()
            created = transfer.ensure_table(c, name, rows, dim, args.dtype or transfer.default_storage(weight))
            transfer.write_table(c, name, weight, bar)
            bar.close()
            seconds = time.monotonic() - started
            print(f"{name}: {rows} x {dim} {str(weight.dtype).removeprefix('torch.')} -> "
                  f"{'new' if created else 'existing'} {c.describe(name).dtype} table in {seconds:.1f} s "
                  f"({rows / max(seconds, 1e-9):,.0f} rows/s)")
    except (ValueError, TypeError) as e:
        raise SystemExit(f"embtier import-torch: {e}") from None
    finally:
        bar.close()


def tensor_choice(text: str) -> tuple[str, str]:
    """KEY=TABLE -> (KEY, TABLE)."""
    key, _, table = text.rpartition("=")
    if not key or not table:
        raise argparse.ArgumentTypeError(f"expected KEY=TABLE, got {text!r}")
    return key, table


class StageBar:
    """progress(stage, done, total) callbacks drawn as a bar on stderr, one line per stage."""

    WIDTH = 40

    def __init__(self) -> None:
        self.stage: str | None = None
        self.started = self.drawn = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.close()
            self.stage, self.started = stage, now
        elif done < total and now - self.drawn < 0.1:
            return
        self.drawn = now
        filled = int(self.WIDTH * done / max(total, 1))
        sys.stderr.write(f"\r{stage:<20} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total}  "
                         f"{now - self.started:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        """Ends the current stage's line."""
        if self.stage is not None:
            sys.stderr.write("\n")
            self.stage = None


def cmd_mapping_build(args) -> None:
    from embtier_tools import mapping

    if args.from_table and args.kind != "learned":
        raise ValueError(f"--from-table gives learned its vectors; --kind is {args.kind}")
    if args.frequent_share is not None and args.kind == "hash":
        raise ValueError("--frequent-share is for the frequency and learned kinds")
    trace = mapping.load_trace(args.trace)
    options = {} if args.frequent_share is None else {"frequent_share": args.frequent_share}
    bar = StageBar()
    started = time.monotonic()
    with ExitStack() as stack:
        stack.callback(bar.close)
        if args.from_table:
            client = stack.enter_context(connect(args))
            options["vectors"] = lambda ids: client.lookup(args.from_table, ids)
        built = mapping.BUILDERS[args.kind](trace, args.rows, seed=args.seed, progress=bar, **options)
    built.save(args.output)
    print(f"{args.kind} mapping onto {built.num_rows} rows from {trace.ids.size} accesses: {built.ids.size} ids listed, "
          f"any other id hashed into rows [{built.hash_from}, {built.num_rows}) with seed {built.seed}; "
          f"{time.monotonic() - started:.1f} s -> {args.output}")


def cmd_mapping_stats(args) -> None:
    from embtier_tools import mapping

    trace = mapping.load_trace(args.trace)
    built = mapping.Mapping.load(args.mapping)
    groups = mapping.load_groups(args.groups) if args.groups else None
    print(f"{args.mapping}: {built.kind} mapping, {built.ids.size} ids listed, any other id hashed into rows "
          f"[{built.hash_from}, {built.num_rows}) with seed {built.seed}")
    print(mapping.format_stats(mapping.stats(built, trace, groups)))


def cmd_mapping_export(args) -> None:
    from embtier_tools import mapping

    with connect(args) as client:
        exported = client.export_mapping(args.name)
    table = mapping.Mapping(exported.ids, exported.rows, exported.num_rows, exported.hash_from, exported.seed,
                            "exported")
    table.save(args.output)
    print(f"{args.name}: {table.ids.size} ids listed, any other id hashed into rows [{table.hash_from}, "
          f"{table.num_rows}) with seed {table.seed} -> {args.output}")


MAPPING_COMMANDS = {"build": cmd_mapping_build, "stats": cmd_mapping_stats, "export": cmd_mapping_export}


def cmd_mapping(args) -> None:
    """`embtier mapping ...`: build and stats run offline; export and build --from-table ask the daemon."""
    try:
        MAPPING_COMMANDS[args.mapping_command](args)
    except ValueError as e:
        raise SystemExit(f"embtier mapping {args.mapping_command}: {e}") from None


def add_mapping_commands(sub) -> None:
    from embtier_tools.mapping import BUILDERS

    s = sub.add_parser("build", help="a mapping built from a recorded trace (FILE.npy and its FILE.bags.npy), "
                       "for `embtier create --key-space mapped --mapping FILE`")
    s.add_argument("--trace", required=True, help="FILE.npy of ids from `embtier record`; co-access is counted "
                   "within the bags of FILE.bags.npy")
    s.add_argument("--kind", required=True, choices=list(BUILDERS),
                   help="hash: the hashing trick (nothing listed); frequency: the most frequent ids a row each, the "
                   "others hashed into the rest; learned: as frequency, the other ids seen clustered into the rest "
                   "by co-access (or by --from-table's rows), so that ids used alike share rows")
    s.add_argument("--rows", type=int, required=True, help="rows of the table the mapping is for")
    s.add_argument("--frequent-share", type=float, help="frequency, learned: the share of the rows that the most "
                   "frequent ids get, one each (default 0.5)")
    s.add_argument("--seed", type=int, default=0, help="the hash's seed (0 to 2^64-1; learned: also of its random "
                   "vectors)")
    s.add_argument("--from-table", metavar="T", help="learned: embed the ids by table T's rows (read from the "
                   "daemon) instead of by their co-access")
    s.add_argument("-o", "--output", required=True, help="the mapping file (.npz)")
    s = sub.add_parser("stats", help="how a mapping's rows are shared by the ids of a trace")
    s.add_argument("--trace", required=True, help="FILE.npy of ids")
    s.add_argument("--mapping", required=True, help="a mapping file (.npz, from build or export)")
    s.add_argument("--groups", help=".npz with arrays ids and groups (integers): how the colliding pairs fall "
                   "within groups, against chance")
    s = sub.add_parser("export", help="the mapping of a mapped table, into a mapping file")
    s.add_argument("name")
    s.add_argument("-o", "--output", required=True, help="the mapping file (.npz)")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="embtier", description="Command line of the embtier daemon.")
    p.add_argument("--target", default=os.environ.get("EMBTIER_TARGET") or default_target(),
                   help="daemon address: unix:///path or host:port (default: %(default)s)")
    p.add_argument("--cluster", default=os.environ.get("EMBTIER_CLUSTER"), metavar="NAME@HOST:PORT[,...]",
                   help="a cluster of daemons (its name and etcd endpoints) instead of one --target")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.add_argument("--ca", help="PEM CA that signed the daemon's certificate (TLS over TCP)")
    p.add_argument("--cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--key", help="PEM key of --cert")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("tables", help="list tables")
    sub.add_parser("tiers", help="tiers, capacity and use")
    s = sub.add_parser("describe", help="one table, per tier")
    s.add_argument("name")
    s = sub.add_parser("create", help="create a table")
    s.add_argument("name")
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--dim", type=int, required=True)
    s.add_argument("--dtype", default="float32", choices=list(DTYPES))
    s.add_argument("--init", default="zeros", choices=list(INITIALIZERS))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=0.0, help="uniform range; 0 = 1/sqrt(rows)")
    s.add_argument("--key-space", default="dense", choices=list(KEY_SPACES),
                   help="dense: ids are rows; hashed: any int64 id, hashed to a row; managed: any int64 id, a row "
                        "of its own from its first write (the coldest id is evicted when full); mapped: give "
                        "--mapping")
    s.add_argument("--default-value", type=float, default=0.0, help="managed: what unknown ids read")
    s.add_argument("--key-seed", type=int, default=0, help="hashed: the hash's seed (0 to 2^64-1)")
    s.add_argument("--mapping", metavar="FILE.npz",
                   help="a mapped table with this mapping (from `embtier mapping build` or `export`): its listed "
                        "ids, rows, seed and hashed range; --rows must be the file's")
    s.add_argument("--mapping-from", metavar="TABLE",
                   help="a mapped table with the mapping of mapped table TABLE (e.g. the model's previous version)")
    s.add_argument("--sharding", choices=["table", "row", "column"],
                   help="--cluster: how to shard it (default: whole on one daemon when it fits, else row-wise)")
    s.add_argument("--shards", type=int, default=0, help="--cluster: how many shards (default: one per daemon)")
    s.add_argument("--replicas", type=int, default=1, help="--cluster: copies of each shard (default: 1)")
    s = sub.add_parser("drop", help="drop a table")
    s.add_argument("name")
    s = sub.add_parser("import", help="write a .npy file [rows, dim] into a table, in chunks")
    s.add_argument("name")
    s.add_argument("file")
    s.add_argument("--create", action="store_true", help="create the table first, shaped like the file")
    s.add_argument("--dtype", default="float32", choices=list(DTYPES))
    s.add_argument("--chunk-rows", type=int, default=65536)
    s = sub.add_parser("import-torch", help="write the embedding tables of a saved PyTorch or TorchRec "
                       "state_dict into tables (streamed; tables created as needed, or must match)")
    s.add_argument("file", metavar="MODEL.pt", help="torch.save(model.state_dict(), MODEL.pt); every "
                   "embedding_bags.NAME.weight (TorchRec's EmbeddingBagCollection) becomes table NAME")
    s.add_argument("--tensor", action="append", type=tensor_choice, metavar="KEY=TABLE",
                   help="instead, load the 2-D tensor KEY as table TABLE (repeatable)")
    s.add_argument("--prefix", default="", help="the tables' names start with this")
    s.add_argument("--dtype", choices=list(DTYPES), help="storage of the tables it creates (default: float16 "
                   "for float16 weights, else float32)")
    s = sub.add_parser("heat", help="heat histogram of a table, per tier")
    s.add_argument("name")
    s = sub.add_parser("policy", help="a table's tiering policy; with options, change it")
    s.add_argument("name")
    s.add_argument("--policy", choices=list(POLICIES), help="lfu: LFU with aging; lru: promote on access")
    s.add_argument("--pin", choices=[*TIERS, "none"], help="keep every row in one tier")
    s.add_argument("--dram", type=size_or_none, help="the table's own DRAM limit (\"512M\"; none = no limit)")
    s.add_argument("--cxl", type=size_or_none, help="the table's own CXL limit")
    s = sub.add_parser("record", help="record the ids of a table's next lookups into a .npy trace")
    s.add_argument("name")
    s.add_argument("--ids", type=int, required=True, help="how many ids to record")
    s.add_argument("--timeout", type=float, default=60.0, help="stop after this many seconds")
    s.add_argument("-o", "--output", required=True, help="FILE.npy (FILE.json gets what simulate needs)")
    s = sub.add_parser("simulate", help="predict tier hit ratios of an id trace for candidate tier sizes")
    s.add_argument("trace", help=".npy of ids (from `embtier record`, or any int array)")
    s.add_argument("--dram", type=size_or_none, action="append", help="candidate DRAM size (repeatable)")
    s.add_argument("--cxl", type=size_or_none, action="append", help="candidate CXL size (repeatable)")
    s.add_argument("--policy", choices=list(POLICIES), action="append", help="policy to simulate (repeatable)")
    s.add_argument("--granularity", choices=["row", "page"], action="append",
                   help="row (embtier) or page (4 KiB pages, as kernel tiering); repeatable; default row")
    s.add_argument("--rows", type=int, help="rows in the table (default: from the trace's .json)")
    s.add_argument("--row-bytes", type=int, help="bytes per stored row (default: from the trace's .json)")
    s.add_argument("--ids-per-interval", type=int, help="lookups per policy interval (default: recorded rate)")
    s.add_argument("--budget", type=size_or_none, help="migration bytes per interval (default: the daemon's)")
    s.add_argument("--sample-shift", type=int, help="heat counts 1 in 2^K accesses (default: the recorded daemon's, "
                   "else 3)")
    s.add_argument("--warmup-intervals", type=int, default=10)
    s = sub.add_parser("checkpoint", help="write a checkpoint of every table (exact ones shorten the write-ahead log)")
    s.add_argument("--kind", default="full", choices=list(CHECKPOINT_KINDS),
                   help="incremental: rows changed since the last checkpoint; differential: since the last full; "
                   "auto: differential until a full is cheaper (default: %(default)s)")
    s.add_argument("--bits", type=int, default=0, choices=QUANT_BITS, help="bits per value, 0 = exact")
    s.add_argument("--quantizer", default="adaptive", choices=list(QUANTIZERS))
    sub.add_parser("checkpoints", help="list the checkpoints")
    s = sub.add_parser("restore", help="replace every table by a checkpoint's (see `embtier checkpoints`)")
    s.add_argument("id", type=int)
    s = sub.add_parser("lookup", help="print rows, or their pooled sum")
    s.add_argument("name")
    s.add_argument("ids", type=int, nargs="+")
    s.add_argument("--pooled", action="store_true")
    s.add_argument("--mode", default="sum", choices=list(POOL_MODES))
    s = sub.add_parser("bench", help="load generator: Zipf ids, pooled or raw lookups; or an XRBench-style "
                       "usage scenario, scored (--scenario)")
    workload = s.add_mutually_exclusive_group(required=True)
    workload.add_argument("--table", action="append", help="table to read (repeatable)")
    workload.add_argument("--scenario", help="a scenario file (deploy/scenarios/*.toml): its tenants at their "
                          "frame rates and deadlines, its tables created if missing")
    s.add_argument("--streams", type=int, help="--scenario: concurrent streams (users) of the scenario, each "
                   "every model at its frame rate and deadline (default 1)")
    s.add_argument("--load", type=float, help="--scenario: instead of --streams, X times the capacity in streams "
                   "(measured first, as --capacity): round(X x capacity) streams")
    s.add_argument("--capacity", action="store_true", help="--scenario: measure the requests/s of its mix "
                   "closed-loop with --concurrency requests in flight (and the streams that offer it) instead")
    s.add_argument("--duration", type=float, default=10.0)
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--bags", type=int, default=512)
    s.add_argument("--pooling-factor", type=int, default=32)
    s.add_argument("--alpha", type=float, default=1.05)
    s.add_argument("--raw", action="store_true", help="Lookup the raw rows instead of LookupPooled")
    s = sub.add_parser("mapping", help="id -> row mappings of mapped tables: build one from a recorded trace, "
                       "measure its collisions, export a table's",
                       description="Mappings of mapped tables (listed ids -> rows, any other id hashed into the "
                       "rows from hash_from on). Record a trace (embtier record T --ids N -o trace.npy), build "
                       "a mapping from it (embtier mapping build --trace trace.npy --kind learned --rows N -o "
                       "m.npz), compare kinds (embtier mapping stats --trace trace.npy --mapping m.npz), create "
                       "the table with it (embtier create T2 ... --key-space mapped --mapping m.npz). The "
                       "kinds and the file are described in embtier_tools/mapping.py.")
    add_mapping_commands(s.add_subparsers(dest="mapping_command", required=True))
    s = sub.add_parser("cluster", help="a cluster of daemons (needs --cluster): status, and plans by the cost "
                       "model", description=cluster_doc())
    cluster_sub = s.add_subparsers(dest="cluster_command", required=True)
    cluster_sub.add_parser("status", help="live daemons, the plan in force, shards and replicas")
    c = cluster_sub.add_parser("plan", help="place the tables by the cost model; print predicted load and memory "
                               "per daemon and why each table got its sharding")
    c.add_argument("--workload", metavar="FILE.toml", help="per table: pooling factor, request rate, replicas, a "
                   "recorded trace; new tables with their num_rows and dim")
    c.add_argument("--replicas", type=int, default=1, help="copies of each shard where the workload gives none")
    c.add_argument("--apply", action="store_true", help="put the plan into effect (moving rows while serving)")
    s = sub.add_parser("fabric", help="the shaped-link test bed (root): host and switch network namespaces "
                       "joined by a veth pair shaped with tc")
    fabric_sub = s.add_subparsers(dest="fabric_command", required=True)
    for name, text in (("up", "bring the test bed up and leave it up"),
                       ("down", "remove the test bed and stop everything running in it"),
                       ("status", "what exists: namespaces, veth, addresses, qdiscs, processes"),
                       ("run", ("bring the test bed up, serve embtierd in the switch namespace, run the load "
                                "generator (pooled, then raw) in the host namespace, tear down")),
                       ("bench", ("the PIFS comparison: LookupPooled latency with offload host, device and switch "
                                  "per link rate and pooling factor, measured, beside the modelled fabric"))):
        f = fabric_sub.add_parser(name, help=text)
        f.add_argument("--prefix", default="embtier", help="namespaces PREFIX-host and PREFIX-switch "
                       "(default: %(default)s)")
        if name in ("up", "run"):  # (bench takes --rates)
            f.add_argument("--rate", default="10gbit", help="rate of the host link, each way: 100mbit, 1gbit, "
                           "25gbit (default: %(default)s)")
        if name in ("up", "run", "bench"):
            f.add_argument("--delay", default="0", help="one-way delay of the host link: 50us, 1ms (netem, or "
                           "netfilter queues where the kernel has no netem; default: %(default)s)")
        if name == "status":
            f.add_argument("--json", action="store_true")
        if name == "bench":
            f.add_argument("--rates", default="1gbit,10gbit,25gbit", help="link rates, comma-separated "
                           "(default: %(default)s)")
            f.add_argument("--pooling-factors", default="8,32,128")
            f.add_argument("--rounds", type=int, default=30, help="requests per mode per cell (default: %(default)s)")
            f.add_argument("--seconds", type=float, default=40.0, help="at most this long per cell")
        if name == "run":
            f.add_argument("--rows", type=int, default=100_000)
            f.add_argument("--dim", type=int, default=64)
            f.add_argument("--duration", type=float, default=5.0, help="seconds per mode")
            f.add_argument("--concurrency", type=int, default=2)
            f.add_argument("--bags", type=int, default=512)
            f.add_argument("--pooling-factor", type=int, default=32)
    args = p.parse_args(argv)
    if args.command == "simulate":
        args.granularity = args.granularity or ["row"]
    return args


COMMANDS = {"tables": cmd_tables, "describe": cmd_describe, "create": cmd_create, "drop": cmd_drop,
            "tiers": cmd_tiers, "heat": cmd_heat, "lookup": cmd_lookup, "import": cmd_import,
            "import-torch": cmd_import_torch, "bench": cmd_bench,
            "policy": cmd_policy, "record": cmd_record, "checkpoint": cmd_checkpoint,
            "checkpoints": cmd_checkpoints, "restore": cmd_restore}


CLUSTER_COMMANDS = ("tables", "describe", "create", "drop", "lookup", "import", "checkpoint", "cluster")


def cluster_doc() -> str:
    from embtier_tools import cluster_cli
    return cluster_cli.__doc__


def connect(args):
    """A Client of --target, or with --cluster a ClusterClient (the same methods, routed by the shard plan)."""
    tls = TlsOptions(args.ca, args.cert, args.key) if args.ca else None
    if args.cluster:
        from .cluster.client import ClusterClient
        try:
            return ClusterClient(args.cluster, timeout=args.timeout, tls=tls)
        except ValueError as e:
            raise SystemExit(f"embtier: --cluster: {e}") from None
    return Client(args.target, timeout=args.timeout, tls=tls)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "simulate":  # offline: no daemon needed
        cmd_simulate(args)
        return 0
    if args.command == "fabric":  # the test bed: no daemon to connect to
        return cmd_fabric(args)
    if args.command == "cluster" and not args.cluster:
        raise SystemExit("embtier cluster: give --cluster NAME@HOST:PORT (or set EMBTIER_CLUSTER)")
    if args.cluster and args.command not in CLUSTER_COMMANDS:
        raise SystemExit(f"embtier {args.command}: not offered with --cluster (it offers "
                         f"{', '.join(CLUSTER_COMMANDS)}); give --target to run it on one daemon")
    if not args.cluster and args.command == "create" and (args.sharding or args.shards or args.replicas != 1):
        raise SystemExit("embtier create: --sharding, --shards and --replicas need --cluster")
    try:
        if args.command == "mapping":
            cmd_mapping(args)
            return 0
        with connect(args) as client:
            if args.command == "cluster":
                from embtier_tools import cluster_cli
                return cluster_cli.main(client, args)
            COMMANDS[args.command](client, args)
    except (EmbtierClientError, ConnectionError) as e:  # (ConnectionError: a cluster's etcd unreachable)
        print(f"embtier: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
