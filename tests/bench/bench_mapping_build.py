"""Benchmark of the mapping builders (embtier_tools.mapping): build time and collisions of the hash,
frequency and learned mappings of one synthetic trace, measured in one run.

The trace: N distinct ids (random int64; 1M, --ids to change it) in groups of 32 at random; the id
of popularity rank r (ranks in random order of the ids) is accessed 1 + floor(K / r^1.05) times, K
set for 5 accesses per id on average (about half of them are accessed once, the most popular
about a tenth of a million times per million ids).  Every group's accesses are shuffled and cut
into bags of 20 (a group's last bag shorter), and the bags shuffled: every bag draws its ids from
one group, so ids of a group are co-accessed and nothing else is.  The table has N / 10 rows
(--rows), half of them for the frequent ids (--frequent-share 0.5).

Per kind: build seconds (one build: the figures are minutes at 10M ids, and the host is shared),
distinct ids per second, and the build time in sorts of the trace (np.sort of the trace's ids,
timed just before each build: a yardstick of the host's speed at that moment).  The hash builder
does nothing per id, so it is the baseline of the collisions, not of the time: per kind the
share of accesses to a row another id shares, and the share of colliding pairs of ids within one
group, each also as a ratio to the hash mapping's.  The chance level of the latter, for a pair of
the trace's ids drawn at random, is sum over groups of g (g - 1) / (N (N - 1)), about 31 / N.

Each section prints its lines as soon as it has measured them; one that fails is reported (its
traceback on stderr), the next one runs, and the exit status is 1.

Run as a script (it imports bench_kernels and bench_keyed from its own directory):
  .venv/bin/python tests/bench/bench_mapping_build.py [--ids 10000000]
About 10 s at 1M ids on 2 cores; at 10M ids about 3 minutes and 2.5 GB of memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_kernels import Sections, fmt_rate, log
from bench_keyed import distinct_keys
from embtier_tools import mapping

GROUP_SIZE = 32
ACCESSES_PER_ID = 5
BAG_LEN = 20
ZIPF_S = 1.05
ROWS_PER_ID = 0.1
KINDS = ("hash", "frequency", "learned")


@dataclass(frozen=True)
class Planted:
    """A trace whose bags each draw from one group of ids, and the groups."""

    trace: mapping.Trace
    ids: np.ndarray
    groups: np.ndarray


def planted_trace(num_ids: int, rng: np.random.Generator) -> Planted:
    """The module docstring's trace of num_ids distinct ids."""
    ids = distinct_keys(num_ids, rng)
    weights = np.arange(1, num_ids + 1, dtype=np.float64) ** -ZIPF_S
    counts = 1 + np.floor(weights * ((ACCESSES_PER_ID - 1) * num_ids / weights.sum())).astype(np.int64)
    del weights
    groups = rng.permutation(num_ids) // GROUP_SIZE
    # accesses grouped by group, shuffled within it: one sort of (group, random, id index) packed
    id_bits = max(1, (num_ids - 1).bit_length())
    group_bits = max(1, int(groups.max()).bit_length())
    random_bits = 63 - id_bits - group_bits
    which = np.repeat(np.arange(num_ids, dtype=np.int64), counts)
    packed = (groups[which] << (random_bits + id_bits)) | (rng.integers(0, 1 << random_bits, which.size)
                                                            << id_bits) | which
    del which
    packed.sort()
    which = packed & ((1 << id_bits) - 1)
    group_runs = packed >> (random_bits + id_bits)
    del packed
    starts = np.flatnonzero(np.r_[True, group_runs[1:] != group_runs[:-1]])
    del group_runs
    in_group = np.arange(which.size) - np.repeat(starts, np.diff(np.append(starts, which.size)))
    bag_starts = np.flatnonzero(in_group % BAG_LEN == 0)
    del in_group
    lengths = np.diff(np.append(bag_starts, which.size))
    order = rng.permutation(lengths.size)
    shuffled = lengths[order]
    access = np.repeat(bag_starts[order] - (np.cumsum(shuffled) - shuffled), shuffled) + np.arange(which.size)
    return Planted(mapping.Trace(ids[which[access]], shuffled), ids, groups)


def trace_summary(planted: Planted, num_rows: int, frequent_share: float) -> str:
    trace = planted.trace
    n = planted.ids.size
    chance = (GROUP_SIZE - 1) / (n - 1)
    return "\n".join([
        (f"trace: {trace.ids.size} accesses of {n} distinct ids in {trace.lengths.size} bags (up to {BAG_LEN} ids, "
         f"one group each); {-(-n // GROUP_SIZE)} groups of {GROUP_SIZE}; Zipf s={ZIPF_S} popularity"),
        (f"table: {num_rows} rows ({num_rows / n:.2f} per distinct id), frequent share {frequent_share}; "
         f"chance that a pair of ids is in one group: {chance:.3g} (31 / (N - 1))")])


COLUMNS = (("kind", 9, "<"), ("build s", 8, ">"), ("ids/s", 8, ">"), ("sorts", 6, ">"), ("listed", 9, ">"),
           ("shared acc", 10, ">"), ("x hash", 6, ">"), ("same-group", 10, ">"), ("x hash", 8, ">"),
           ("x chance", 9, ">"), ("busiest row", 0, "<"))


def format_cells(cells: list[str]) -> str:
    return "  ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS)).rstrip()


def table_head() -> str:
    return "\n".join([
        "",
        ("per kind: build seconds, distinct ids/s (hash: none, it reads nothing), the build in sorts of the "
         "trace's ids, ids listed;"),
        ("  accesses to a shared row and colliding pairs within one group, as shares and as ratios to hash's (and "
         "to chance)"),
        format_cells([name for name, _, _ in COLUMNS]),
        format_cells(["-" * (width or 11) for _, width, _ in COLUMNS])])


def measure_kind(kind: str, planted: Planted, num_rows: int, frequent_share: float, baseline: dict) -> None:
    trace = planted.trace
    began = time.perf_counter()
    np.sort(trace.ids)
    sort_seconds = time.perf_counter() - began
    options = {} if kind == "hash" else {"frequent_share": frequent_share}
    log(f"building {kind}")
    began = time.perf_counter()
    built = mapping.BUILDERS[kind](trace, num_rows, seed=1, progress=stage_logger(kind), **options)
    seconds = time.perf_counter() - began
    log(f"collision statistics of {kind}")
    s = mapping.stats(built, trace, (planted.ids, planted.groups))
    baseline.setdefault("stats", s)
    base = baseline["stats"]
    print(format_cells([
        kind, f"{seconds:.2f}", "-" if kind == "hash" else fmt_rate(planted.ids.size / seconds),
        f"{seconds / sort_seconds:.2f}", str(built.ids.size), f"{s.shared_access_share:.1%}",
        f"{s.shared_access_share / base.shared_access_share:.2f}", f"{s.same_group_share:.3g}",
        f"{s.same_group_share / base.same_group_share:.3g}",
        f"{s.same_group_share / s.chance_same_group_share:.3g}",
        f"{s.busiest_row_ids} ids, {s.busiest_row_accesses} acc"]), flush=True)


def stage_logger(kind: str):
    """A progress callback that logs each stage's start and end on stderr."""
    started: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in started:
            started[stage] = time.perf_counter()
            log(f"{kind}: {stage}")
        if done == total:
            log(f"{kind}: {stage} done in {time.perf_counter() - started[stage]:.1f} s")
    return progress


def header(num_ids: int) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return "\n".join([
        f"embtier mapping-build benchmark ({num_ids} distinct ids)",
        (f"host: {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, Linux {platform.release()}, "
         f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=1_000_000, help="distinct ids of the trace (default 1M)")
    parser.add_argument("--rows", type=int, help="rows of the table (default: a tenth of --ids)")
    parser.add_argument("--frequent-share", type=float, default=0.5)
    args = parser.parse_args()
    if args.ids < 1000:
        parser.error(f"--ids must be at least 1000, got {args.ids}")
    num_rows = args.rows or round(args.ids * ROWS_PER_ID)
    sections = Sections()
    started = time.perf_counter()
    print(header(args.ids), flush=True)
    planted: list[Planted] = []
    log("making the trace")
    if sections.run("making the trace", lambda: planted.append(planted_trace(args.ids, np.random.default_rng(2024)))):
        print(trace_summary(planted[0], num_rows, args.frequent_share), flush=True)
        print(table_head(), flush=True)
        baseline: dict = {}
        for kind in KINDS:
            sections.run(kind, measure_kind, kind, planted[0], num_rows, args.frequent_share, baseline)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s", flush=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
