"""The PIFS offload comparison on the shaped-link test bed (`embtier fabric
bench`, tests/bench/bench_pifs.py).

The daemon runs in the test bed's "switch" namespace and the client half
(`python -m embtier_tools.fabric_bench --client TARGET`) in the "host" namespace;
the veth between them is shaped to each link rate in turn.  For each
pooling factor it times LookupPooled of 512 bags x 8 tables x dim 64
(Zipf(1.05) ids, float32 on the wire) in the three offload modes, one
request at a time, modes rotating request by request so that they share
the machine's noise: host (every row crosses the link and the client
pools), device (one partial per port with rows: DRAM and the 4 emulated CXL
ports; the client adds them) and switch (one vector per bag).  Printed per
rate and pooling factor: MEASURED end-to-end latency p50 / p99 of each mode
and the ratios host/switch and device/switch of the p50s; beside them,
never mixed, the MODELLED CXL fabric transfer time of the same requests
(the daemon's fabric accounting) and the bytes each mode put on the host
link.  Root only (network namespaces, tc).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from embtier.wire import OFFLOADS

from .fabric import TestBed, format_delay, format_rate, run_host_client, start_daemon, stop_process

TABLES, ROWS, DIM, BAGS = 8, 200_000, 64, 512
POOLING_FACTORS = (8, 32, 128)
MODES = tuple(OFFLOADS)
TIER_FLAGS = ["--dram-bytes", "64M", "--cxl-bytes", "512M", "--scm-bytes", "256M"]


# ---- the client half, in the host namespace ---------------------------------------------------------

def client(target: str, rounds: int, max_seconds: float, pooling_factors: list[int]) -> dict:
    from embtier.client import Client

    from .loadgen import ZipfIds

    out = {}
    with Client(target, timeout=600) as c:
        existing = {t.name for t in c.tables()}
        for t in range(TABLES):
            if f"t{t}" not in existing:
                c.create_table(f"t{t}", ROWS, DIM, initializer="uniform", seed=t)
        zipf = ZipfIds(ROWS, 1.05, seed=7)
        rng = np.random.default_rng(1)
        for pf in pooling_factors:
            lengths = np.full(BAGS, pf, dtype=np.int32)
            requests = [{f"t{t}": (zipf.draw(rng, BAGS * pf), lengths) for t in range(TABLES)} for _ in range(4)]
            for mode in MODES:  # warm-up: first touches, connection, rows placed by the engine
                c.lookup_pooled_fabric(requests[0], offload=mode)
            seconds = {m: [] for m in MODES}
            fabric = {m: [] for m in MODES}
            start = time.monotonic()
            for r in range(rounds):
                for mode in MODES[r % 3:] + MODES[:r % 3]:
                    t0 = time.perf_counter()
                    _, traffic = c.lookup_pooled_fabric(requests[r % len(requests)], offload=mode)
                    seconds[mode].append(time.perf_counter() - t0)
                    fabric[mode].append((traffic.modelled_seconds, traffic.host_link_bytes,
                                         sum(traffic.device_link_bytes.values())))
                if time.monotonic() - start > max_seconds and r >= 4:
                    break
            out[pf] = {}
            for m, s in seconds.items():
                modelled, host_bytes, device_bytes = np.median(np.array(fabric[m]), axis=0)  # of every request
                out[pf][m] = {"p50": float(np.median(s)), "p99": float(np.percentile(s, 99)), "n": len(s),
                              "modelled": float(modelled), "host_bytes": float(host_bytes),
                              "device_bytes": float(device_bytes)}
    return out


# ---- the driver ---------------------------------------------------------------------------------------

def run(rates_bits_per_second: list[float], pooling_factors: list[int], rounds: int = 30, seconds: float = 40.0,
        prefix: str = "embtierb", delay_seconds: float = 0.0) -> dict:
    """Brings the test bed up, runs the daemon in its switch namespace and the client half in its host
    namespace once per link rate, prints each rate's table and the summary, tears everything down
    (also on failure and Ctrl-C); returns {rate: {pooling factor: {mode: figures}}}."""
    print(f"PIFS offload on the shaped-link test bed: {BAGS} bags x {TABLES} tables x dim {DIM}, {ROWS} rows a "
          f"table, Zipf(1.05), one request at a time, modes interleaved; one-way delay "
          f"{format_delay(delay_seconds)} each way", flush=True)
    results = {}
    with TestBed(prefix, rate_bits_per_second=rates_bits_per_second[0], delay_seconds=delay_seconds) as bed, \
            tempfile.TemporaryDirectory(prefix="embtier-fabric-bench-") as state:
        daemon, target = start_daemon(bed, Path(state), extra_args=TIER_FLAGS)
        try:
            for rate in rates_bits_per_second:
                bed.shape(rate, delay_seconds)
                out = run_host_client(bed, ["--client", target, "--rounds", str(rounds), "--seconds", str(seconds),
                                            "--pooling-factors", ",".join(map(str, pooling_factors))],
                                      timeout=3600, module="embtier_tools.fabric_bench")
                results[rate] = {int(k): v for k, v in json.loads(out).items()}
                report(rate, results[rate])
        finally:
            stop_process(daemon)
    summary(results)
    return results


def main(argv: list[str] | None = None) -> int:
    """The client half: `python -m embtier_tools.fabric_bench --client TARGET ...` prints one JSON object."""
    p = argparse.ArgumentParser(prog="python -m embtier_tools.fabric_bench")
    p.add_argument("--client", required=True, help="the daemon's target")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--pooling-factors", default=",".join(map(str, POOLING_FACTORS)))
    args = p.parse_args(argv)
    pfs = [int(x) for x in args.pooling_factors.split(",")]
    print(json.dumps(client(args.client, args.rounds, args.seconds, pfs)))
    return 0


def report(rate: float, by_pf: dict) -> None:
    print(f"\n  link {format_rate(rate)}   MEASURED end-to-end latency (ms), p50 / p99 [requests]"
          f"{'':8}| MODELLED CXL fabric transfer (us) | host-link MB")
    print(f"  {'PF':>4}  {'host':>17}  {'device':>17}  {'switch':>17}  {'host/sw':>7} {'dev/sw':>6} | "
          f"{'host':>7} {'device':>7} {'switch':>7} | {'host':>7} {'dev':>6} {'sw':>6}")
    for pf, m in sorted(by_pf.items()):
        cells = "  ".join(f"{m[k]['p50'] * 1e3:7.2f} / {m[k]['p99'] * 1e3:7.2f}" for k in MODES)
        print(f"  {pf:>4}  {cells}  {m['host']['p50'] / m['switch']['p50']:6.2f}x "
              f"{m['device']['p50'] / m['switch']['p50']:5.2f}x | "
              + " ".join(f"{m[k]['modelled'] * 1e6:7.1f}" for k in MODES) + " | "
              + " ".join(f"{m[k]['host_bytes'] / 1e6:{w}.2f}" for k, w in zip(MODES, (7, 6, 6)))
              + f"   [{m['switch']['n']}]", flush=True)


def summary(results: dict) -> None:
    at = results.get(10e9, {}).get(32)
    if not at:
        return
    print(f"\n  targets at pooling factor 32 on 10 Gbit/s (measured p50): switch vs host "
          f"{at['host']['p50'] / at['switch']['p50']:.2f}x (target >= 3.89x), switch vs device "
          f"{at['device']['p50'] / at['switch']['p50']:.2f}x (target >= 2.03x); modelled CXL fabric: "
          f"{at['host']['modelled'] / at['switch']['modelled']:.2f}x and "
          f"{at['device']['modelled'] / at['switch']['modelled']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
