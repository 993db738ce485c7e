"""What the atheris harnesses share: the values they draw near the boundaries, how an outcome is
judged, and the entry point that hands a harness to libFuzzer.

An outcome is acceptable when the call succeeded or raised an EmbtierError (or aborted the call) with
a non-empty message and a status other than INTERNAL: any other exception, an empty message, an
INTERNAL status, a crash or a hang (libFuzzer's -timeout) is a finding, and atheris stops with the
input that caused it written to a crash file.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

SHM = "/dev/shm"
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
UINT64_MAX = 2**64 - 1


class Finding(AssertionError):
    """An outcome the service or the binding must never produce."""


def boundary_ints(n: int) -> list[int]:
    """Integers around a count or range bound n, and around the integer types' limits."""
    return [n - 1, n, n + 1, 0, -1, 1, INT32_MAX, INT32_MAX + 1, INT32_MIN, 2**32, INT64_MAX, INT64_MIN,
            2**30, 2**31 - 2, 2**62]


SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 65504.0, 65505.0, 65520.0,
                  -70000.0, 1e-45, 1e-38, 3.4e38, -3.4e38, 1e30, 0.5]


def pick(fdp: atheris.FuzzedDataProvider, values: list | tuple):
    return values[fdp.ConsumeIntInRange(0, len(values) - 1)]


def small_int(fdp: atheris.FuzzedDataProvider, bound: int, lo: int = 0) -> int:
    """Mostly a value in [lo, bound], now and then one of boundary_ints(bound)."""
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return pick(fdp, boundary_ints(bound))
    return fdp.ConsumeIntInRange(lo, bound)


def count(fdp: atheris.FuzzedDataProvider, bound: int) -> int:
    """A number of elements in [0, bound], its ends more often than the rest."""
    k = fdp.ConsumeIntInRange(0, 7)
    return 0 if k == 0 else bound if k == 1 else fdp.ConsumeIntInRange(1, bound)


def floats(fdp: atheris.FuzzedDataProvider, n: int) -> list[float]:
    """n float values: ordinary ones in [-8, 8], or a mix with NaN, infinities and float16's limits."""
    if fdp.ConsumeBool():
        return fdp.ConsumeFloatListInRange(n, -8.0, 8.0)
    return [pick(fdp, SPECIAL_FLOATS) if fdp.ConsumeIntInRange(0, 3) == 0 else fdp.ConsumeFloatInRange(-100, 100)
            for _ in range(n)]


def ids(fdp: atheris.FuzzedDataProvider, n: int, num_rows: int) -> list[int]:
    """n ids: all in [0, num_rows), some at or past the range's bounds, or any int64."""
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 3:
        return fdp.ConsumeIntListInRange(n, INT64_MIN, INT64_MAX)
    out = fdp.ConsumeIntListInRange(n, 0, max(0, num_rows - 1))
    out += [0] * (n - len(out))
    if kind >= 1 and n:
        for _ in range(fdp.ConsumeIntInRange(1, 2)):
            out[fdp.ConsumeIntInRange(0, n - 1)] = pick(fdp, boundary_ints(num_rows))
    return out


def split(fdp: atheris.FuzzedDataProvider, n: int) -> list[int]:
    """Bag lengths that add up to n (empty bags among them)."""
    lengths = []
    left = n
    while left > 0 and len(lengths) < 16:
        take = fdp.ConsumeIntInRange(0, left)
        lengths.append(take)
        left -= take
    return lengths + [left] if left else lengths


def bags(fdp: atheris.FuzzedDataProvider, n: int) -> list[int]:
    """Bag lengths: a split of n ids, or one spoilt (negative, off by one, huge)."""
    lengths = split(fdp, n)
    if fdp.ConsumeIntInRange(0, 4) == 0:
        spoil = pick(fdp, [-1, 1, INT32_MAX, INT32_MIN, -n])
        if lengths and fdp.ConsumeBool():
            lengths[fdp.ConsumeIntInRange(0, len(lengths) - 1)] = spoil
        else:
            lengths.insert(fdp.ConsumeIntInRange(0, len(lengths)), spoil)
    return lengths


def trim(fdp: atheris.FuzzedDataProvider, data: bytes) -> bytes:
    """data, or now and then data cut by a few bytes (a field of the wrong size)."""
    if data and fdp.ConsumeIntInRange(0, 9) == 0:
        return data[:-fdp.ConsumeIntInRange(1, min(7, len(data)))]
    return data


def main(make_harness, prefix: str, argv: list[str] | None = None) -> None:
    """Runs make_harness(work_dir) under libFuzzer with the command line's libFuzzer flags (-runs=N,
    -max_total_time=S, a corpus directory, a crash input to replay), in a child process: libFuzzer
    ends the process without Python's clean-up, so this one removes the work directory (on a tmpfs
    when there is one: the harnesses fsync) and exits as the child did (128 + the signal that killed
    it).  Unless the flags say otherwise, inputs are up to 2 KiB from the start (a structured request
    takes a few hundred bytes)."""
    argv = list(sys.argv if argv is None else argv)
    for flag, default in (("-max_len=", "2048"), ("-len_control=", "0")):
        if not any(a.startswith(flag) for a in argv[1:]):
            argv.append(flag + default)
    work = tempfile.mkdtemp(prefix=prefix, dir=SHM if os.path.isdir(SHM) else None)
    try:
        pid = os.fork()
        if pid == 0:
            atheris.Setup(argv, make_harness(Path(work)))
            atheris.Fuzz()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)
