"""A/B of the pooling kernels: the working tree's build against the build of another git revision,
in one process, calls interleaved batch by batch (what the noise of a shared host leaves
measurable: a few percent, where separate runs differ by tens).

The base revision's native/ is compiled (its own build_ffi.py, about a minute) into a temporary
directory; embtierd's modules are then imported twice, once on each build, and each gets a Store
holding the same table in DRAM.  For uniform and Zipf(1.05) ids, 4096 bags x 32 per call, the two
alternate (order flipped every batch, each on batches of its own drawn alike); printed per
distribution: each side's rows/s from the median call and the median over batches of
base time / new time (> 1: the working tree is faster), with its quartiles.

--tier scm puts the table on the SCM tier instead (an O_DIRECT file under /var/tmp, 64 KiB of DRAM):
the lookups then read their rows off the file, and a third line times reading every row in id order,
what a full checkpoint does while it holds writes, and a fourth the time full checkpoints hold writes
(--bags sets the lookups' bags, fewer for SCM).

Run from the repository root:
  .venv/bin/python tests/bench/kernels_ab.py [--base HEAD~1] [--rows 8388608] [--dim 64]
      [--dtype float32] [--threads 1] [--batches 40] [--tier dram|scm] [--bags 4096]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BAG_LEN = 32


def build_base(rev: str, work: Path) -> Path:
    """Compiles rev's native/ into work/build; returns that directory (holding _native*.so)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "native"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(work, filter="data")
    spec = importlib.util.spec_from_file_location("base_build_ffi", work / "native" / "build_ffi.py")
    build_ffi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_ffi)
    build = work / "build"
    build_ffi.builder("_native", absolute_paths=True).compile(tmpdir=str(build))
    return build


def import_tree(native_dir: Path | None):
    """embtierd's config, native and Store, imported afresh on the build in native_dir (None: the
    installed one)."""
    for name in [n for n in sys.modules if n == "embtierd" or n.startswith("embtierd.")]:
        del sys.modules[name]
    sys.modules.pop("_native", None)
    if native_dir is not None:
        sys.path.insert(0, str(native_dir))
        try:
            sys.modules["embtierd._native"] = importlib.import_module("_native")
        finally:
            sys.path.pop(0)
    config = importlib.import_module("embtierd.config")
    native = importlib.import_module("embtierd.native")
    return config, native, importlib.import_module("embtierd.store.catalog").Store


def report(what: str, rows: int, times: dict[str, list[float]], skip: int = 4) -> None:
    """One line: each side's rows/s from its median call, and the median of base / new over the calls
    after the first skip of each side, with its quartiles."""
    base, new = np.array(times["base"][skip:]), np.array(times["new"][skip:])
    ratio = base / new
    print(f"  {what:<8} base {rows / np.median(base) / 1e6:6.2f} M rows/s   new "
          f"{rows / np.median(new) / 1e6:6.2f} M rows/s   new is {np.median(ratio):.3f}x "
          f"[{np.percentile(ratio, 25):.3f}, {np.percentile(ratio, 75):.3f}]", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD~1", help="the git revision to compare with")
    p.add_argument("--rows", type=int, default=8 << 20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--tier", default="dram", choices=["dram", "scm"], help="where the table's rows live")
    p.add_argument("--bags", type=int, default=4096, help="bags of each lookup")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="embtier-kernels-ab-", dir="/var/tmp"))
    try:
        print(f"building the kernels of {args.base} ...", flush=True)
        base_dir = build_base(args.base, work)
        values = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
        sides, checkpointers = {}, {}
        for side, native_dir in (("base", base_dir), ("new", None)):
            config, native, store_class = import_tree(native_dir)
            room = f"{2 * values.nbytes + (1 << 30)}"
            tiers = {"dram": {"capacity": room}, "cxl": {"capacity": "0"}, "scm": {"capacity": "0"}}
            if args.tier == "scm":
                tiers = {"dram": {"capacity": "64K"}, "cxl": {"capacity": "0"}, "scm": {"capacity": room}}
            store = store_class(config.load(overrides={
                "state_dir": str(work / side), "tiering": {"enabled": False}, "tiers": tiers}))
            store.create_table("t", args.rows, args.dim, dtype=args.dtype)
            for start in range(0, args.rows, 1 << 18):
                stop = min(args.rows, start + (1 << 18))
                store.write_rows("t", np.arange(start, stop), values[start:stop])
            sides[side] = (store, native)
            if args.tier == "scm":  # this side's checkpointer, on its own modules (imported with its build)
                wal = importlib.import_module("embtierd.durability.wal").WriteAheadLog(work / side / "wal", "off")
                checkpointers[side] = importlib.import_module("embtierd.durability.checkpoint").Checkpointer(
                    store, wal, work / side / "checkpoints", config.load(overrides={}).durability.checkpoints)
        del values
        print(f"{args.rows} x {args.dim} {args.dtype} on {args.tier}, {args.threads} kernel thread(s), {args.bags} bags x "
              f"{BAG_LEN} ids, {args.batches} batches per side (the first 4 not counted)", flush=True)
        rng = np.random.default_rng(1)
        scatter = rng.permutation(args.rows)
        lengths = np.full(args.bags, BAG_LEN, np.int32)

        def zipf(n: int) -> np.ndarray:
            ranks = rng.zipf(1.05, 3 * n)
            return scatter[ranks[ranks <= args.rows][:n] - 1].astype(np.int64)

        for dist in ("uniform", "zipf"):
            count = 2 * args.batches
            batches = [rng.integers(0, args.rows, args.bags * BAG_LEN) if dist == "uniform"
                       else zipf(args.bags * BAG_LEN) for _ in range(count)]
            times: dict[str, list[float]] = {"base": [], "new": []}
            for i in range(args.batches):
                for k, side in enumerate(("base", "new") if i % 2 else ("new", "base")):
                    store, native = sides[side]
                    native.set_kernel_threads(args.threads)
                    batch = batches[2 * i + (k if i % 2 else 1 - k)]
                    start = time.perf_counter()
                    store.lookup_pooled("t", batch, lengths, None, "sum")
                    times[side].append(time.perf_counter() - start)
            report(dist, args.bags * BAG_LEN, times)
        if args.tier == "scm":
            every = np.arange(args.rows, dtype=np.int64)
            times = {"base": [], "new": []}
            for i in range(max(8, args.batches // 4)):
                for side in ("base", "new") if i % 2 else ("new", "base"):
                    store, native = sides[side]
                    native.set_kernel_threads(args.threads)
                    start = time.perf_counter()
                    store.read_encoded("t", every)
                    times[side].append(time.perf_counter() - start)
            report("all rows", args.rows, times, skip=2)
            held = {"base": [], "new": []}
            for i in range(6):
                for side in ("base", "new") if i % 2 else ("new", "base"):
                    held[side].append(checkpointers[side].take("full").snapshot_seconds)
            base, new = np.array(held["base"][1:]), np.array(held["new"][1:])
            print(f"  a full checkpoint holds writes: base {np.median(base):.3f} s   new {np.median(new):.3f} s   "
                  f"new is {np.median(base / new):.3f}x shorter", flush=True)
        for store, _ in sides.values():
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
