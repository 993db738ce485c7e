"""A load generator: Zipf-distributed ids, pooled or raw lookups, several
concurrent clients, for a fixed time; latency percentiles and throughput.

Used by `embtier bench` and by the demo.  Id batches are drawn before the
clock starts, so the generator's own cost stays out of the figures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from embtier.client import Client, EmbtierClientError


class ZipfIds:
    """Bounded Zipf(alpha) over [0, num_rows), hot ranks scattered over the id space by a fixed permutation."""

    def __init__(self, num_rows: int, alpha: float, seed: int = 0):
        ranks = np.arange(1, num_rows + 1, dtype=np.float64)
        weights = ranks ** -alpha
        self.cdf = np.cumsum(weights) / weights.sum()
        self.scatter = np.random.default_rng(seed).permutation(num_rows)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        rank = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.scatter[np.minimum(rank, self.cdf.size - 1)].astype(np.int64)


@dataclass
class Workload:
    tables: dict[str, int]          # table -> num_rows
    bags: int = 512                 # bags per table per request
    pooling_factor: int = 32        # ids per bag
    alpha: float = 1.05
    pooled: bool = True             # LookupPooled, or Lookup of the raw rows
    batches: int = 16               # id batches drawn in advance per client
    seed: int = 0


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    rows: int = 0
    latencies: list[float] = field(default_factory=list)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")


class LoadGenerator:
    def __init__(self, target: str, workload: Workload, concurrency: int = 4, timeout: float = 30.0):
        self.target = target
        self.workload = workload
        self.concurrency = concurrency
        self.timeout = timeout
        self.lock = threading.Lock()
        self.stats = Stats()
        self.error_messages: list[str] = []
        w = workload
        self.generators = {t: ZipfIds(n, w.alpha, w.seed + i) for i, (t, n) in enumerate(sorted(w.tables.items()))}

    def _requests(self, k: int) -> list[dict]:
        w = self.workload
        rng = np.random.default_rng(w.seed * 1000 + k)
        lengths = np.full(w.bags, w.pooling_factor, dtype=np.int32)
        return [{t: (g.draw(rng, w.bags * w.pooling_factor), lengths) for t, g in self.generators.items()}
                for _ in range(w.batches)]

    def _worker(self, k: int, stop: threading.Event) -> None:
        requests = self._requests(k)
        rows_per_request = sum(ids.size for ids, _ in requests[0].values())
        with Client(self.target, timeout=self.timeout) as client:
            i = 0
            while not stop.is_set():
                features = requests[i % len(requests)]
                i += 1
                start = time.perf_counter()
                try:
                    if self.workload.pooled:
                        client.lookup_pooled(features)
                    else:
                        for table, (ids, _) in features.items():
                            client.lookup(table, ids)
                except EmbtierClientError as e:
                    with self.lock:
                        self.stats.errors += 1
                        self.error_messages.append(str(e))
                    continue
                elapsed = time.perf_counter() - start
                with self.lock:
                    self.stats.requests += 1
                    self.stats.rows += rows_per_request
                    self.stats.latencies.append(elapsed)

    def run(self, duration: float, on_tick: Callable[[float, Stats], None] | None = None,
            tick_seconds: float = 1.0) -> Stats:
        """Runs for duration seconds; on_tick(elapsed, stats of the last tick) is called every tick."""
        stop = threading.Event()
        threads = [threading.Thread(target=self._worker, args=(k, stop), daemon=True)
                   for k in range(self.concurrency)]
        for t in threads:
            t.start()
        total = Stats()
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < duration:
            stop.wait(min(tick_seconds, duration - elapsed))
            with self.lock:
                tick, self.stats = self.stats, Stats()
            total.requests += tick.requests
            total.errors += tick.errors
            total.rows += tick.rows
            total.latencies += tick.latencies
            if on_tick:
                on_tick(time.monotonic() - start, tick)
        stop.set()
        for t in threads:
            t.join(timeout=self.timeout)
        return total
