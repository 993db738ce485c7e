"""Benchmark of embtier's lookup kernels against PyTorch and numpy, on the same data in one run.

The host is shared and noisy (absolute rates drift by tens of percent within minutes), so every
comparison is made between calls interleaved in time, and ratios are taken per repetition:

* Pooled lookups (Store.lookup_pooled, mode sum) of 4096 bags x 32 ids from DRAM-resident
  tables of 2 GiB (8M x 64 float32, 4M x 128 float32) and of the same 8M rows stored as float16
  and int8, ids uniform or bounded Zipf(1.05) with hot rows scattered, 1 and 2 threads.
  Baselines: torch.nn.functional.embedding_bag(mode="sum") (FBGEMM's JIT kernel on CPU) in two
  persistent worker subprocesses, one with THP_MEM_ALLOC_ENABLE=1 (torch's large allocations on
  transparent huge pages) and one without; both run with OMP_WAIT_POLICY=PASSIVE so that their
  idle OpenMP threads sleep instead of spinning on the second core while our kernel runs.  Each
  worker loads the weights (copied into a torch-allocated tensor, so THP applies) and all id
  batches once per case from .npy files in the state dir, then times single calls on request
  over a line protocol on stdin/stdout (JSON replies); only the call itself is timed.
  numpy (np.take + np.add.reduceat, one thread) runs in this process.  For int8 the torch
  reference is the float32 table (F.embedding_bag has no int8 form); FBGEMM's 8-bit row-wise op
  (embedding_bag_byte_rowwise_offsets) is shown for context.
  Per case, dist and thread count: warm-up calls, then R repetitions; repetition i runs every
  participant (ours, torch without THP, torch with THP, ...) once on the same fresh id batch i,
  the order rotated by one each repetition.  rows/s and GB/s (rows x stored row bytes) are from
  the median call time of each participant.  "torch best" is the THP setting with the faster
  median; a line's ratio is the median over repetitions of (torch best time_i / line time_i)
  (> 1 = faster than torch best), printed with its 25-75 % quantile range.  R id batches are
  drawn per dist (R x 32 MiB of f32 rows gathered, more than the 260 MiB L3).  Results are
  checked against torch once per case and dist.
  For 8M x 64 f32 two extra lines time ours with heat_sample_shift=0 (heat counted on every
  access; the default counts 1 access in 8; at 1 thread) and with heat_sample_shift=16 (1 access
  in 65536: tracking as good as off; at 1 and 2 threads), interleaved with the rest; their ratio
  is against ours with the default sampling, and the note "tracking overhead" is how much longer
  ours takes than ours with tracking off.  Each reads the same table as ours, so it runs on id
  batches of its own (same distribution, same hot rows): on ours' batch it would find most rows
  still in L3 from ours' call just before.  (The torch workers and numpy
  hold copies of their own, so they cannot warm the cache for one another or for us.)
* Read-bandwidth reference: torch.sum over a 2 GiB float32 tensor in both torch workers (1 and 2
  threads) and numpy a.sum() in this process (1 thread), interleaved; GB/s from the median.
* The SCM path: random single-row lookups (Store.lookup of 4096 ids a call) from a table that
  lives only on the O_DIRECT file, at SCM queue depths 32 / 64 / 128, next to fio 4 KiB random
  reads (io_uring, O_DIRECT) on a file in the same directory.  fio at iodepth 32 runs before
  and after each of our queue depths; our ratio is against the mean of the two fio runs around
  it.  fio at iodepth 1 runs once at the end.  Without fio (not on PATH) our lookups run alone,
  without a ratio, and the output says that the fio comparison was skipped.

Each section (the bandwidth reference, each table, the SCM path) prints its lines of the table
as soon as it has measured them; a section that fails is reported, its traceback on stderr, and
the next one runs (with fresh torch workers); the exit status is 1 if any failed.

Run:  .venv/bin/python tests/bench/bench_kernels.py [--quick] [--dir PARENT_OF_STATE_DIR]
--quick shrinks tables and repetitions to check the script end to end in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from embtierd import config, native
from embtierd.store.catalog import Store

BAGS = 4096
BAG_LEN = 32
IDS_PER_CALL = BAGS * BAG_LEN
ZIPF_S = 1.05
VALUE_RANGE = 1.0            # table values are uniform in [-0.5, 0.5)
WRITE_BATCH_ROWS = 1 << 20
SCM_IDS_PER_CALL = 4096
SCM_QUEUE_DEPTHS = (32, 64, 128)
DISTS = ("uniform", "zipf")
SHORT_DTYPE = {"float32": "f32", "float16": "f16", "int8": "int8"}
TORCH_BEST = "torch best"
FIO_SKIPPED = ("fio comparison skipped: fio is not installed (no fio on PATH; `make bench` installs it with "
               "apt-get when run as root); our SCM lookups ran alone, without a ratio")


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one run."""

    rows_64: int             # rows of the dim-64 tables (the dim-128 table has half)
    warmup: int
    reps: int
    threads: tuple[int, ...]
    bandwidth_bytes: int
    bandwidth_reps: int
    scm_rows: int
    scm_seconds: float       # timed seconds of our SCM lookups per queue depth
    fio_size: str
    fio_runtime: int


FULL = Plan(rows_64=8 << 20, warmup=3, reps=25, threads=(1, 2), bandwidth_bytes=2 << 30, bandwidth_reps=7,
            scm_rows=1 << 20, scm_seconds=5.0, fio_size="1G", fio_runtime=5)
QUICK = Plan(rows_64=1 << 20, warmup=2, reps=5, threads=(1, 2), bandwidth_bytes=256 << 20, bandwidth_reps=3,
             scm_rows=128 << 10, scm_seconds=0.5, fio_size="256M", fio_runtime=1)


@dataclass(frozen=True)
class TableCase:
    rows: int
    dim: int
    dtype: str

    @property
    def label(self) -> str:
        rows = f"{self.rows >> 20}M" if self.rows % (1 << 20) == 0 else f"{self.rows >> 10}K"
        return f"{rows} x {self.dim} {SHORT_DTYPE[self.dtype]}"


@dataclass
class Line:
    """One line of the result table."""

    case: str
    impl: str
    threads: str
    rate: float | None       # rows/s (IOPS for fio)
    gbps: float | None
    ratio: float | None = None
    spread: tuple[float, float] | None = None   # 25 % and 75 % quantiles of the per-rep ratio
    vs: str = ""
    check: str = ""


@dataclass
class Report:
    """The lines measured so far; a section hands its lines and notes to add() as soon as it has them."""

    lines: list[Line] = field(default_factory=list)
    bandwidth: dict[int, float] = field(default_factory=dict)   # threads -> best sequential GB/s
    skipped: list[str] = field(default_factory=list)            # comparisons left out, and why

    def add(self, lines: Sequence[Line], notes: Sequence[str] = ()) -> None:
        """Prints lines as rows of the table and notes under them, flushed; keeps the lines for the summary."""
        self.lines += lines
        print("\n".join([format_row(line_cells(ln)) for ln in lines] + [f"  - {n}" for n in notes]), flush=True)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Sections:
    """Runs the sections of a benchmark one after another (the other benchmarks use it too).  A section
    prints its own figures as soon as it has measured them; one that fails is reported (a line on stdout,
    its traceback on stderr) and the next one runs."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def run(self, name: str, measure: Callable[..., object], *args: object) -> bool:
        """measure(*args); False, once reported, if it raised."""
        try:
            measure(*args)
        except Exception as e:  # noqa: BLE001 - reported; the next section runs
            traceback.print_exc()
            print(f"{name}: FAILED, {type(e).__name__}: {e} (traceback on stderr)", flush=True)
            self.failed.append(name)
            return False
        return True

    def exit_code(self) -> int:
        """0 if every section ran; else 1, after a line naming the failed ones."""
        if not self.failed:
            return 0
        print(f"failed sections: {'; '.join(self.failed)}", flush=True)
        return 1


def bag_offsets() -> np.ndarray:
    return np.arange(0, IDS_PER_CALL, BAG_LEN, dtype=np.int64)


def anon_huge_mib() -> float:
    """AnonHugePages of this process, in MiB."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---- torch worker (a persistent subprocess: THP_MEM_ALLOC_ENABLE is read when torch starts) -----

def torch_worker() -> None:
    """Serves one command per stdin line, one JSON reply per line on the original stdout.

    load DIR DTYPE Q8      weights DIR/weight.npy (as DTYPE) and DIR/ids_<dist>.npy for every dist;
                           Q8=1 also packs the weights for FBGEMM's 8-bit row-wise op
    run KIND:DIST T B      one call (KIND fp or q8) on id batch B with T threads -> {"t": seconds}
    save KIND:DIST B PATH  output of batch B (1 thread) as float32 .npy
    unload                 frees weights and ids
    bwalloc BYTES          a float32 tensor of ones;  bw T -> {"t": seconds of one torch.sum};  bwfree
    quit"""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # stray prints of libraries go to stderr, not into the protocol

    import torch
    import torch.nn.functional as F

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    st: dict = {}
    offsets = torch.from_numpy(bag_offsets())

    def call(kind: str, batch: torch.Tensor) -> torch.Tensor:
        if kind == "q8":
            return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(st["packed"], batch, offsets, mode=0)
        return F.embedding_bag(batch, st["weight"], offsets, mode="sum")

    def set_threads(n: int) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)

    reply({"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()})
    with torch.inference_mode():
        for line in sys.stdin:
            cmd, *args = line.split()
            try:
                if cmd == "run":
                    kind, dist = args[0].split(":")
                    set_threads(int(args[1]))
                    batch = st["ids"][dist][int(args[2])]
                    start = time.perf_counter()
                    call(kind, batch)
                    reply({"t": time.perf_counter() - start})
                elif cmd == "bw":
                    set_threads(int(args[0]))
                    start = time.perf_counter()
                    float(st["bw"].sum())
                    reply({"t": time.perf_counter() - start})
                elif cmd == "load":
                    src = np.load(Path(args[0]) / "weight.npy", mmap_mode="r")
                    weight = torch.empty(src.shape, dtype=getattr(torch, args[1]))
                    weight.numpy()[...] = src   # torch-allocated: THP_MEM_ALLOC_ENABLE applies to it
                    del src
                    st["weight"] = weight
                    st["ids"] = {d: torch.from_numpy(np.load(Path(args[0]) / f"ids_{d}.npy")) for d in DISTS}
                    if args[2] == "1":
                        st["packed"] = torch.ops.quantized.embedding_bag_byte_prepack(weight)
                    reply({"huge_mib": anon_huge_mib()})
                elif cmd == "save":
                    kind, dist = args[0].split(":")
                    set_threads(1)
                    np.save(args[2], call(kind, st["ids"][dist][int(args[1])]).float().numpy())
                    reply({})
                elif cmd == "unload":
                    for key in ("weight", "ids", "packed"):
                        st.pop(key, None)
                    reply({})
                elif cmd == "bwalloc":
                    st["bw"] = torch.ones(int(args[0]) // 4, dtype=torch.float32)
                    reply({"huge_mib": anon_huge_mib()})
                elif cmd == "bwfree":
                    st.pop("bw", None)
                    reply({})
                elif cmd == "quit":
                    reply({})
                    return
                else:
                    reply({"error": f"unknown command {cmd!r}"})
            except Exception as e:  # noqa: BLE001 - reported to the main process
                reply({"error": f"{cmd}: {type(e).__name__}: {e}"})


class TorchWorker:
    """The main process's handle on one torch worker."""

    def __init__(self, thp: bool):
        self.thp = thp
        self.name = f"torch THP={int(thp)}"
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        if thp:
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--torch-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello: dict | None = None

    def exited(self) -> RuntimeError:
        return RuntimeError(f"{self.name} worker exited (code {self.proc.wait()}); see its stderr above")

    def send(self, *words: object) -> None:
        try:
            self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self.exited() from None

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise self.exited()
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} worker: {reply['error']}")
        return reply

    def call(self, *words: object) -> dict:
        self.send(*words)
        return self.recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
                self.proc.wait(timeout=30)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def start_workers() -> list[TorchWorker]:
    """The two torch workers (THP off, THP on), each past its hello."""
    log("starting the torch workers")
    workers: list[TorchWorker] = []
    try:
        for thp in (False, True):
            workers.append(TorchWorker(thp))
        for w in workers:
            w.hello = w.recv()
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: list[TorchWorker]) -> None:
    for w in workers:
        w.close()


def call_all(workers: list[TorchWorker], *words: object) -> list[dict]:
    """The same command on every worker, run concurrently."""
    for w in workers:
        w.send(*words)
    return [w.recv() for w in workers]


# ---- interleaved timing -------------------------------------------------------------------------

Timed = Callable[[int], float]   # batch index -> seconds of one call


def interleave(participants: dict[str, Timed], warmup: int, reps: int) -> dict[str, list[float]]:
    """Call times per participant: warmup calls each (batches 0..warmup-1), then for rep i every
    participant once on batch warmup+i, the order rotated by i."""
    names = list(participants)
    for b in range(warmup):
        for name in names:
            participants[name](b)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(participants[name](warmup + i))
    return times


def ratio_stats(ref: list[float], this: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and (q25, q75) over reps of ref_i / this_i (> 1: this is faster)."""
    q25, med, q75 = np.percentile(np.asarray(ref) / np.asarray(this), [25, 50, 75])
    return float(med), (float(q25), float(q75))


def bw_timer(worker: TorchWorker, threads: int) -> Timed:
    return lambda _: worker.call("bw", threads)["t"]


def worker_timer(worker: TorchWorker, what: str, threads: int) -> Timed:
    return lambda b: worker.call("run", what, threads, b)["t"]


# ---- data ---------------------------------------------------------------------------------------

def random_values(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, dim] float32 uniform in [-VALUE_RANGE/2, VALUE_RANGE/2), filled in place by batches."""
    values = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, WRITE_BATCH_ROWS):
        part = values[start:start + WRITE_BATCH_ROWS]
        rng.random(part.shape, dtype=np.float32, out=part)
        part -= np.float32(VALUE_RANGE / 2)
    return values


def uniform_ids(rows: int, batches: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, rows, size=(batches, IDS_PER_CALL), dtype=np.int64)


def zipf_ids(rows: int, batches: int, rng: np.random.Generator, s: float = ZIPF_S) -> np.ndarray:
    """Bounded Zipf(s) over the rows: rank k drawn with P ~ 1/k^s (CDF + searchsorted), ranks
    mapped to rows by a random permutation so that hot rows are scattered over the table."""
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -s)
    cdf /= cdf[-1]
    rank_to_row = rng.permutation(rows).astype(np.int64)
    ranks = np.searchsorted(cdf, rng.random((batches, IDS_PER_CALL)), side="right")
    return rank_to_row[np.minimum(ranks, rows - 1)]


def load_table(store: Store, name: str, case: TableCase, values: np.ndarray, tier: str) -> None:
    """Creates the table, writes values into it and checks that every row lives on tier."""
    store.create_table(name, case.rows, case.dim, dtype=case.dtype)
    for start in range(0, case.rows, WRITE_BATCH_ROWS):
        stop = min(start + WRITE_BATCH_ROWS, case.rows)
        store.write_rows(name, np.arange(start, stop, dtype=np.int64), values[start:stop])
    placed = store.describe(name).rows_by_tier
    if placed.get(tier) != case.rows:
        raise RuntimeError(f"table {name}: expected all {case.rows} rows on {tier}, placement is {placed}")


def check(ours: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> str:
    err = float(np.abs(ours - ref).max())
    ok = np.allclose(ours, ref, atol=atol, rtol=rtol)
    return f"{'ok' if ok else 'FAIL'} {err:.1e}"


def tolerance(dtype: str) -> tuple[float, float]:
    """(atol, rtol) of ours vs torch's reference for a storage dtype.

    float16: both sum the same fp16 rows, torch rounds its output to fp16 (rel. 2^-11).
    int8: each stored element is within scale/2 = (max - min)/510 <= VALUE_RANGE/510 of the
    float32 value torch sums, so a bag of BAG_LEN rows is within BAG_LEN * VALUE_RANGE / 510."""
    if dtype == "float16":
        return 2e-3, 2e-3
    if dtype == "int8":
        return BAG_LEN * VALUE_RANGE / 510 + 1e-5, 1e-5
    return 1e-5, 1e-5


# ---- DRAM pool kernel ---------------------------------------------------------------------------

def table_cases(plan: Plan) -> list[TableCase]:
    return [TableCase(plan.rows_64, 64, "float32"), TableCase(plan.rows_64 // 2, 128, "float32"),
            TableCase(plan.rows_64, 64, "float16"), TableCase(plan.rows_64, 64, "int8")]


def numpy_pool(table: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    offsets = bag_offsets()
    if table.dtype == np.float16:
        return lambda ids: np.add.reduceat(np.take(table, ids, axis=0).astype(np.float32), offsets, axis=0)
    return lambda ids: np.add.reduceat(np.take(table, ids, axis=0), offsets, axis=0)


def timed(fn: Callable[[np.ndarray], object], batches: Sequence[np.ndarray], before: Callable[[], None] | None = None
          ) -> Timed:
    """Seconds of fn(batches[b]); before() runs untimed first."""
    def run(b: int) -> float:
        if before:
            before()
        batch = batches[b]
        start = time.perf_counter()
        fn(batch)
        return time.perf_counter() - start
    return run


def timed_line(case: str, threads: int, impl: str, times: list[float], ref: list[float], row_bytes: int,
               vs: str, verdict: str) -> Line:
    """A pool line: rates from the median call time, ratio and quartiles of ref_i / times_i."""
    rate = IDS_PER_CALL / statistics.median(times)
    ratio, spread = ratio_stats(ref, times)
    return Line(case, impl, str(threads), rate, rate * row_bytes / 1e9, ratio, spread, vs, verdict)


def bench_table(store: Store, cfg: config.Config, case: TableCase, plan: Plan, state: Path,
                workers: list[TorchWorker], report: Report) -> None:
    """All lines of one table (ours, torch THP off / on, [q8], numpy), interleaved, each thread count's
    printed when measured; the table and its files are dropped after, also when a step fails."""
    work = state / "case"
    work.mkdir()
    name = f"bench_{case.dim}_{case.dtype}"
    try:
        measure_table(store, cfg, case, plan, work, name, workers, report)
    finally:
        native.set_kernel_threads(1)
        if name in {t.name for t in store.tables()}:
            store.drop_table(name)
        shutil.rmtree(work, ignore_errors=True)


def measure_table(store: Store, cfg: config.Config, case: TableCase, plan: Plan, work: Path, name: str,
                  workers: list[TorchWorker], report: Report) -> None:
    """bench_table's measurements, with work as the directory of the files shared with the workers."""
    log(f"table {case.label}: generating and loading")
    rng = np.random.default_rng([case.rows, case.dim, len(case.dtype)])
    values = random_values(case.rows, case.dim, rng)
    load_table(store, name, case, values, "dram")
    batches = plan.warmup + plan.reps
    # The tracking-overhead participant reads the same table as ours, so it gets batches of its own
    # (drawn with the same hot rows): on the same batch the second of the two would find the rows in L3.
    tracking_case = case.dim == 64 and case.dtype == "float32"
    drawn = batches + (2 * plan.reps if tracking_case else 0)
    ids = {"uniform": uniform_ids(case.rows, drawn, rng), "zipf": zipf_ids(case.rows, drawn, rng)}
    distinct = np.unique(ids["zipf"][0]).size / IDS_PER_CALL
    case_notes = [f"{case.label}: a zipf batch has {100 * distinct:.0f}% distinct rows"]
    ref_table = values.astype(np.float16) if case.dtype == "float16" else values
    del values
    np.save(work / "weight.npy", ref_table)
    for dist, arr in ids.items():
        np.save(work / f"ids_{dist}.npy", arr[:batches])
    q8 = case.dtype == "int8"
    torch_dtype = "float16" if case.dtype == "float16" else "float32"
    log(f"table {case.label}: loading the torch workers")
    for w, info in zip(workers, call_all(workers, "load", work, torch_dtype, int(q8))):
        case_notes.append(f"{case.label}: {w.name} worker AnonHugePages {info['huge_mib']:.0f} MiB after load")
    (work / "weight.npy").unlink()

    ours_table = store._tables[name].native
    default_knobs = (cfg.kernels.prefetch_distance, cfg.kernels.heat_sample_shift)
    every_knobs = (cfg.kernels.prefetch_distance, 0)
    off_knobs = (cfg.kernels.prefetch_distance, 16)
    lengths = np.full(BAGS, BAG_LEN, dtype=np.int32)

    def pool(batch: np.ndarray) -> np.ndarray:
        return store.lookup_pooled(name, batch, lengths, None, "sum")

    ours_bytes = native.row_stride(case.dim, case.dtype)
    ref_bytes = case.dim * ref_table.itemsize
    atol, rtol = tolerance(case.dtype)
    for dist in DISTS:
        label = f"{case.label} {dist}"
        workers[0].call("save", f"fp:{dist}", 0, work / f"fp_{dist}.npy")
        ref_out = np.load(work / f"fp_{dist}.npy")
        q8_verdict = ""
        if q8:
            workers[0].call("save", f"q8:{dist}", 0, work / f"q8_{dist}.npy")
            q8_verdict = check(np.load(work / f"q8_{dist}.npy"), ref_out, atol, rtol)
        for threads in plan.threads:
            log(f"table {case.label} {dist}, {threads} thread(s)")
            native.set_kernel_threads(threads)
            parts: dict[str, Timed] = {
                "ours": timed(pool, ids[dist], lambda: ours_table.configure(*default_knobs))}
            track = tracking_case and threads == 1
            if track:
                parts["every"] = timed(pool, ids[dist][plan.reps:], lambda: ours_table.configure(*every_knobs))
            if tracking_case:
                parts["off"] = timed(pool, ids[dist][2 * plan.reps:], lambda: ours_table.configure(*off_knobs))
            for w in workers:
                parts[f"fp{int(w.thp)}"] = worker_timer(w, f"fp:{dist}", threads)
                if q8:
                    parts[f"q8{int(w.thp)}"] = worker_timer(w, f"q8:{dist}", threads)
            if threads == 1:
                parts["numpy"] = timed(numpy_pool(ref_table), ids[dist])
            times = interleave(parts, plan.warmup, plan.reps)

            ours_table.configure(*default_knobs)
            verdict = check(pool(ids[dist][0]), ref_out, atol, rtol)
            med = {k: statistics.median(v) for k, v in times.items()}
            best = times["fp1"] if med["fp1"] < med["fp0"] else times["fp0"]

            times["best"] = best
            notes = []
            specs = []   # (impl, key of times, row bytes, check, key of the reference times, vs)
            specs.append(("ours lookup_pooled", "ours", ours_bytes, verdict, "best", TORCH_BEST))
            if track:
                ours_table.configure(*every_knobs)
                every_verdict = check(pool(ids[dist][0]), ref_out, atol, rtol)
                ours_table.configure(*default_knobs)
                specs.append(("ours, heat on every access (tracking overhead)", "every", ours_bytes, every_verdict,
                              "ours", f"ours (1 in {1 << default_knobs[1]})"))
                ratio, spread = ratio_stats(best, times["every"])
                notes.append(f"{label}: ours with heat on every access vs torch best: {ratio:.2f} "
                             f"({spread[0]:.2f}-{spread[1]:.2f})")
            if tracking_case:
                specs.append(("ours, heat on 1 access in 65536 (tracking off)", "off", ours_bytes, "", "ours",
                              f"ours (1 in {1 << default_knobs[1]})"))
                ratio, spread = ratio_stats(times["ours"], times["off"])
                notes.append(f"{label}, {threads} thr: tracking overhead (ours / ours with tracking off): "
                             f"{ratio - 1:+.1%} ({spread[0] - 1:+.1%} to {spread[1] - 1:+.1%}; target <= 3 %)")
            impl = "torch embedding_bag" + (" (f32 weights)" if q8 else "")
            torch_bytes = case.dim * (2 if case.dtype == "float16" else 4)
            specs += [(impl, "fp0", torch_bytes, "", "best", TORCH_BEST),
                      (impl + " THP", "fp1", torch_bytes, "", "best", TORCH_BEST)]
            if q8:
                key = "q81" if med["q81"] < med["q80"] else "q80"
                specs.append((f"torch q8 byte_rowwise ({'THP' if key == 'q81' else 'no THP'}, the faster)", key,
                              case.dim + 8, q8_verdict if threads == 1 else "", "best", TORCH_BEST))
                ratio, spread = ratio_stats(times[key], times["ours"])
                notes.append(f"{label}, {threads} thr: ours vs torch q8 byte_rowwise: {ratio:.2f} "
                             f"({spread[0]:.2f}-{spread[1]:.2f})")
            if "numpy" in times:
                numpy_impl = {"float16": "numpy take+reduceat (f16 rows, f32 sum)",
                              "int8": "numpy take+reduceat (f32 weights)"}.get(case.dtype, "numpy take+reduceat")
                specs.append((numpy_impl, "numpy", ref_bytes, "", "best", TORCH_BEST))
            report.add([timed_line(label, threads, impl, times[key], times[ref], row_bytes, vs, line_check)
                        for impl, key, row_bytes, line_check, ref, vs in specs], notes)
    case_notes.append(f"{case.label}: our process AnonHugePages {anon_huge_mib():.0f} MiB (table loaded)")
    report.add([], case_notes)
    call_all(workers, "unload")


# ---- read bandwidth reference -------------------------------------------------------------------

def bandwidth_reference(plan: Plan, workers: list[TorchWorker], report: Report) -> None:
    """GB/s of sequential sums over plan.bandwidth_bytes of float32: torch.sum in both workers at each
    thread count and numpy a.sum() (1 thread) here, interleaved."""
    log("read bandwidth reference")
    nbytes = plan.bandwidth_bytes
    size = f"{nbytes / 2**30:.2f} GiB"
    notes = [f"bandwidth: {w.name} worker AnonHugePages {info['huge_mib']:.0f} MiB with the tensor"
             for w, info in zip(workers, call_all(workers, "bwalloc", nbytes))]
    data = np.ones(nbytes // 4, dtype=np.float32)
    parts: dict[str, Timed] = {"numpy": timed(np.sum, [data] * (plan.bandwidth_reps + 2))}
    for threads in plan.threads:
        for w in workers:
            parts[f"{int(w.thp)}:{threads}"] = bw_timer(w, threads)
    times = interleave(parts, 2, plan.bandwidth_reps)
    del data, parts
    call_all(workers, "bwfree")
    gbps = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    label = f"read bandwidth ref ({size} f32, sequential)"
    lines = []
    for threads in plan.threads:
        for w in workers:
            key = f"{int(w.thp)}:{threads}"
            lines.append(Line(label, f"torch.sum{' THP' if w.thp else ''}", str(threads), None, gbps[key]))
            report.bandwidth[threads] = max(report.bandwidth.get(threads, 0.0), gbps[key])
    lines.append(Line(label, "numpy a.sum()", "1", None, gbps["numpy"]))
    report.bandwidth[1] = max(report.bandwidth.get(1, 0.0), gbps["numpy"])
    report.add(lines, notes)


# ---- SCM path -----------------------------------------------------------------------------------

def run_fio(fio: str, path: Path, iodepth: int, plan: Plan) -> float:
    """IOPS of fio (the executable) 4 KiB O_DIRECT random reads with io_uring at iodepth on path."""
    cmd = [fio, "--name=r", f"--filename={path}", "--rw=randread", "--direct=1", "--bs=4k",
           "--ioengine=io_uring", f"--iodepth={iodepth}", f"--size={plan.fio_size}",
           f"--runtime={plan.fio_runtime}", "--time_based", "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    out = proc.stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])


def scm_lookup_rate(store: Store, name: str, batches: np.ndarray, seconds: float) -> float:
    """rows/s of Store.lookup over batches (cycled) for about seconds, after two warm-up calls."""
    for b in batches[:2]:
        store.lookup(name, b)
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        store.lookup(name, batches[i % len(batches)])
        done += batches.shape[1]
        i += 1
    return done / (time.perf_counter() - start)


def bench_scm(state: Path, plan: Plan, fio: str | None, report: Report) -> None:
    """Our random single-row SCM lookups at several queue depths, each between two fio qd32 runs; with
    fio None (not installed) ours run alone and the comparison is reported as skipped."""
    scm_dir = state / "scm"
    case = TableCase(plan.scm_rows, 64, "float32")
    cfg = config.load(overrides={
        "state_dir": str(scm_dir),
        "tiers": {"dram": {"capacity": "0"}, "cxl": {"capacity": "0"}, "scm": {"capacity": "1G"}},
        "kernels": {"kernel_threads": 1, "scm_queue_depth": 32}})
    store = Store(cfg)
    try:
        log(f"SCM table {case.label}: loading")
        rng = np.random.default_rng(7)
        values = random_values(case.rows, case.dim, rng)
        load_table(store, "scm_only", case, values, "scm")
        batches = rng.integers(0, case.rows, size=(64, SCM_IDS_PER_CALL), dtype=np.int64)
        ok = np.array_equal(store.lookup("scm_only", batches[0]), values[batches[0]])
        verdict = "ok exact" if ok else "FAIL"
        del values
        align = store.tiers.scm.read_align_bytes
        reads = (f"SCM: our reads are O_DIRECT {align}-byte spans per row, issued with "
                 f"{'Linux AIO' if native.scm_async() else 'pread (AIO refused)'}")
        fio_path = scm_dir / "fio.dat"
        fio_runs = []
        ours = {}
        if fio:
            log("SCM: fio iodepth 32")
            fio_runs.append(run_fio(fio, fio_path, 32, plan))
        else:
            log(FIO_SKIPPED)
        for depth in SCM_QUEUE_DEPTHS:
            log(f"SCM: ours, queue depth {depth}{', then fio iodepth 32' if fio else ''}")
            native.set_scm_queue_depth(depth)
            ours[depth] = scm_lookup_rate(store, "scm_only", batches, plan.scm_seconds)
            if fio:
                fio_runs.append(run_fio(fio, fio_path, 32, plan))
        if fio:
            log("SCM: fio iodepth 1")
            fio_qd1 = run_fio(fio, fio_path, 1, plan)
    finally:
        store.close()
    row_bytes = native.row_stride(case.dim, case.dtype)
    label = f"SCM {case.label}, {SCM_IDS_PER_CALL} random ids/call"
    lines = []
    for n, (depth, rate) in enumerate(ours.items()):
        ratio = rate / ((fio_runs[n] + fio_runs[n + 1]) / 2) if fio else None
        lines.append(Line(label, f"ours Store.lookup, scm_queue_depth {depth}", "1", rate, rate * row_bytes / 1e9,
                          ratio, None, "fio qd32 around" if fio else "", verdict if n == 0 else ""))
    if fio:
        lines += [Line(label, f"fio randread 4k io_uring qd32 (run {n + 1} of {len(fio_runs)})", "1", iops,
                       iops * 4096 / 1e9) for n, iops in enumerate(fio_runs)]
        lines.append(Line(label, "fio randread 4k io_uring qd1", "1", fio_qd1, fio_qd1 * 4096 / 1e9))
        fio_note = f"fio reads 4 KiB blocks with io_uring from a {plan.fio_size} file; GB/s of fio lines = IOPS x 4 KiB"
        report.add(lines, [f"{reads}; {fio_note}"])
    else:
        report.skipped.append(FIO_SKIPPED)
        report.add(lines, [reads, FIO_SKIPPED])


# ---- report -------------------------------------------------------------------------------------

def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate / 1e6:.2f}M" if rate >= 1e6 else f"{rate / 1e3:.1f}K"


def machine_header(plan: Plan, cfg: config.Config, quick: bool, state: str, workers: list[TorchWorker]
                   ) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    k = cfg.kernels
    return [
        f"embtier kernel benchmark ({'quick' if quick else 'full'} run)",
        (f"host: {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, Linux {platform.release()}, "
         f"THP {thp.read_text().strip() if thp.exists() else '?'}"),
        (f"ours: ISA {native.isa()}, prefetch_distance {k.prefetch_distance}, heat_sample_shift "
         f"{k.heat_sample_shift} (heat counted on 1 access in {1 << k.heat_sample_shift})"),
        (f"torch {torch_version(workers)} in 2 persistent workers (THP_MEM_ALLOC_ENABLE 0 / 1, "
         f"OMP_WAIT_POLICY=PASSIVE); numpy {np.__version__}; state dir {state}"),
        (f"pool cases: {BAGS} bags x {BAG_LEN} ids, zipf s={ZIPF_S}; {plan.warmup} warm-up + {plan.reps} "
         "interleaved reps (rotating order), each rep a fresh id batch; rates from median call times"),
    ]


def torch_version(workers: list[TorchWorker]) -> str:
    if not workers:
        return "? (the workers did not start)"
    hello = workers[0].hello
    return f"{hello['torch']} (CPU capability {hello['capability']})"


# Widths fit the longest cells of a run (a longer one shifts the rest of its row); the rows of each
# section are printed as soon as it is measured, under the one header.
COLUMNS = (("case", 45), ("impl", 46), ("thr", 3), ("rows/s", 7), ("GB/s", 5), ("ratio", 5), ("q25-q75", 9),
           ("vs", 15), ("check", 10))
RIGHT_ALIGNED = {2, 3, 4, 5, 6}


def format_row(cells: Sequence[str]) -> str:
    return "  ".join(c.rjust(w) if i in RIGHT_ALIGNED else c.ljust(w)
                     for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS))).rstrip()


def table_head() -> list[str]:
    return [format_row([name for name, _ in COLUMNS]), "  ".join("-" * w for _, w in COLUMNS)]


def line_cells(ln: Line) -> tuple[str, ...]:
    return (ln.case, ln.impl, ln.threads, fmt_rate(ln.rate), "-" if ln.gbps is None else f"{ln.gbps:.2f}",
            "-" if ln.ratio is None else f"{ln.ratio:.2f}",
            "-" if ln.spread is None else f"{ln.spread[0]:.2f}-{ln.spread[1]:.2f}", ln.vs or "-", ln.check or "-")


def summary_notes(report: Report) -> list[str]:
    ours = [ln for ln in report.lines if ln.impl == "ours lookup_pooled"]
    notes = [("ratio = median over interleaved reps of (time of the 'vs' line / time of this line); > 1 is "
              "faster; q25-q75 = quartiles of that per-rep ratio. torch best = the THP setting with the faster "
              "median (same case, dist and threads). SCM: ratio = rows/s / mean IOPS of the fio qd32 runs "
              "just before and after"),
             "GB/s = rows/s x stored row bytes (f32 4*dim, f16 2*dim, int8 dim + 8 scale/bias)"]
    if ours:
        worst = min(ours, key=lambda ln: ln.ratio)
        notes.append(f"slowest vs torch: {worst.case}, {worst.threads} thread(s): {worst.ratio:.2f}x")
    uniform = [ln for ln in ours if ln.case.endswith("uniform")]
    if uniform:
        best_bw = max(uniform, key=lambda ln: ln.gbps)
        ref = report.bandwidth.get(int(best_bw.threads))
        if ref:
            notes.append(f"ours peak gather on uniform ids {best_bw.gbps:.2f} GB/s ({best_bw.case}, "
                         f"{best_bw.threads} thr) = {best_bw.gbps / ref:.2f} x the best sequential read reference "
                         f"at {best_bw.threads} thr ({ref:.2f} GB/s, measured earlier in the run)")
    return notes + report.skipped


def fs_type(path: Path) -> str:
    """File system type of the mount holding path (from /proc/mounts)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mount = parts[1]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, kind = mount, parts[2]
    return kind


# ---- main ---------------------------------------------------------------------------------------

def torch_sections(sections: Sections, workers: list[TorchWorker],
                   measures: list[tuple[str, Callable[[list[TorchWorker]], None]]]) -> None:
    """Each (name, measure) as a section, measure(workers); after one fails, the workers are replaced
    (a failed exchange can leave one dead or with a reply unread), started within the next section."""
    def with_workers(measure: Callable[[list[TorchWorker]], None]) -> None:
        if not workers:
            workers.extend(start_workers())
        measure(workers)

    for name, measure in measures:
        if not sections.run(name, with_workers, measure):
            close_workers(workers)
            workers.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tables, few repetitions (about a minute)")
    parser.add_argument("--dir", default="/var/tmp",
                        help="parent of the temporary state dir; must allow O_DIRECT (not tmpfs)")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker()
        return 0
    plan = QUICK if args.quick else FULL
    state = Path(tempfile.mkdtemp(prefix="embtier-bench-", dir=args.dir))
    if fs_type(state) in ("tmpfs", "ramfs"):
        shutil.rmtree(state)
        sys.exit(f"{args.dir} is on {fs_type(state)}: SCM needs O_DIRECT, pass --dir on a disk file system")
    where = f"{state} ({fs_type(state)})"
    report = Report()
    sections = Sections()
    started = time.perf_counter()
    cfg = config.load(overrides={
        "state_dir": str(state / "dram"),
        "tiers": {"dram": {"capacity": "3G"}, "cxl": {"capacity": "64M"}, "scm": {"capacity": "64M"}},
        "kernels": {"kernel_threads": 1}})
    workers: list[TorchWorker] = []
    try:
        sections.run("starting the torch workers", lambda: workers.extend(start_workers()))
        print("\n".join(machine_header(plan, cfg, args.quick, where, workers) + [""] + table_head()), flush=True)
        if workers:
            store = Store(cfg)
            try:
                measures = [("read bandwidth reference", lambda w: bandwidth_reference(plan, w, report))]
                measures += [(f"table {case.label}",
                              lambda w, case=case: bench_table(store, cfg, case, plan, state, w, report))
                             for case in table_cases(plan)]
                torch_sections(sections, workers, measures)
            finally:
                store.close()
        close_workers(workers)
        workers.clear()
        sections.run("SCM path", bench_scm, state, plan, shutil.which("fio"), report)
    finally:
        close_workers(workers)
        shutil.rmtree(state, ignore_errors=True)
    print("\n".join(["", "notes:"] + [f"  - {n}" for n in summary_notes(report)]
                    + [f"total time {time.perf_counter() - started:.0f} s"]), flush=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
