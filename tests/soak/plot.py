"""A PNG of a soak run's samples (tests/soak/soak.py's CSV): RSS, open fds and threads, WAL and
checkpoint disk use, and the p99 latency of each request kind, over time.  Needs matplotlib (`make
soak` installs it; CI does not).

Usage: python -m tests.soak.plot SAMPLES.csv OUT.png [--title TEXT]
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from tests.soak.soak import KINDS, warmup_seconds

MIB = 2**20


def read_samples(path: Path) -> dict[str, list[float]]:
    """Each column of the CSV as floats (an empty p99 window is nan)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def plot(samples: dict[str, list[float]], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s / 60 for s in samples["seconds"]]
    moved = [0.0] + [b - a for a, b in zip(samples["migrated_rows"], samples["migrated_rows"][1:])]
    fig, axes = plt.subplots(7, 1, figsize=(10, 19), sharex=True)
    panels = [
        ("daemon memory", "MiB", [("RSS", [v / MIB for v in samples["rss_bytes"]]),
                                  ("anonymous", [v / MIB for v in samples["rss_anon_bytes"]])], False),
        ("daemon open fds and threads", "count", [("fds", samples["fds"]), ("threads", samples["threads"])], False),
        ("disk use of the state directory", "MiB", [
            ("WAL", [v / MIB for v in samples["wal_bytes"]]),
            ("checkpoints", [v / MIB for v in samples["checkpoint_bytes"]]),
            ("WAL + checkpoints", [(a + b) / MIB for a, b in zip(samples["wal_bytes"], samples["checkpoint_bytes"])])],
         False),
        ("p99 latency per 10 s window, frequent kinds", "ms", [(k, samples[f"{k}_p99_ms"]) for k in KINDS[:3]], True),
        ("p99 latency per 10 s window, rare kinds (max of few calls)", "ms",
         [(k, samples[f"{k}_p99_ms"]) for k in KINDS[3:]], True),
        ("rows the tiering engine moved between tiers", "rows / window", [("moved", moved)], False),
        ("CPU", "cores", [("daemon", samples["daemon_cpu"]), ("load clients", samples["client_cpu"])], False),
    ]
    for ax, (heading, unit, series, log_scale) in zip(axes, panels):
        for name, values in series:
            points = [(m, v) for m, v in zip(minutes, values) if not math.isnan(v)]
            ax.plot([m for m, _ in points], [v for _, v in points], label=name,
                    marker="." if name in ("checkpoint", "restore") else None, linewidth=1)
        ax.axvline(warmup_seconds(samples["seconds"][-1]) / 60, color="grey", linestyle=":", linewidth=1)
        ax.set_title(heading, fontsize=10)
        ax.set_ylabel(unit)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    axes[-1].set_xlabel("minutes (dotted: end of warm-up)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", default="embtier soak run")
    args = parser.parse_args(argv)
    plot(read_samples(args.samples), args.out, args.title)


if __name__ == "__main__":
    main()
