"""Benchmark: LookupPooled against Redis holding the same rows, in one run on the same data.

Redis is what many feature stores serve embeddings from: one key per row, the client fetches the
distinct rows of a request with pipelined MGETs and pools them itself.  Here both servers hold
the same 500k x 64 float32 rows (256 bytes each) and are reached over Unix sockets; a request is
128 bags x pooling factor PF of Zipf(1.05) ids.  The Redis client is tuned: ids deduplicated
before the MGET (each distinct row fetched once), MGETs of up to 1024 keys pipelined in one round
trip, the replies parsed by hiredis when it is installed, rows pooled by torch's embedding_bag
(FBGEMM's kernel) when torch is installed.  The compared calls are interleaved repetition by
repetition.  Printed per pooling factor as soon as measured: p50 and p99 of both, Redis / pooled
p50; and once: the bytes each server uses per row (embtier: its tiers' bytes and metadata;
Redis: INFO used_memory over the rows loaded).

Needs redis-server (`apt-get install redis-server`; `make bench` installs it as root) and the
redis package (`make bench` installs it into .venv); says so and exits 0 without them.

Run from the repository root:  .venv/bin/python tests/bench/bench_redis.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.support

from embtier import Client
from embtier_tools.loadgen import ZipfIds

from tests.bench.bench_service import host_pool
from tests.support import start_daemon

ROWS, DIM, BAGS = 500_000, 64, 128
POOLING_FACTORS = (1, 8, 32, 128)
MGET_KEYS = 1024


def start_redis(directory: Path):
    import redis
    sock = directory / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(unix_socket_path=str(sock))
    for _ in range(100):
        try:
            client.ping()
            return proc, client
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer within 5 s")


def keys_of(ids: np.ndarray) -> list[bytes]:
    return [b"t:%d" % i for i in ids.tolist()]


def redis_pooled(r, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The tuned Redis client: distinct ids, pipelined MGETs, the host's fastest pooling."""
    distinct, index = np.unique(ids, return_inverse=True)
    keys = keys_of(distinct)
    pipe = r.pipeline(transaction=False)
    for lo in range(0, len(keys), MGET_KEYS):
        pipe.mget(keys[lo:lo + MGET_KEYS])
    values = [v for chunk in pipe.execute() for v in chunk]
    rows = np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), DIM)
    return host_pool(rows, index, lengths)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    try:
        import redis  # noqa: F401
    except ImportError:
        print("bench_redis: the redis package is not installed (pip install redis): skipped")
        return 0
    if shutil.which("redis-server") is None:
        print("bench_redis: redis-server is not installed (apt-get install redis-server): skipped")
        return 0
    reps = 10 if args.quick else 40
    state = Path(tempfile.mkdtemp(prefix="embtier-bench-redis-", dir=args.dir))
    daemon = start_daemon(state / "daemon", "--dram-bytes", "1G", "--cxl-bytes", "0", "--scm-bytes", "64M")
    proc, r = start_redis(state)
    try:
        with Client(daemon.target, timeout=300) as client:
            client.create_table("t", ROWS, DIM, initializer="uniform", seed=1)
            before = r.info("memory")["used_memory"]
            for lo in range(0, ROWS, 50_000):  # the same rows into Redis
                ids = np.arange(lo, min(lo + 50_000, ROWS))
                rows = client.lookup("t", ids)
                pipe = r.pipeline(transaction=False)
                pipe.mset(dict(zip(keys_of(ids), (row.tobytes() for row in rows), strict=True)))
                pipe.execute()
            redis_bytes = (r.info("memory")["used_memory"] - before) / ROWS
            info = client.describe("t")
            ours = (sum(info.bytes_by_tier.values()) + info.metadata_bytes) / ROWS
            print(f"embtier vs Redis{' (quick)' if args.quick else ''}: {ROWS} x {DIM} float32 rows (256 B each) in "
                  f"both, Unix sockets, {BAGS} bags x PF Zipf(1.05) ids, {reps} interleaved reps; hiredis "
                  f"{'on' if _hiredis() else 'off'}", flush=True)
            print(f"   bytes per row: embtier {ours:.0f}, Redis {redis_bytes:.0f}", flush=True)
            print(f"   {'PF':>4} {'pooled p50':>11} {'p99':>9} {'Redis p50':>10} {'p99':>9} {'Redis / pooled':>15}",
                  flush=True)
            zipf = ZipfIds(ROWS, 1.05, 0)
            for pf in POOLING_FACTORS:
                rng = np.random.default_rng(pf)
                lengths = np.full(BAGS, pf, np.int32)
                requests = [zipf.draw(rng, BAGS * pf) for _ in range(reps)]
                got = client.lookup_pooled({"t": (requests[0], lengths)})["t"]
                assert np.allclose(got, redis_pooled(r, requests[0], lengths), rtol=1e-4, atol=1e-4), "results differ"
                ours_t, theirs_t = [], []
                for i, ids in enumerate(requests):
                    calls = [(ours_t, lambda ids=ids, n=lengths: client.lookup_pooled({"t": (ids, n)})),
                             (theirs_t, lambda ids=ids, n=lengths: redis_pooled(r, ids, n))]
                    for times, fn in calls[::-1] if i % 2 else calls:
                        start = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - start)
                o50, o99 = np.percentile(ours_t, [50, 99]) * 1e3
                t50, t99 = np.percentile(theirs_t, [50, 99]) * 1e3
                print(f"   {pf:>4} {o50:8.2f} ms {o99:6.2f} ms {t50:7.2f} ms {t99:6.2f} ms {t50 / o50:14.1f}x", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert daemon.stop() == 0, daemon.log()
        shutil.rmtree(state, ignore_errors=True)
    return 0


def _hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
