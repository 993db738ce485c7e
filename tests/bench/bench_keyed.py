"""Benchmark of key spaces: what MANAGED and HASHED tables cost against DENSE ones, on the same rows.

One in-process Store whose DRAM tier holds every table (no CXL, no SCM: every row of every table is
in DRAM), tables of N x 64 float32 (N = 8M, 2 GiB a table; --rows N to change it).  The protection
epochs of managed tables advance only when the benchmark says (tiering.interval_seconds 3600, and
NativeTable.keys_epoch), so that which ids may be evicted is the same on every run.

* Key-map memory: the bytes the kernels' map of a managed table allocated (keys_stats map_bytes) per
  live id with N live ids (target <= 16), and the per-row metadata the store keeps in Python for a
  managed table only (Table.written_minute), beside the per-row metadata of every table.
* Pooled lookups (Store.lookup_pooled, sum) of 4096 bags x 32 ids, ids uniform or bounded Zipf(1.05)
  with the hot rows scattered, 1 and 2 kernel threads:
  - MANAGED against DENSE (target >= 0.8): a dense table initialised at random, and a managed table
    whose N ids (distinct random int64 over the whole int64 range) were written with the dense
    table's rows, N / 1M write_rows calls (the table's rows go to the ids in the order written).  The
    managed call gets the ids whose rows are the rows the dense call reads (the id of each row from
    NativeTable.keys_of_rows), so both read the same values from the same number of distinct rows.
  - HASHED against DENSE (target >= 0.95): a hashed table (seed 7) initialised like the dense one
    (initializer uniform, same seed: the same values in the same rows).  The hashed call gets int64
    keys (the managed table's ids, drawn the same way), the dense call their hashed rows
    (embtierd.native.hash_rows), so both read the same rows.
  - MAPPED against DENSE (target >= 0.9): a mapped table initialised like the dense one whose mapping
    lists 3/4 of the managed table's ids (ids[r] -> row r, r < 3N/4: a frequency mapping's shape);
    the other quarter of the ids hash into rows [3N/4, N).  The mapped call gets those int64 keys,
    the dense call the rows they map to (embtier.keys.mapped_rows), so both read the same rows.
  Every repetition draws a fresh batch and runs the six calls (dense for managed, managed, dense for
  hashed, hashed, dense for mapped, mapped) once each on it, the order rotated by one each
  repetition, after warm-up calls.
  rows/s are from the median call time; ratio = the median over repetitions of dense time / keyed
  time (> 1: the keyed table is faster), with its 25-75 % quantiles; check = the keyed call's output
  is bitwise equal to the dense call's on the first batch, and how many managed ids were unknown.
* Inserts: Store.write_rows of new ids (distinct random int64) into an empty managed table of
  capacity N in batches of 65536 and of 4096 ids (a new table for each batch size), first filling it
  (N ids), then, full, evicting: two epochs are started first (keys_epoch twice) so that no id is
  protected, then N / 2 more new ids each take the row of an evicted one.  Each managed write is
  followed by a write of the same values to the same rows (the rows the ids took, read back untimed
  with plan_keys, which for ids that have rows changes nothing) of a dense table of N rows: the same
  batch shape on a dense table.  The two use
  value blocks of their own (neither finds the other's values in cache).  The batches of a phase are
  cut into consecutive groups; rates are ids (rows) written / the summed call times, ratio = the
  median over groups of (dense time / managed time of the group), with its 25-75 % quantiles.  A
  phase cannot be repeated on the same table, so it has no warm-up: every batch counts.  Writes are
  single-threaded; the store has no write-ahead log, so nothing is logged.

The host is shared and noisy: compared calls are interleaved in time and ratios are medians of
per-repetition (per-group) ratios.  Targets are printed, never asserted.  Each section prints its
lines as soon as it has measured them; one that fails is reported (its traceback on stderr), the
next one runs, and the exit status is 1.

Run as a script (it imports bench_kernels from its own directory):
  .venv/bin/python tests/bench/bench_keyed.py [--quick] [--rows N]
The full run takes one to two minutes on 2 cores (most of it making and loading the 2 GiB tables);
--quick (512K rows, fewer repetitions) about 10 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from bench_kernels import (
    BAG_LEN,
    BAGS,
    DISTS,
    IDS_PER_CALL,
    ZIPF_S,
    Sections,
    Timed,
    fmt_rate,
    interleave,
    log,
    ratio_stats,
    timed,
    uniform_ids,
    zipf_ids,
)
from embtier.keys import mapped_rows
from embtierd import config, native
from embtierd.keys.space import KeySpace
from embtierd.store.catalog import Store

DIM = 64
DTYPE = "float32"
THREADS = (1, 2)
HASH_SEED = 7
INIT_SEED = 11               # of the dense and hashed tables' uniform initializer
LOAD_BATCH_ROWS = 1 << 20    # ids per write_rows call when loading the managed table
INSERT_BATCHES = (65536, 4096)
EPOCH_SECONDS = 3600         # tiering.interval_seconds: epochs advance only by keys_epoch
I64 = np.iinfo(np.int64)
DENSE, MANAGED, HASHED, MAPPED = "dense", "managed", "hashed", "mapped"
TARGETS = {MANAGED: 0.8, HASHED: 0.95, MAPPED: 0.9}
LISTED_SHARE = 0.75          # of the ids the mapped table's mapping lists
MAP_BYTES_TARGET = 16


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one run."""

    rows: int
    warmup: int
    reps: int
    insert_groups: int       # consecutive groups of batches an insert phase's ratio is taken over


FULL = Plan(rows=8 << 20, warmup=3, reps=25, insert_groups=16)
QUICK = Plan(rows=1 << 19, warmup=2, reps=5, insert_groups=5)


def rows_label(rows: int) -> str:
    if rows % (1 << 20) == 0:
        return f"{rows >> 20}M"
    return f"{rows >> 10}K" if rows % (1 << 10) == 0 else str(rows)


def distinct_keys(count: int, rng: np.random.Generator) -> np.ndarray:
    """count distinct int64 ids drawn uniformly from the whole int64 range (the rare repeats redrawn)."""
    keys = rng.integers(I64.min, I64.max, size=count, dtype=np.int64, endpoint=True)
    while True:
        ordered = np.sort(keys)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if repeated.size == 0:
            return keys
        redraw = np.isin(keys, repeated)
        keys[redraw] = rng.integers(I64.min, I64.max, size=int(redraw.sum()), dtype=np.int64, endpoint=True)


def store_for(plan: Plan, state: Path) -> Store:
    """A store whose DRAM tier holds four tables of plan.rows rows (and the managed one's default row)."""
    dram = 4 * (plan.rows + 1) * native.row_stride(DIM, DTYPE) + (64 << 20)
    return Store(config.load(overrides={
        "state_dir": str(state),
        "tiers": {"dram": {"capacity": str(dram)}, "cxl": {"capacity": "0"}, "scm": {"capacity": "0"}},
        "tiering": {"enabled": False, "interval_seconds": EPOCH_SECONDS},
        "kernels": {"kernel_threads": 1}}))


def check_in_dram(store: Store, name: str) -> None:
    placed = store.describe(name).rows_by_tier
    if placed["dram"] != sum(placed.values()):
        raise RuntimeError(f"table {name}: expected every row in DRAM, placement is {placed}")


# ---- tables of the lookups --------------------------------------------------------------------------

@dataclass
class Keyed:
    """The lookup tables' ids: ids[r] is the managed id whose row is the dense table's row r, hashed[r]
    the row of the hashed table (and of the dense one) that key ids[r] reads, mapped[r] the row of the
    mapped table that key ids[r] reads."""

    ids: np.ndarray
    hashed: np.ndarray
    mapped: np.ndarray


def load_lookup_tables(store: Store, rows: int, rng: np.random.Generator) -> Keyed:
    """The dense and hashed tables (the same random values), the managed one written with the dense
    table's rows under rows distinct random ids; their ids."""
    log(f"lookup tables: creating {rows_label(rows)} x {DIM} dense and hashed")
    store.create_table(DENSE, rows, DIM, DTYPE, initializer="uniform", seed=INIT_SEED)
    store.create_table(HASHED, rows, DIM, DTYPE, initializer="uniform", seed=INIT_SEED,
                       keys=KeySpace("hashed", seed=HASH_SEED))
    store.create_table(MANAGED, rows, DIM, DTYPE, keys=KeySpace("managed"))
    log("lookup tables: writing the managed table's ids")
    ids = distinct_keys(rows, rng)
    started = time.perf_counter()
    for start in range(0, rows, LOAD_BATCH_ROWS):
        stop = min(start + LOAD_BATCH_ROWS, rows)
        values = store.lookup(DENSE, np.arange(start, stop, dtype=np.int64))
        store.write_rows(MANAGED, ids[start:stop], values)
    log(f"lookup tables: {rows} ids written in {time.perf_counter() - started:.1f} s")
    for name in (DENSE, HASHED, MANAGED):
        check_in_dram(store, name)
    live, of_rows = store.keys_of(MANAGED)
    if live != rows:
        raise RuntimeError(f"the managed table has {live} live ids after writing {rows} distinct ids")
    ids = np.array(of_rows)
    listed = int(rows * LISTED_SHARE)
    log(f"lookup tables: creating the mapped table ({listed} listed ids)")
    store.create_table(MAPPED, rows, DIM, DTYPE, initializer="uniform", seed=INIT_SEED,
                       keys=KeySpace("mapped", seed=HASH_SEED, hash_from=listed),
                       mapping=(ids[:listed].copy(), np.arange(listed, dtype=np.int64)))
    check_in_dram(store, MAPPED)
    return Keyed(ids, native.hash_rows(ids, HASH_SEED, rows),
                 mapped_rows(ids, ids[:listed], np.arange(listed), rows, listed, HASH_SEED))


def drop_tables(store: Store) -> None:
    for table in store.tables():
        store.drop_table(table.name)


# ---- key-map memory -----------------------------------------------------------------------------------

def map_memory(store: Store) -> None:
    """The managed lookup table's map and per-row metadata, per live id."""
    table = store._tables[MANAGED]
    stats = table.native.keys_stats()
    live, map_bytes = stats["live"], stats["map_bytes"]
    minutes = table.written_minute
    loc, heat = table.native.loc.itemsize, table.native.heat.itemsize
    hashed_map = store._tables[HASHED].native.keys_stats()["map_bytes"]
    print("\n".join([
        "",
        f"key-map memory: the managed table with {live} live ids (capacity {stats['capacity']})",
        (f"  kernels' map (keys_stats map_bytes): {map_bytes} B = {map_bytes / live:.2f} B per live id "
         f"(target <= {MAP_BYTES_TARGET}); allocated for the whole capacity when the table is made"),
        (f"  store, managed tables only: Table.written_minute ({minutes.dtype}, one per row) "
         f"{minutes.nbytes} B = {minutes.nbytes / live:.2f} B per live id; map and written_minute: "
         f"{(map_bytes + minutes.nbytes) / live:.2f} B per live id"),
        (f"  every table, dense too: placement entry {loc} B + heat counter {heat} B = {loc + heat} B per "
         f"row; the hashed table's map: {hashed_map} B")]), flush=True)


# ---- pooled lookups ---------------------------------------------------------------------------------

LOOKUP_COLUMNS = (("keyed", 8, "<"), ("dist", 8, "<"), ("thr", 3, ">"), ("dense rows/s", 12, ">"),
                  ("keyed rows/s", 12, ">"), ("ratio", 5, ">"), ("q25-q75", 9, ">"), ("target", 7, ">"),
                  ("check", 0, "<"))


def format_cells(columns: tuple[tuple[str, int, str], ...], cells: list[str]) -> str:
    return "  ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, columns)).rstrip()


def lookups_head(plan: Plan) -> None:
    print("\n".join([
        "",
        (f"pooled lookups (Store.lookup_pooled, sum): {BAGS} bags x {BAG_LEN} ids, {rows_label(plan.rows)} x "
         f"{DIM} f32 tables in DRAM, zipf s={ZIPF_S}; {plan.warmup} warm-up + {plan.reps} interleaved reps; "
         "ratio = dense time / keyed time (> 1: keyed faster)"),
        format_cells(LOOKUP_COLUMNS, [name for name, _, _ in LOOKUP_COLUMNS]),
        format_cells(LOOKUP_COLUMNS, ["-" * (width or 5) for _, width, _ in LOOKUP_COLUMNS])]), flush=True)


def pooled_lookups(store: Store, keyed: Keyed, plan: Plan, dist: str, rng: np.random.Generator) -> None:
    """The managed and hashed lines of one distribution, at each thread count."""
    draw = uniform_ids if dist == "uniform" else zipf_ids
    rows = draw(plan.rows, plan.warmup + plan.reps, rng)   # dense rows of the managed comparison
    batches = {"dense_m": rows, MANAGED: keyed.ids[rows], "dense_h": keyed.hashed[rows],
               HASHED: keyed.ids[rows], "dense_p": keyed.mapped[rows], MAPPED: keyed.ids[rows]}
    lengths = np.full(BAGS, BAG_LEN, dtype=np.int32)

    def pool(name: str, ids: np.ndarray, unknown: np.ndarray | None = None) -> np.ndarray:
        return store.lookup_pooled(name, ids, lengths, None, "sum", unknown=unknown)

    tables = {"dense_m": DENSE, MANAGED: MANAGED, "dense_h": DENSE, HASHED: HASHED, "dense_p": DENSE, MAPPED: MAPPED}
    for threads in THREADS:
        log(f"pooled lookups, {dist}, {threads} thread(s)")
        native.set_kernel_threads(threads)
        try:
            parts: dict[str, Timed] = {key: timed(lambda ids, t=table: pool(t, ids), batches[key])
                                       for key, table in tables.items()}
            times = interleave(parts, plan.warmup, plan.reps)
            unknown = np.zeros(1, dtype=np.int64)
            checks = {MANAGED: pool(MANAGED, batches[MANAGED][0], unknown),
                      HASHED: pool(HASHED, batches[HASHED][0]), MAPPED: pool(MAPPED, batches[MAPPED][0])}
            same = {MANAGED: np.array_equal(checks[MANAGED], pool(DENSE, batches["dense_m"][0])),
                    HASHED: np.array_equal(checks[HASHED], pool(DENSE, batches["dense_h"][0])),
                    MAPPED: np.array_equal(checks[MAPPED], pool(DENSE, batches["dense_p"][0]))}
        finally:
            native.set_kernel_threads(1)
        lines = []
        for kind, dense in ((MANAGED, "dense_m"), (HASHED, "dense_h"), (MAPPED, "dense_p")):
            ratio, (q25, q75) = ratio_stats(times[dense], times[kind])
            verdict = "ok exact" if same[kind] else "FAIL"
            if kind == MANAGED:
                verdict += f", {int(unknown[0])} unknown"
            lines.append(format_cells(LOOKUP_COLUMNS, [
                kind, dist, str(threads), fmt_rate(IDS_PER_CALL / statistics.median(times[dense])),
                fmt_rate(IDS_PER_CALL / statistics.median(times[kind])), f"{ratio:.2f}",
                f"{q25:.2f}-{q75:.2f}", f">= {TARGETS[kind]}", verdict]))
        print("\n".join(lines), flush=True)


# ---- inserts ------------------------------------------------------------------------------------------

INSERT_COLUMNS = (("batch", 6, ">"), ("phase", 16, "<"), ("ids", 8, ">"), ("managed ids/s", 13, ">"),
                  ("dense rows/s", 12, ">"), ("ratio", 5, ">"), ("q25-q75", 9, ">"), ("evictions", 9, ">"),
                  ("s", 5, ">"))


def inserts_head(plan: Plan) -> None:
    print("\n".join([
        "",
        (f"inserts (Store.write_rows of new ids): a managed table of capacity {rows_label(plan.rows)} x "
         f"{DIM} f32 filled from empty, then full and evicting, against the same rows and values "
         f"written to a dense table; ratio = median over groups of batches (up to {plan.insert_groups} "
         "a phase) of dense time / managed time (> 1: managed faster); s = the phase's managed seconds"),
        format_cells(INSERT_COLUMNS, [name for name, _, _ in INSERT_COLUMNS]),
        format_cells(INSERT_COLUMNS, ["-" * (width or 5) for _, width, _ in INSERT_COLUMNS])]), flush=True)


@dataclass
class Phase:
    """Call times of an insert phase, batch by batch."""

    ids: int
    managed: list[float] = field(default_factory=list)
    dense: list[float] = field(default_factory=list)


def insert_phase(store: Store, names: tuple[str, str], keys: np.ndarray, values: dict[str, np.ndarray],
                 batch: int) -> Phase:
    """Writes keys, batch by batch, into the managed table names[0], each batch then to the rows it took
    in the dense table names[1]."""
    managed, dense = names
    keymap = store._tables[managed].native
    phase = Phase(keys.size)
    for start in range(0, keys.size, batch):
        ids = keys[start:start + batch]
        began = time.perf_counter()
        store.write_rows(managed, ids, values[managed][:ids.size])
        phase.managed.append(time.perf_counter() - began)
        rows, _ = keymap.plan_keys(ids)
        began = time.perf_counter()
        store.write_rows(dense, rows, values[dense][:ids.size])
        phase.dense.append(time.perf_counter() - began)
    return phase


def insert_line(batch: int, label: str, phase: Phase, groups: int, evictions: int) -> str:
    managed, dense = np.asarray(phase.managed), np.asarray(phase.dense)
    ratios = [dense[g].sum() / managed[g].sum()
              for g in np.array_split(np.arange(managed.size), min(groups, managed.size))]
    q25, ratio, q75 = np.percentile(ratios, [25, 50, 75])
    managed_s, dense_s = managed.sum(), dense.sum()
    return format_cells(INSERT_COLUMNS, [
        str(batch), label, str(phase.ids),
        fmt_rate(phase.ids / managed_s), fmt_rate(phase.ids / dense_s), f"{ratio:.2f}",
        f"{q25:.2f}-{q75:.2f}", str(evictions), f"{managed_s:.1f}"])


def inserts(store: Store, plan: Plan, batch: int, rng: np.random.Generator) -> None:
    """Both phases at one batch size, on tables of their own (dropped after)."""
    names = (f"insert_managed_{batch}", f"insert_dense_{batch}")
    log(f"inserts, batch {batch}: creating the tables")
    try:
        store.create_table(names[0], plan.rows, DIM, DTYPE, keys=KeySpace("managed"))
        store.create_table(names[1], plan.rows, DIM, DTYPE)
        for name in names:
            check_in_dram(store, name)
        keymap = store._tables[names[0]].native
        keys = distinct_keys(plan.rows + plan.rows // 2, rng)
        values = {name: rng.random((batch, DIM), dtype=np.float32) - np.float32(0.5) for name in names}
        log(f"inserts, batch {batch}: filling")
        fill = insert_phase(store, names, keys[:plan.rows], values, batch)
        full = keymap.keys_stats()
        if full["live"] != plan.rows:
            raise RuntimeError(f"{names[0]}: {full['live']} live ids after {plan.rows} distinct inserts")
        lines = [insert_line(batch, "fill from empty", fill, plan.insert_groups, full["evictions"])]
        keymap.keys_epoch()
        keymap.keys_epoch()
        log(f"inserts, batch {batch}: evicting")
        evict = insert_phase(store, names, keys[plan.rows:], values, batch)
        evictions = keymap.keys_stats()["evictions"] - full["evictions"]
        lines.append(insert_line(batch, "full, evicting", evict, plan.insert_groups, evictions))
        print("\n".join(lines), flush=True)
    finally:
        for name in names:
            if name in {t.name for t in store.tables()}:
                store.drop_table(name)


# ---- main ---------------------------------------------------------------------------------------------

def header(plan: Plan, quick: bool, state: Path) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return "\n".join([
        f"embtier key-space benchmark ({'quick' if quick else 'full'} run, {plan.rows} rows a table)",
        (f"host: {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, Linux {platform.release()}, "
         f"THP {thp.read_text().strip() if thp.exists() else '?'}; ISA {native.isa()}; "
         f"numpy {np.__version__}"),
        (f"tables {DIM} x {DTYPE}, every row in DRAM (CXL and SCM tiers empty); managed epochs only by "
         f"keys_epoch (tiering.interval_seconds {EPOCH_SECONDS}); state dir {state}")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512K-row tables, few repetitions (about 10 s)")
    parser.add_argument("--rows", type=int,
                        help="rows of every table (ids of the managed ones), at least 1024")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.rows is not None:
        if args.rows < 1024:
            parser.error(f"--rows must be at least 1024, got {args.rows}")
        plan = replace(plan, rows=args.rows)
    state = Path(tempfile.mkdtemp(prefix="embtier-bench-keyed-"))
    sections = Sections()
    started = time.perf_counter()
    rng = np.random.default_rng(2024)
    print(header(plan, args.quick, state), flush=True)
    store = store_for(plan, state)
    try:
        keyed: list[Keyed] = []
        if sections.run("loading the lookup tables",
                        lambda: keyed.append(load_lookup_tables(store, plan.rows, rng))):
            sections.run("key-map memory", map_memory, store)
            lookups_head(plan)
            for dist in DISTS:
                sections.run(f"pooled lookups, {dist}", pooled_lookups, store, keyed[0], plan, dist, rng)
        keyed.clear()
        drop_tables(store)
        inserts_head(plan)
        for batch in INSERT_BATCHES:
            sections.run(f"inserts, batch {batch}", inserts, store, plan, batch, rng)
    finally:
        store.close()
        shutil.rmtree(state, ignore_errors=True)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s", flush=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
