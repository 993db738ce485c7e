"""Benchmark of the PIFS offload emulation on the shaped-link test bed.

The daemon runs in the test bed's "switch" network namespace and this
script's client half in the "host" namespace; the veth between them is
shaped with tc to each link rate (1, 10, 25 Gbit/s), with no added delay
unless --delay says (netem, or netfilter queues where the kernel has no
netem: see clients/fabric.py).
For pooling factors 8, 32 and 128 it times LookupPooled of 512 bags x 8
tables x dim 64 (Zipf(1.05) ids, float32 on the wire) in the three offload
modes, one request at a time, modes rotating request by request so that
they share the machine's noise: host (every row crosses the link and the
client pools), device (one partial per port with rows: DRAM, the 4 emulated
CXL ports; the client adds them) and switch (one vector per bag).  Printed
per rate and pooling factor: MEASURED end-to-end latency p50 / p99 of each
mode and the ratios host/switch and device/switch of the p50s; beside them,
never mixed, the MODELLED CXL fabric transfer time of the same requests
(the daemon's fabric accounting: PCIe 5.0 x8 port links, x16 host link, 40
ns hops) and the bytes each mode put on the host link.

Targets: switch >= 3.89x lower than host at pooling factor 32 on 10 Gbit/s
(PIFS-Rec's figure against Pond), and >= 2.03x lower than device with 4
ports (against BEACON).

Root only (network namespaces, tc).  The same as `embtier fabric bench`
(clients/fabric_bench.py).  Run from the repository root:
  .venv/bin/python -m tests.bench.bench_pifs [--quick] [--rates 10gbit,...] [--delay 1ms]
"""

from __future__ import annotations

import argparse
import sys

from embtier_tools import fabric_bench
from embtier_tools.fabric import FabricError, parse_delay, parse_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 rounds, pooling factor 32 only")
    parser.add_argument("--rates", default="1gbit,10gbit,25gbit", help="link rates, comma-separated "
                        "(default: %(default)s)")
    parser.add_argument("--delay", default="0", help="one-way delay of each direction, e.g. 1ms (default: 0)")
    args = parser.parse_args()
    try:
        rates = [parse_rate(r) for r in args.rates.split(",")]
        delay = parse_delay(args.delay)
        if args.quick:
            fabric_bench.run(rates, [32], rounds=8, seconds=10.0, delay_seconds=delay)
        else:
            fabric_bench.run(rates, list(fabric_bench.POOLING_FACTORS), delay_seconds=delay)
    except (FabricError, ValueError) as e:
        print(f"bench_pifs: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
