"""Benchmark of DLRM inference from PyTorch with the embedding tables in embtier, against the same
model with its tables in process, in one run.

The model is embtier_tools.examples.dlrm's DLRM (bottom MLP 13-64-32-16, 8 tables x 16 float32 of
10M, 5M, 2M and five of 1M rows, dot-product interaction, top MLP 44-64-32-1), untrained (the
weights do not change the work), on the example's synthetic Criteo-shaped batches of 256 samples:
bounded Zipf(1.05) ids, the hot rows scattered.  Bags of 1 id a feature (Criteo's one-hot
features) and of 32 on average (1 to 63, multi-hot).  The ways of reading the tables:

  in process        EmbeddingBagCollection (TorchRec's when it imports, else embtier.torch.compat's:
                    torch.nn.EmbeddingBag, FBGEMM's CPU kernel), the baseline
  embtier pooled    RemoteEmbeddingBagCollection: one LookupPooled a batch, pooled in the daemon
                    (offload switch), float32 on the wire; "fp16 wire" the same with float16
  embtier raw       one Lookup a table of the batch's distinct ids, pooled in PyTorch
                    (torch.nn.functional.embedding_bag over the rows returned): a client without
                    LookupPooled

One embtierd in a temporary directory (under --dir) holds the tables, every row in DRAM (its DRAM
tier sized for them; no CXL; tiering, write-ahead log and scheduled checkpoints off), reached on a
Unix socket; the tables are copied in from the in-process collection with from_module (the load
rate is printed).  This process runs the model with one torch thread (the daemon needs the other
core; with two, a parallel region waits for a thread the daemon or another process holds the core
of, and in-process latency jumps from 1 ms to tens of ms on this shared host).

Per pooling factor: warm-up batches, then R batches, each run through every way once, the order
rotated by one each batch (the host is shared and noisy: the compared calls are interleaved in
time).  A call is the whole forward (MLPs and embeddings) under torch.inference_mode, closed
loop, one request at a time.  Then each way from 4 threads at once (closed loop, one model shared
by the threads), in rounds of a few seconds a way, the order rotated each round: samples/s the
median over rounds, "x in process" the median of the rounds' ratios (min-max beside it), "x 1
thread" against the same way one call at a time.  samples/s = 256 x R / the summed call times; p50 and p99 of the call
times; "x in process" = the median over batches of in-process time / this way's time (< 1:
slower than in process), with its 25-75 % quantiles; check = the largest |difference| of the
predicted probabilities from in process's, over the first batches.  Each section prints its lines
as soon as it has measured them; one that fails is reported (its traceback on stderr), the next
one runs, and the exit status is 1.

Run as a script (it imports bench_kernels from its own directory):
  .venv/bin/python tests/bench/bench_torch.py [--quick] [--dir D]
The full run takes about two and a half minutes on 2 cores (20 s of it loading the 1.4 GiB of
tables); --quick (tables of 1M rows and less, fewer batches and rounds) about half a minute.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bench_kernels import Sections, interleave, log, ratio_stats
from embtier import Client
from embtier.torch import (
    TORCHREC,
    EmbeddingBagCollection,
    KeyedTensor,
    RemoteEmbeddingBagCollection,
)
from embtier_tools.daemon import Daemon, free_port, start
from embtier_tools.examples.dlrm import DIM, DLRM, Batch, criteo_batch, table_configs
from embtierd import native

BATCH = 256
M = 1 << 20
IN_PROCESS, POOLED, POOLED_FP16, RAW = "in process", "embtier pooled", "embtier pooled, fp16 wire", "embtier raw"
CHECK_BATCHES = 3
THREADS = 4


@dataclass(frozen=True)
class Plan:
    rows: tuple[int, ...]
    pooling_factors: tuple[int, ...]
    warmup: int
    reps: int
    rounds: int              # of the threads' comparison
    round_seconds: float


FULL = Plan(rows=(10 * M, 5 * M, 2 * M, M, M, M, M, M), pooling_factors=(1, 32), warmup=10, reps=300, rounds=5,
            round_seconds=2.0)
QUICK = Plan(rows=(M, M // 2, M // 4, *(M // 8,) * 5), pooling_factors=(1, 32), warmup=3, reps=40, rounds=2,
             round_seconds=0.5)


class RawLookupCollection(torch.nn.Module):
    """The tables read raw: one Lookup a table of the batch's distinct ids, pooled here with
    torch.nn.functional.embedding_bag (SUM); -> KeyedTensor as the collections."""

    def __init__(self, configs: list, client: Client, prefix: str) -> None:
        super().__init__()
        self.configs, self.client, self.prefix = configs, client, prefix

    def forward(self, features) -> KeyedTensor:
        keys, batch = features.keys(), features.stride()
        lengths = features.lengths().view(len(keys), batch)
        starts = features.offset_per_key()
        pooled, names = [], []
        for config in self.configs:
            for feature in config.feature_names:
                k = keys.index(feature)
                ids, where = torch.unique(features.values()[starts[k]:starts[k + 1]], return_inverse=True)
                rows = self.client.lookup(self.prefix + config.name, ids.numpy())
                offsets = torch.zeros(batch + 1, dtype=torch.int64)
                torch.cumsum(lengths[k], 0, out=offsets[1:])
                pooled.append(torch.nn.functional.embedding_bag(
                    where, torch.from_numpy(np.require(rows, requirements="W")), offsets, mode="sum",
                    include_last_offset=True))
                names.append(feature)
        return KeyedTensor(keys=names, length_per_key=[p.shape[1] for p in pooled], values=torch.cat(pooled, dim=1))


# ---- the daemon and the tables ----------------------------------------------------------------------

def start_daemon(state: Path, rows: tuple[int, ...]) -> Daemon:
    """An embtierd whose DRAM tier holds every table; nothing written to disk but its log."""
    dram = sum(rows) * native.row_stride(DIM, "float32") + (256 << 20)
    config = state / "embtierd.toml"
    config.write_text("[tiering]\nenabled = false\n\n[durability]\nwal = false\n\n"
                      "[durability.checkpoints]\ninterval_seconds = 0\n")
    return start(state, [f"unix://{state / 'embtierd.sock'}"], f"127.0.0.1:{free_port()}", "--config", str(config),
                 "--dram-bytes", str(dram), "--cxl-bytes", "0", "--scm-bytes", "64M")


def load_tables(ebc: torch.nn.Module, client: Client) -> None:
    """from_module: the in-process tables into the daemon; prints the time it took."""
    rows = sum(c.num_embeddings for c in ebc.embedding_bag_configs())
    log(f"loading {rows} rows into embtier")
    started = time.perf_counter()
    RemoteEmbeddingBagCollection.from_module(ebc, client)
    seconds = time.perf_counter() - started
    size = rows * DIM * 4
    in_dram = {t.name: t.rows_by_tier.get("dram", 0) == t.num_rows for t in client.tables()}
    print(f"\ntables loaded (RemoteEmbeddingBagCollection.from_module): {rows} rows, {size / 2**30:.2f} GiB in "
          f"{seconds:.1f} s ({rows / seconds / 1e6:.2f} M rows/s, {size / seconds / 2**20:.0f} MiB/s); every row "
          f"in DRAM: {all(in_dram.values())}", flush=True)


# ---- the comparison ---------------------------------------------------------------------------------

Columns = tuple[tuple[str, int, str], ...]
COLUMNS: Columns = (("way", 26, "<"), ("samples/s", 10, ">"), ("p50 ms", 7, ">"), ("p99 ms", 7, ">"),
                    ("x in process", 12, ">"), ("q25-q75", 9, ">"), ("check", 0, "<"))
THREAD_COLUMNS: Columns = (("way", 26, "<"), ("samples/s", 10, ">"), ("x in process", 12, ">"),
                           ("min-max", 9, ">"), ("x 1 thread", 10, ">"))


def format_cells(cells: list[str], columns: Columns = COLUMNS) -> str:
    return "  ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, columns)).rstrip()


def table_head(columns: Columns) -> list[str]:
    return [format_cells([name for name, _, _ in columns], columns),
            format_cells(["-" * (width or 5) for _, width, _ in columns], columns)]


def forward_timer(model: DLRM, batches: list[Batch]) -> Callable[[int], float]:
    def run(b: int) -> float:
        batch = batches[b]
        with torch.inference_mode():
            started = time.perf_counter()
            model(batch.dense, batch.sparse)
            return time.perf_counter() - started
    return run


def largest_difference(models: dict[str, DLRM], way: str, batches: list[Batch]) -> float:
    with torch.inference_mode():
        return max((torch.sigmoid(models[way](b.dense, b.sparse)) -
                    torch.sigmoid(models[IN_PROCESS](b.dense, b.sparse))).abs().max().item()
                   for b in batches[:CHECK_BATCHES])


def compare(models: dict[str, DLRM], plan: Plan, pooling_factor: int, rng: np.random.Generator) -> None:
    """The ways at one pooling factor: one call at a time, interleaved, then from THREADS threads;
    each part's lines printed as soon as measured."""
    log(f"pooling factor {pooling_factor}: drawing {plan.warmup + plan.reps} batches")
    batches = [criteo_batch(rng, BATCH, list(plan.rows), pooling_factor) for _ in range(plan.warmup + plan.reps)]
    single = one_at_a_time(models, plan, pooling_factor, batches)
    from_threads(models, plan, batches, single)


def one_at_a_time(models: dict[str, DLRM], plan: Plan, pooling_factor: int, batches: list[Batch]
                  ) -> dict[str, float]:
    """The lines of the ways called one at a time; their samples/s."""
    ids = sum(int(b.sparse.lengths().sum()) for b in batches) / len(batches)
    log(f"pooling factor {pooling_factor}: {plan.reps} batches through every way")
    times = interleave({way: forward_timer(model, batches) for way, model in models.items()}, plan.warmup,
                       plan.reps)
    rates = {way: BATCH * len(t) / sum(t) for way, t in times.items()}
    lines = ["", (f"pooling factor {pooling_factor} ({ids / BATCH / len(plan.rows):.1f} ids a bag on average, "
                  f"{ids:.0f} ids a batch of {BATCH}), one call at a time:"), *table_head(COLUMNS)]
    for way, t in times.items():
        ms = np.percentile(t, [50, 99]) * 1e3
        ratio, (q25, q75) = ratio_stats(times[IN_PROCESS], t)
        check = "-" if way == IN_PROCESS else f"max |dp| {largest_difference(models, way, batches):.1e}"
        lines.append(format_cells([way, f"{rates[way]:,.0f}", f"{ms[0]:.2f}", f"{ms[1]:.2f}", f"{ratio:.2f}",
                                   f"{q25:.2f}-{q75:.2f}", check]))
    print("\n".join(lines), flush=True)
    return rates


def samples_per_second(model: DLRM, batches: list[Batch], threads: int, seconds: float) -> float:
    """Closed loop from threads threads for seconds: samples answered / the time it took."""
    done = [0] * threads
    stop_at = time.perf_counter() + seconds

    def loop(i: int) -> None:
        with torch.inference_mode():
            for b in itertools.islice(itertools.cycle(batches), i, None, threads):
                if time.perf_counter() >= stop_at:
                    return
                model(b.dense, b.sparse)
                done[i] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return BATCH * sum(done) / (time.perf_counter() - started)


def from_threads(models: dict[str, DLRM], plan: Plan, batches: list[Batch], single: dict[str, float]) -> None:
    """samples/s of each way called from THREADS threads at once, in rounds of plan.round_seconds a
    way (the order rotated each round): the median over rounds; x in process = the median of the
    rounds' ratios to in process's rate; x 1 thread = against one call at a time (single)."""
    log(f"{THREADS} threads: {plan.rounds} rounds of {plan.round_seconds:g} s a way")
    ways = list(models)
    rates: dict[str, list[float]] = {way: [] for way in ways}
    for r in range(plan.rounds):
        for way in ways[r % len(ways):] + ways[:r % len(ways)]:
            rates[way].append(samples_per_second(models[way], batches, THREADS, plan.round_seconds))
    lines = [f"from {THREADS} threads at once ({plan.rounds} rounds of {plan.round_seconds:g} s a way):",
             *table_head(THREAD_COLUMNS)]
    for way, r in rates.items():
        ratios = np.asarray(r) / np.asarray(rates[IN_PROCESS])
        lines.append(format_cells([way, f"{np.median(r):,.0f}", f"{np.median(ratios):.2f}",
                                   f"{ratios.min():.2f}-{ratios.max():.2f}", f"{np.median(r) / single[way]:.2f}"],
                                  THREAD_COLUMNS))
    print("\n".join(lines), flush=True)


# ---- main -------------------------------------------------------------------------------------------

def header(plan: Plan, quick: bool, state: Path) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    collection = f"TorchRec {TORCHREC}" if TORCHREC else "embtier.torch.compat (TorchRec does not import)"
    return "\n".join([
        f"embtier PyTorch benchmark ({'quick' if quick else 'full'} run): DLRM inference, batch {BATCH}",
        f"host: {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, Linux {platform.release()}",
        (f"torch {torch.__version__} ({torch.get_num_threads()} thread), in-process EmbeddingBagCollection: "
         f"{collection}; numpy {np.__version__}"),
        (f"tables: {len(plan.rows)} x {DIM} float32 of {', '.join(f'{r / M:g}M' for r in plan.rows)} rows; "
         f"{plan.warmup} warm-up + {plan.reps} interleaved batches per pooling factor; state dir {state}")])


def run(plan: Plan, state: Path, sections: Sections) -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    log(f"making the in-process tables ({sum(plan.rows)} rows)")
    configs = table_configs(list(plan.rows))
    local = DLRM(EmbeddingBagCollection(configs)).eval()
    daemon = start_daemon(state, plan.rows)
    try:
        with Client(daemon.target, timeout=600) as client:
            if not sections.run("loading the tables", load_tables, local.sparse, client):
                return
            models = {IN_PROCESS: local}
            for way, sparse in ((POOLED, RemoteEmbeddingBagCollection(configs, client)),
                                (POOLED_FP16, RemoteEmbeddingBagCollection(configs, client, wire_dtype="float16")),
                                (RAW, RawLookupCollection(configs, client, ""))):
                models[way] = DLRM(sparse).eval()
                models[way].load_state_dict({k: v for k, v in local.state_dict().items()
                                             if not k.startswith("sparse.")}, strict=False)
            for pooling_factor in plan.pooling_factors:
                sections.run(f"pooling factor {pooling_factor}", compare, models, plan, pooling_factor, rng)
    finally:
        status = daemon.stop()
        if status != 0:
            print(f"the daemon exited with status {status}; the end of its log:\n{daemon.log()[-2000:]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tables of 1M rows and less, 40 batches (about 30 s)")
    parser.add_argument("--dir", default="/var/tmp", help="parent of the daemon's state directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plan = QUICK if args.quick else FULL
    state = Path(tempfile.mkdtemp(prefix="embtier-bench-torch-", dir=args.dir))
    sections = Sections()
    started = time.perf_counter()
    print(header(plan, args.quick, state), flush=True)
    try:
        run(plan, state, sections)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s", flush=True)
    return sections.exit_code()


if __name__ == "__main__":
    sys.exit(main())
