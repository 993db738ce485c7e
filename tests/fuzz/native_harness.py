"""Atheris harness of the C kernels through their Python wrappers (embtierd/native.py): what the
store hands them, and what it must never hand them, comes back as an EmbtierError or a right answer.

Each input builds a table (geometry near the limits: rows, dim, dtype, chunk shift and count),
backs its rows with DRAM chunks of numpy memory, publishes every row, writes rows of known values
and gives it a key space now and then (DENSE, HASHED, MANAGED or MAPPED), then runs a sequence of
wrapper calls with fuzzed arguments: gather, pool (every mode, with and without weights),
partition, write_rows, write_slots, publish, read_rows, the managed map's plan, apply, load and
epoch, set_mapping, hash_rows, set_cxl_delay, set_chunk_part, take_dirty; then quantize and
dequantize, and the write-ahead log's group commit (append, wait, switch on a temporary file).
Arrays come with the right dtype, shape, contiguity and writability or with one of them wrong (or
not an ndarray at all); ids in range, at the bounds or anywhere in int64; lengths that add up or
not; integers within their C parameter's type.  The wrappers may raise EmbtierError (with a
message, not INTERNAL); GroupCommit its documented ValueError and OSError.  Anything else is a
finding (common.py), as is a crash of the process, and so is a wrong answer: a gather, a pooled
lookup of a dense table, a read of rows, the hash of HASHED rows, a dequantized row that differ
from what numpy computes from the rows written.

  python -m tests.fuzz.native_harness [libFuzzer flags: -runs=N, -max_total_time=S, CORPUS_DIR, ...]
"""

from __future__ import annotations

import os
from pathlib import Path

import atheris
import numpy as np

np.seterr(all="ignore")  # (casts of NaN and overflows in the harness's own arrays are intended)

from tests.fuzz.common import (
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    UINT64_MAX,
    Finding,
    bags,
    count,
    floats,
    ids,
    main,
    pick,
)

with atheris.instrument_imports(include=["embtierd", "embtier"]):
    from embtier.keys import hashed_rows
    from embtierd import codec, native
    from embtierd.errors import EmbtierError

DTYPES = list(native.DTYPES)
WRONG_DTYPES = [np.int32, np.int64, np.float32, np.float64, np.uint32, np.uint8, np.int8, np.float16, np.bool_]
KEY_SPACES = ["dense", "hashed", "managed", "mapped"]


def array(fdp: atheris.FuzzedDataProvider, values, dtype, writable: bool = False):
    """values as a C-contiguous array of dtype, or now and then with something wrong: another dtype,
    strided, two-dimensional, read-only where it is written, a list, None."""
    arr = np.ascontiguousarray(np.asarray(values).astype(dtype, copy=False))
    k = fdp.ConsumeIntInRange(0, 23)
    if k == 0:
        return arr.astype(pick(fdp, WRONG_DTYPES))
    if k == 1:
        return np.repeat(arr, 2)[::2] if arr.ndim == 1 else arr.T
    if k == 2:
        return arr.reshape(1, -1)
    if k == 3 and writable:
        arr.flags.writeable = False
        return arr
    if k == 4:
        return arr.tolist()
    if k == 5:
        return None
    return arr


def sized(fdp: atheris.FuzzedDataProvider, shape: tuple, dtype, writable: bool = True):
    """An output buffer of shape, or one a little too small or too large, or wrong as array() says."""
    n = int(np.prod(shape))
    k = fdp.ConsumeIntInRange(0, 9)
    if k == 0 and n:
        shape = (n - 1,)
    elif k == 1:
        shape = (n + 3,)
    return array(fdp, np.zeros(shape), dtype, writable)


class Table:
    """A NativeTable with every row in DRAM chunks of numpy memory, and its rows as written (float32)."""

    def __init__(self, fdp: atheris.FuzzedDataProvider):
        self.num_rows = pick(fdp, [1, 2, 3, 7, 64, 100, 257])
        self.dim = pick(fdp, [1, 2, 3, 4, 8, 16, 17, 64])
        self.dtype = pick(fdp, DTYPES)
        self.chunk_shift = fdp.ConsumeIntInRange(0, 9)
        chunks = -(-self.num_rows >> self.chunk_shift)
        self.t = native.NativeTable("f", self.num_rows, self.dim, self.dtype, self.chunk_shift,
                                    chunks + fdp.ConsumeIntInRange(0, 2))
        rows_per_chunk = 1 << self.chunk_shift
        self.memory = np.zeros(chunks * rows_per_chunk * self.t.stride + 64, np.uint8)  # the chunks' storage
        base = self.memory.ctypes.data
        for c in range(chunks):
            self.t.set_chunk(native.TIER_DRAM, c, base + c * rows_per_chunk * self.t.stride,
                             rows_per_chunk * self.t.stride)
        self.t.set_parts(fdp.ConsumeIntInRange(1, 4))
        all_ids = np.arange(self.num_rows, dtype=np.int64)
        self.t.publish(all_ids, all_ids.astype(np.uint32))
        values = np.array(floats(fdp, self.num_rows * self.dim), np.float64).astype(np.float32)
        values = np.nan_to_num(values, nan=1.0, posinf=2.0, neginf=-2.0).reshape(self.num_rows, self.dim)
        if self.dtype == "float16":
            values = np.clip(values, -60000, 60000)
        if self.dtype == "int8":
            values = np.clip(values, -1e30, 1e30)
        encoded = codec.encode(values, self.dtype, self.t.stride)
        self.t.write_rows(all_ids, encoded)
        self.rows = codec.decode(encoded, self.dtype, self.dim)  # what reads must return
        self.keys = "dense"

    def give_keys(self, fdp: atheris.FuzzedDataProvider) -> None:
        kind = pick(fdp, KEY_SPACES)
        if kind == "mapped":
            n = count(fdp, 6)
            self.t.set_mapping(pick(fdp, [0, 5, UINT64_MAX]), array(fdp, ids(fdp, n, 1000), np.int64),
                               array(fdp, ids(fdp, n, self.num_rows), np.int64),
                               pick(fdp, [0, 1, self.num_rows - 1, self.num_rows, -1]))
        else:
            self.t.set_keys(kind, pick(fdp, [0, 1, UINT64_MAX, 2**64, -1]), pick(fdp, [0.0, 1.0, -1.0, 1e10]))
        self.keys = kind


def close(a, b, what: str, rtol: float = 1e-5, atol: float = 0.0) -> None:
    """a == b within rtol, or atol (float32 rounding in another order: an int8 row's bias + code x scale,
    a pooled sum's cancellations); infinities equal, values past 1e37 not compared."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isclose(a, b, rtol=rtol, atol=atol + 1e-30) | (np.isinf(a) & (a == b)) | (np.abs(b) > 1e37)
    if not ok.all():
        bad = tuple(np.argwhere(~ok)[0])
        raise Finding(f"{what}: {a[bad]} != numpy's {b[bad]} at {bad}")


def slack(table, ids_: np.ndarray, bag: int = 1, weights=None) -> float:
    """The absolute rounding allowed when table's rows ids_ are read (int8: its largest code step) and
    pooled bag at a time."""
    if not ids_.size:
        return 0.0
    big = float(np.abs(table.rows[ids_]).max()) * (1 if weights is None else float(np.abs(weights).max(initial=1)))
    return big * (1e-5 if table.dtype == "int8" else 1e-6) * max(1, bag)


def reference_pool(rows: np.ndarray, ids_: np.ndarray, lengths: np.ndarray, weights, mode: int) -> np.ndarray:
    out = np.zeros((lengths.size, rows.shape[1]), np.float64)
    start = 0
    for b, n in enumerate(lengths):
        if n:
            picked = rows[ids_[start:start + n]].astype(np.float64)
            if weights is not None:
                picked = picked * weights[start:start + n, None]
            out[b] = (picked.sum(0) if mode == native.POOL_MODES["sum"] else picked.mean(0)
                      if mode == native.POOL_MODES["mean"] else picked.max(0))
        start += n
    return out


class Harness:
    def __init__(self, work: Path) -> None:
        self.dir = work

    def __call__(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        try:
            section = fdp.ConsumeIntInRange(0, 7)
            if section == 0:
                self.quantization(fdp)
            elif section == 1:
                self.group_commit(fdp)
            else:
                self.table(fdp)
        except EmbtierError as e:
            if not str(e) or e.status == "INTERNAL":
                raise Finding(f"{type(e).__name__} ({e.status}): {e!r}") from e

    def table(self, fdp: atheris.FuzzedDataProvider) -> None:
        table = Table(fdp)
        try:
            if fdp.ConsumeIntInRange(0, 3) == 0:
                table.give_keys(fdp)
            for _ in range(fdp.ConsumeIntInRange(1, 6)):
                op = pick(fdp, [self.gather, self.pool, self.partition, self.write, self.read, self.publish,
                                self.managed, self.misc])
                try:
                    op(fdp, table)
                except EmbtierError as e:
                    if not str(e) or e.status == "INTERNAL":
                        raise Finding(f"{op.__name__}: {type(e).__name__} ({e.status}): {e!r}") from e
        finally:
            table.t.mark_dropped()

    def _ids(self, fdp, table: Table, n: int) -> list[int]:
        return ids(fdp, n, table.num_rows)

    def gather(self, fdp, table: Table) -> None:
        n = count(fdp, 40)
        raw = self._ids(fdp, table, n)
        id_arr = array(fdp, raw, np.int64)
        out = sized(fdp, (n, table.dim), np.float32)
        tier_rows = sized(fdp, (3,), np.int64) if fdp.ConsumeBool() else None
        part_rows = sized(fdp, (table.t.nparts,), np.int64) if fdp.ConsumeBool() else None
        unknown = sized(fdp, (1,), np.int64) if fdp.ConsumeBool() else None
        by_key = table.keys != "dense" and fdp.ConsumeBool()
        table.t.gather(id_arr, out, tier_rows, part_rows, by_key, unknown)
        if not by_key:
            picked = np.array(raw, np.int64)
            close(np.asarray(out).reshape(-1)[:n * table.dim].reshape(n, table.dim), table.rows[picked], "gather",
                  atol=slack(table, picked))

    def pool(self, fdp, table: Table) -> None:
        n = count(fdp, 40)
        raw = self._ids(fdp, table, n)
        lengths = bags(fdp, n)
        weights = (array(fdp, np.array(floats(fdp, max(0, n + pick(fdp, [0, 0, 0, 1, -1])))), np.float32)
                   if fdp.ConsumeBool() else None)
        mode = pick(fdp, [0, 1, 2, 0, 1, 2, 3, -1, INT32_MAX])
        out = sized(fdp, (len(lengths), table.dim), np.float32)
        by_key = table.keys != "dense" and fdp.ConsumeBool()
        table.t.pool(array(fdp, raw, np.int64), array(fdp, lengths, np.int32), weights, mode, out,
                     sized(fdp, (3,), np.int64) if fdp.ConsumeBool() else None, None, by_key)
        used = weights if isinstance(weights, np.ndarray) else None  # (None: no weights, as the wrapper takes it)
        if not by_key and (used is None or np.isfinite(used).all()):
            ref = reference_pool(table.rows, np.array(raw, np.int64), np.array(lengths), used, mode)
            close(np.asarray(out).reshape(-1)[:ref.size].reshape(ref.shape), ref, f"pool mode {mode}", rtol=1e-4,
                  atol=slack(table, np.array(raw, np.int64), max(lengths, default=1), used))

    def partition(self, fdp, table: Table) -> None:
        n = count(fdp, 30)
        lengths = bags(fdp, n)
        weights = array(fdp, floats(fdp, n), np.float32) if fdp.ConsumeBool() else None
        nparts = table.t.nparts
        table.t.partition(array(fdp, self._ids(fdp, table, n), np.int64), array(fdp, lengths, np.int32), weights,
                          sized(fdp, (n,), np.int64), sized(fdp, (nparts * len(lengths),), np.int32),
                          sized(fdp, (n,), np.float32) if weights is not None else None,
                          sized(fdp, (nparts,), np.int64), table.keys != "dense" and fdp.ConsumeBool(),
                          sized(fdp, (1,), np.int64) if fdp.ConsumeBool() else None)

    def write(self, fdp, table: Table) -> None:
        n = count(fdp, 20)
        raw = self._ids(fdp, table, n)
        values = np.array(floats(fdp, n * table.dim), np.float64).astype(np.float32).reshape(n, table.dim)
        values = np.nan_to_num(np.clip(values, -60000, 60000), nan=0.0)
        encoded = codec.encode(values, table.dtype, table.t.stride)
        rows = encoded if fdp.ConsumeIntInRange(0, 5) else sized(fdp, encoded.shape, np.uint8)
        given = array(fdp, rows, np.uint8) if rows is encoded else rows
        table.t.write_rows(array(fdp, raw, np.int64), given)
        if given is encoded:  # (the ids were all valid rows): what numpy says the rows are now
            last = n - 1 - np.unique(np.array(raw[::-1], np.int64), return_index=True)[1]
            table.rows[np.array(raw, np.int64)[last]] = codec.decode(encoded[last], table.dtype, table.dim)
            close(codec.decode(read_all(table), table.dtype, table.dim), table.rows, "write_rows, then read_rows")
        else:  # (a larger buffer than the rows need: its first rows were written)
            table.rows = codec.decode(read_all(table), table.dtype, table.dim)

    def read(self, fdp, table: Table) -> None:
        n = count(fdp, 20)
        raw = self._ids(fdp, table, n)
        out = sized(fdp, (n, table.t.stride), np.uint8)
        table.t.read_rows(array(fdp, raw, np.int64), out)
        close(codec.decode(np.asarray(out).reshape(-1)[:n * table.t.stride].reshape(n, table.t.stride), table.dtype,
                           table.dim), table.rows[np.array(raw, np.int64)], "read_rows")

    def publish(self, fdp, table: Table) -> None:
        """Swaps the homes of some rows (write_slots of each row into another's slot, then publish:
        the mover's copy-then-publish, its rows reading the same after), or tries forged entries."""
        n = count(fdp, 8)
        if fdp.ConsumeIntInRange(0, 3) == 0:
            raw = self._ids(fdp, table, n)
            slots = fdp.ConsumeIntListInRange(n, 0, table.num_rows - 1)
            slots += [0] * (n - len(slots))
            if n:
                slots[fdp.ConsumeIntInRange(0, n - 1)] = pick(fdp, [table.num_rows, 1 << table.t.tier_shift,
                                                                    (2 << table.t.tier_shift) | 1, 2**32 - 1])
            locs = np.array(slots, np.int64).astype(np.uint32)
            stored = np.zeros((n, table.t.stride), np.uint8)
            try:
                table.t.write_slots(array(fdp, locs, np.uint32), array(fdp, stored, np.uint8))
                table.t.publish(array(fdp, raw, np.int64), array(fdp, locs, np.uint32))
            except EmbtierError as e:  # (an entry naming no slot with storage is the mover's bug: INTERNAL)
                if not str(e):
                    raise Finding(f"publish: {type(e).__name__} without a message") from e
            table.rows = codec.decode(read_all(table), table.dtype, table.dim)
            return
        src = np.unique(np.array(fdp.ConsumeIntListInRange(n, 0, table.num_rows - 1), np.int64))
        order = np.array(fdp.ConsumeIntListInRange(src.size, 0, 1 << 30), np.int64)
        order = np.r_[order, np.zeros(src.size - order.size, np.int64)]
        locs = np.ascontiguousarray(table.t.loc[src][np.argsort(order, kind="stable")])
        stored = np.empty((src.size, table.t.stride), np.uint8)
        table.t.read_rows(src, stored)
        table.t.write_slots(locs, stored)
        table.t.publish(src, locs)
        check = np.empty_like(stored)
        table.t.read_rows(src, check)
        if not np.array_equal(check, stored):
            raise Finding("publish: a row read back is not the one written to its new slot")

    def managed(self, fdp, table: Table) -> None:
        n = count(fdp, 12)
        raw = np.array(ids(fdp, n, 50), np.int64)
        k = fdp.ConsumeIntInRange(0, 4)
        if k == 0:
            rows, _fresh = table.t.plan_keys(array(fdp, raw, np.int64))
            table.t.apply_keys(raw, rows if fdp.ConsumeIntInRange(0, 3) else array(fdp, rows, np.int64))
        elif k == 1:
            table.t.apply_keys(array(fdp, raw, np.int64), array(fdp, ids(fdp, n, table.num_rows), np.int64))
        elif k == 2:
            table.t.load_keys(array(fdp, raw, np.int64))
        elif k == 3:
            table.t.keys_epoch()
        else:
            stats = table.t.keys_stats()
            keys = table.t.keys_of_rows
            if keys.size != (stats["live"] if table.keys == "managed" else 0):
                raise Finding(f"keys_of_rows has {keys.size} ids, keys_stats says {stats['live']} live")

    def misc(self, fdp, table: Table) -> None:
        k = fdp.ConsumeIntInRange(0, 4)
        if k == 0:
            table.t.set_cxl_delay(pick(fdp, [0, 1, native.lib.ET_CXL_DELAY_MAX_NS + 1, -1, 1.5, True]))
            table.t.set_cxl_delay(0)
        elif k == 1:
            table.t.set_chunk_part(pick(fdp, [0, 1, 2, 3, -1]), pick(fdp, [0, 1, -1, 2**40]),
                                   pick(fdp, [0, 1, 254, 255, -1]))
        elif k == 2:
            dirty = table.t.take_dirty()
            if dirty.size != (table.num_rows + 63) // 64:
                raise Finding(f"take_dirty: {dirty.size} words for {table.num_rows} rows")
        elif k == 3:
            n = count(fdp, 10)
            raw = np.array(ids(fdp, n, 1 << 40), np.int64)
            seed, rows = pick(fdp, [0, 9, UINT64_MAX]), pick(fdp, [1, 7, 2**32, 2**32 + 1, 0, -1, INT64_MAX])
            got = native.hash_rows(array(fdp, raw, np.int64), seed, rows)
            if not np.array_equal(got, hashed_rows(raw, rows, seed)):
                raise Finding(f"hash_rows({raw.tolist()}, {seed}, {rows}) differs from embtier.keys.hashed_rows")
        else:
            locs = table.t.loc[:fdp.ConsumeIntInRange(0, table.num_rows)]
            table.t.parts_of_locs(locs)

    def quantization(self, fdp: atheris.FuzzedDataProvider) -> None:
        n, dim = count(fdp, 8), pick(fdp, [1, 2, 3, 5, 8, 33])
        bits = pick(fdp, [2, 3, 4, 8, 2, 3, 4, 8, 0, 1, 5, 16, -1, True])
        rows = np.array(floats(fdp, n * dim), np.float64).astype(np.float32).reshape(n, dim)
        adaptive, fp16 = fdp.ConsumeBool(), fdp.ConsumeBool()
        given = array(fdp, rows, np.float32)
        codes, lo, scale = native.quantize(given, bits, adaptive, fp16)
        rows = given  # (what was accepted: a float32 matrix, perhaps of another shape than asked)
        n, dim = rows.shape
        k = fdp.ConsumeIntInRange(0, 5)
        if k == 0:  # parameters that are not a quantizer's
            lo, scale = lo.copy(), scale.copy()
            if n:
                lo[fdp.ConsumeIntInRange(0, n - 1)] = pick(fdp, [float("nan"), float("inf"), 3e38])
                scale[fdp.ConsumeIntInRange(0, n - 1)] = pick(fdp, [-1.0, float("nan"), 3e38])
        back = native.dequantize(array(fdp, codes, np.uint8) if k == 1 else codes, lo, scale, dim, bits)
        if k > 1 and np.isfinite(rows).all() and n:
            span = rows.max(1).astype(np.float64) - rows.min(1)
            error = np.abs(back.astype(np.float64) - rows).max(1)
            rounding = (2.0**-10 if fp16 else 1e-6) * np.abs(rows).max(1)  # (float16 parameters round lo and scale)
            if (error > span + rounding + 1e-30).any():
                raise Finding(f"quantize/dequantize {bits} bits: an error over the row's range")

    def group_commit(self, fdp: atheris.FuzzedDataProvider) -> None:
        path = self.dir / "wal"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            commit = native.GroupCommit(pick(fdp, [0, 1, 5, -1, INT64_MAX]))
            table = Table(fdp) if fdp.ConsumeIntInRange(0, 2) == 0 else None  # for logged writes
            lsn = 0
            for _ in range(fdp.ConsumeIntInRange(1, 6)):
                next_lsn = min(lsn + 1, INT64_MAX)  # (LSNs are int64 in C)
                try:
                    k = fdp.ConsumeIntInRange(0, 4)
                    if k == 4 and table is not None:
                        lsn = self.logged_write(fdp, commit, table, next_lsn, fd)
                    elif k == 0:
                        commit.switch(pick(fdp, [fd, -1, 1_000_000, INT32_MIN]), pick(fdp, [0, lsn, -1]),
                                      pick(fdp, [0, lsn, next_lsn, -1]))
                    elif k == 1:
                        lsn = pick(fdp, [next_lsn, next_lsn, lsn, 0, -1, INT64_MAX])
                        parts = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
                                 for _ in range(fdp.ConsumeIntInRange(0, 18))]
                        commit.append(lsn, pick(fdp, [1, 2, 0, 255, 256, -1]), parts, os.fstat(fd).st_size)
                    else:
                        commit.wait(pick(fdp, [lsn, next_lsn, 0, -1, INT64_MAX]))
                except (ValueError, OSError):
                    pass
        finally:
            if table is not None:
                table.t.mark_dropped()
            os.close(fd)

    def logged_write(self, fdp, commit, table: Table, lsn: int, fd: int) -> int:
        """A write's record and rows in one call (et_write_rows_logged); returns the LSN it used.
        Written rows must read back; a refused one leaves the rows as they were."""
        n = count(fdp, 10)
        raw = ids(fdp, n, table.num_rows)
        values = np.clip(np.array(floats(fdp, n * table.dim), np.float64), -60000, 60000)
        encoded = codec.encode(np.nan_to_num(values).astype(np.float32).reshape(n, table.dim), table.dtype,
                               table.t.stride)
        given_ids, given_rows = array(fdp, raw, np.int64), array(fdp, encoded, np.uint8)
        before = read_all(table)
        try:
            failed = commit.append(lsn, 1, [fdp.ConsumeBytes(16)], os.fstat(fd).st_size,
                                   write=(table.t, given_ids, given_rows))
        except EmbtierError as e:
            if not str(e) or e.status == "INTERNAL":
                raise Finding(f"logged write: {type(e).__name__} ({e.status}): {e!r}") from e
            if not np.array_equal(read_all(table), before):
                raise Finding(f"logged write refused ({e}) but rows changed")
            return lsn - 1
        if failed is not None:
            raise Finding(f"logged write: the record was written but storing the rows failed: {failed!r}")
        ids_ = np.array(raw, np.int64)
        last = n - 1 - np.unique(ids_[::-1], return_index=True)[1]
        if not np.array_equal(read_all(table)[ids_[last]], encoded[last]):
            raise Finding("logged write: rows read back differ from those written")
        return lsn


def read_all(table: Table) -> np.ndarray:
    out = np.empty((table.num_rows, table.t.stride), np.uint8)
    table.t.read_rows(np.arange(table.num_rows, dtype=np.int64), out)
    return out


if __name__ == "__main__":
    main(Harness, "embtier-fuzz-native-")
