"""Fuzz harness of the kernels' C boundary, run by test_native_boundary.py in a process of its own
on an AddressSanitizer build of native/ (a cffi module in a directory; this file imports nothing
of embtierd, so the real build stays out of the process).

It calls every entry point with random tables (dtypes, dims, chunk geometry, valid or not), random
storage (memory chunks of random sizes, SCM file space at random offsets, parts), placement entries
forged straight into the map (random, past the last tier, past max_chunks, past a chunk's storage)
or published, random ids (in range, negative, huge), lengths (negative, not summing up), buffers of
random sizes (none, too small, right, larger; NULL now and then), and random dtypes, modes, tiers,
chunk indexes, bits, instruction sets and thread counts.  Every call must return one of the
boundary's codes, and the lookups, the partition and the row calls the very code (and position)
that a model of the boundary's checks predicts, in its documented order (argument, size, id,
lengths, dropped, placement entry).  An out-of-bounds access is the sanitizer's to report (the
process then aborts).  Exits 1 on a wrong code, or when some entry point was never called.

  python native_fuzz.py MODULE_DIR MODULE WORK_DIR [--seed N] [--iterations N] [--seconds S]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import time
from pathlib import Path

import numpy as np

NUM_TIERS = 3
SCM_BLOCK = 4096
MAX_TABLES = 4
SCM_FILE_BYTES = 4 << 20


class Mismatch(Exception):
    """A call returned what the boundary's contract does not allow."""


class Recorder:
    """lib, counting the calls of each entry point."""

    def __init__(self, lib):
        self._lib = lib
        self.calls: collections.Counter = collections.Counter()

    def __getattr__(self, name):
        value = getattr(self._lib, name)
        if not callable(value):
            return value

        def call(*args):
            self.calls[name] += 1
            return value(*args)
        return call

    def entry_points(self) -> set[str]:
        return {name for name in dir(self._lib) if callable(getattr(self._lib, name))}


class Table:
    """A live C table and the harness's model of what the boundary knows about it."""

    def __init__(self, fz: Fuzzer, handle, num_rows: int, dim: int, dtype: int, chunk_shift: int,
                 max_chunks: int, scm_path: Path):
        ffi, lib = fz.ffi, fz.lib
        self.h, self.num_rows, self.dim, self.dtype = handle, num_rows, dim, dtype
        self.chunk_shift, self.max_chunks = chunk_shift, max_chunks
        self.stride = lib.et_row_stride(dim, dtype)
        self.tier_shift = lib.et_table_tier_shift(handle)
        self.chunk_bits = self.tier_shift - chunk_shift
        self.entries = NUM_TIERS << self.chunk_bits
        self.slots = np.zeros(self.entries, dtype=np.int64)   # slots with storage, per chunk index
        self.parts = np.zeros(self.entries, dtype=np.int64)   # fabric part, per chunk index
        self.memory: dict[int, np.ndarray] = {}                # chunk index -> the buffer C points at
        self.nparts = 0
        self.dirty: np.ndarray | None = None                   # the bitmap C points at
        self.dropped = False
        self.scm_fd = -1
        self.scm_path = scm_path
        self.fd = os.open(scm_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, SCM_FILE_BYTES)
        count = ffi.new("int64_t *")
        loc = lib.et_table_loc(handle, count)
        fz.expect(count[0] == num_rows, "et_table_loc", f"{count[0]} entries for {num_rows} rows")
        # the map, writable here only to forge corruption: the harness plays the memory error
        self.loc = np.frombuffer(ffi.buffer(ffi.cast("uint32_t *", loc), 4 * num_rows), dtype=np.uint32)
        heat = lib.et_table_heat(handle, count)
        fz.expect(count[0] == num_rows, "et_table_heat", f"{count[0]} entries for {num_rows} rows")
        self.heat = np.frombuffer(ffi.buffer(heat, num_rows), dtype=np.uint8)

    def index(self, entry: int) -> int:
        return entry >> self.chunk_shift

    def valid(self, entry: int) -> bool:
        """The model of et_loc_valid."""
        i = self.index(entry)
        return i < self.entries and (entry & ((1 << self.chunk_shift) - 1)) < self.slots[i]

    def entry(self, tier: int, chunk: int, slot: int) -> int:
        return ((tier << self.tier_shift) | (chunk << self.chunk_shift) | slot) & 0xFFFFFFFF

    def valid_entries(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """count random entries that name slots with storage (empty when there are none)."""
        chunks = np.flatnonzero(self.slots)
        if not chunks.size:
            return np.empty(0, dtype=np.uint32)
        picked = rng.choice(chunks, count)
        slots = (rng.random(count) * self.slots[picked]).astype(np.int64)
        return ((picked << self.chunk_shift) | slots).astype(np.uint32)

    def scm_rows(self, nbytes: int) -> int:
        """Rows that nbytes of SCM file space hold (rows never straddle a 4 KiB block)."""
        per_block = SCM_BLOCK // self.stride if self.stride <= SCM_BLOCK else 0
        row_bytes = -(-self.stride // SCM_BLOCK) * SCM_BLOCK
        return nbytes // SCM_BLOCK * per_block if per_block else nbytes // row_bytes


class Fuzzer:
    def __init__(self, lib, ffi, work: Path, seed: int):
        self.lib, self.ffi, self.work = Recorder(lib), ffi, work
        self.rng = np.random.default_rng(seed)
        self.tables: list[Table] = []
        self.codes: collections.Counter = collections.Counter()
        self.paths: collections.Counter = collections.Counter()
        self.serial = 0
        self.err = ffi.new("int64_t *")
        c = lib
        self.ok = c.ET_OK
        self.boundary_codes = {c.ET_OK, c.ET_E_ID_RANGE, c.ET_E_LENGTHS, c.ET_E_IO, c.ET_E_NOMEM, c.ET_E_ARG,
                               c.ET_E_DROPPED, c.ET_E_LOCATION, c.ET_E_SIZE}
        self.names = {getattr(c, name): name for name in dir(c) if name.startswith("ET_E_")} | {0: "ET_OK"}

    # ---- checks ------------------------------------------------------------------------------

    def expect(self, condition: bool, call: str, what: str) -> None:
        if not condition:
            raise Mismatch(f"{call}: {what}")

    def verify(self, call: str, rc: int, expected: tuple[int, int | None] | None) -> None:
        """rc must be the expected (code, *err_pos or None), or with None expected: OK, I/O or no memory."""
        self.codes[(call, self.names.get(rc, rc))] += 1
        self.expect(rc in self.boundary_codes, call, f"returned {rc}, not a code of the boundary")
        lib = self.lib
        if expected is None:
            self.expect(rc in (lib.ET_OK, lib.ET_E_IO, lib.ET_E_NOMEM), call,
                        f"returned {self.names[rc]} (err_pos {self.err[0]}) where the model sees no error")
            return
        code, pos = expected
        self.expect(rc == code, call, f"returned {self.names[rc]} (err_pos {self.err[0]}), "
                                      f"the model expects {self.names[code]} (err_pos {pos})")
        if pos is not None:
            self.expect(self.err[0] == pos, call, f"{self.names[rc]} at {self.err[0]}, the model expects {pos}")

    def first_failure(self, t: Table, arg: bool = False, size: bool = False, ids: np.ndarray | None = None,
                      lengths: np.ndarray | None = None, n: int = 0, entries: np.ndarray | None = None):
        """The outcome the boundary owes a call: its first failing check, in the documented order."""
        lib = self.lib
        if arg:
            return lib.ET_E_ARG, None
        if size:
            return lib.ET_E_SIZE, None
        if ids is not None:
            bad = np.flatnonzero((ids < 0) | (ids >= t.num_rows))
            if bad.size:
                return lib.ET_E_ID_RANGE, int(bad[0])
        if lengths is not None:
            negative = np.flatnonzero(lengths < 0)
            if negative.size:
                return lib.ET_E_LENGTHS, int(negative[0])
            if int(lengths.sum(dtype=np.int64)) != n:
                return lib.ET_E_LENGTHS, -1
        if t.dropped:
            return lib.ET_E_DROPPED, None
        if entries is not None:
            for p, entry in enumerate(entries.tolist()):
                if not t.valid(entry):
                    return lib.ET_E_LOCATION, p
        return None

    # ---- random inputs -----------------------------------------------------------------------

    def pick(self, *choices):
        return choices[self.rng.integers(len(choices))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def count(self) -> int:
        """How many ids a request has: mostly a few, now and then enough for several kernel threads."""
        return int(self.pick(0, 1, self.rng.integers(2, 64), self.rng.integers(64, 600),
                             self.rng.integers(16384, 24000) if self.chance(0.4) else 3))

    def ids(self, t: Table, n: int) -> np.ndarray:
        ids = self.rng.integers(0, t.num_rows, n, dtype=np.int64)
        if n and self.chance(0.15):
            ids[self.rng.integers(n)] = self.pick(-1, t.num_rows, t.num_rows + 5, 2**62, -2**63, 2**63 - 1)
        return ids

    def lengths(self, n: int, bags: int) -> np.ndarray:
        cuts = np.sort(self.rng.integers(0, n + 1, max(bags - 1, 0)))
        lengths = np.diff(np.concatenate([[0], cuts, [n]]))[:bags].astype(np.int32)
        if bags and self.chance(0.15):
            b = self.rng.integers(bags)
            lengths[b] = self.pick(-lengths[b] - 1, lengths[b] + 1, lengths[b] - 1, 2**31 - 1, -2**31)
        return lengths

    def size_for(self, need: int) -> int:
        """A buffer size for need elements: mostly right, now and then larger, smaller or none."""
        r = self.rng.random()
        return need if r < 0.85 else need + int(self.rng.integers(1, 9)) if r < 0.9 else \
            int(self.rng.integers(0, need)) if r < 0.97 and need else 0

    def buffer(self, need: int, dtype: type) -> np.ndarray:
        """A buffer of random bytes for need elements, of a random size; an allocation of its own, so that
        the sanitizer's redzone starts right after it."""
        return self.rng.integers(0, 256, self.size_for(need) * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)

    def told(self, arr: np.ndarray | None) -> int:
        """The size the harness tells C: the buffer's own, now and then less (never more)."""
        real = 0 if arr is None else arr.size
        return real if self.chance(0.95) else int(self.rng.integers(-3, real + 1))

    def ptr(self, ctype: str, arr: np.ndarray | None):
        return self.ffi.NULL if arr is None else self.ffi.from_buffer(ctype, arr)

    def optional(self, need: int, dtype: type) -> np.ndarray | None:
        return None if self.chance(0.4) else self.buffer(need, dtype)

    # ---- tables ------------------------------------------------------------------------------

    def table(self) -> Table:
        while not self.tables:
            self.new_table()
        return self.tables[self.rng.integers(len(self.tables))]

    def new_table(self) -> None:
        lib, ffi = self.lib, self.ffi
        valid = self.chance(0.85)
        num_rows = int(self.rng.integers(1, 3000)) if valid else self.pick(0, -5, 2**32 + 1, 2**62)
        dim = int(self.pick(1, 2, 3, 8, 16, 17, 33, 64, 70)) if valid else self.pick(0, -1, 2**30, 2**31 - 1, 5)
        dtype = int(self.rng.integers(0, 3)) if valid else self.pick(-1, 3, 7, 0)
        chunk_shift = int(self.rng.integers(0, 9)) if valid else self.pick(-1, 31, 29, 3)
        max_chunks = int(self.rng.integers(1, 40)) if valid else self.pick(0, -1, 2**40, 2**62)
        err = ffi.new("int *")
        handle = lib.et_table_new(num_rows, dim, dtype, chunk_shift, max_chunks, err)
        stride = lib.et_row_stride(dim, dtype)
        fits = 1 <= num_rows <= 2**32 and stride > 0 and 0 <= chunk_shift and max_chunks >= 1 and \
            chunk_shift + (max_chunks - 1).bit_length() <= 30
        if handle == ffi.NULL:
            self.codes[("et_table_new", self.names.get(err[0], err[0]))] += 1
            self.expect(err[0] == lib.ET_E_NOMEM or (err[0] == lib.ET_E_ARG and not fits), "et_table_new",
                        f"refused {num_rows} x {dim} dtype {dtype}, chunk_shift {chunk_shift}, max_chunks "
                        f"{max_chunks} with code {err[0]}")
            return
        self.expect(fits and err[0] == lib.ET_OK, "et_table_new", f"built a table of {num_rows} x {dim} dtype "
                    f"{dtype}, chunk_shift {chunk_shift}, max_chunks {max_chunks}")
        self.serial += 1
        t = Table(self, handle, num_rows, dim, dtype, chunk_shift, max_chunks, self.work / f"scm{self.serial}")
        self.tables.append(t)
        if self.chance(0.8):
            self.set_parts(t, valid=True)
        for _ in range(int(self.rng.integers(0, 6))):
            self.set_chunk(t, whole=self.chance(0.7))
        if self.chance(0.6):
            self.set_scm(t, valid=True)
            for _ in range(int(self.rng.integers(1, 4))):
                self.set_scm_chunk(t, valid=True)
        self.publish(t, every_row=True)
        if len(self.tables) > MAX_TABLES:
            self.free_table(self.tables[0])

    def free_table(self, t: Table) -> None:
        self.tables.remove(t)
        self.lib.et_table_free(t.h)
        os.close(t.fd)
        t.scm_path.unlink()

    def tier_and_chunk(self, t: Table) -> tuple[int, int]:
        return int(self.pick(0, 1, 2, 0, 1, -1, 3)), int(self.pick(*range(min(t.max_chunks, 6)), t.max_chunks,
                                                                   t.max_chunks - 1, -1, 2**40))

    def set_chunk(self, t: Table, whole: bool = False) -> None:
        lib, ffi = self.lib, self.ffi
        tier, chunk = (int(self.rng.integers(0, 2)), int(self.rng.integers(0, t.max_chunks))) if whole \
            else self.tier_and_chunk(t)
        rows = 1 << t.chunk_shift
        nbytes = rows * t.stride if whole else int(self.pick(rows * t.stride, self.rng.integers(0, rows + 2) * t.stride
                                                             + self.rng.integers(0, t.stride), 0, t.stride - 1))
        base = None if nbytes == 0 and self.chance(0.7) else self.rng.integers(0, 256, nbytes, dtype=np.uint8)
        # (an empty array still has an address: C sees NULL only for None)
        told = nbytes if base is None or self.chance(0.8) else int(self.rng.integers(0, nbytes + 1))
        if base is None and self.chance(0.2):
            told = int(self.rng.integers(1, 1 << 20))  # a size without a buffer
        rc = lib.et_table_set_chunk(t.h, tier, chunk, ffi.NULL if base is None else ffi.from_buffer(base), told)
        bad = not (0 <= tier < 2 and 0 <= chunk < t.max_chunks) or (base is None) != (told == 0)
        if bad:
            return self.verify("et_table_set_chunk", rc, (lib.ET_E_ARG, None))
        if base is not None and told < t.stride:
            return self.verify("et_table_set_chunk", rc, (lib.ET_E_SIZE, None))
        self.verify("et_table_set_chunk", rc, (lib.ET_OK, None))
        i = (tier << t.chunk_bits) + chunk
        t.slots[i] = 0 if base is None else min(told // t.stride, rows)
        if base is None:
            t.memory.pop(i, None)
        else:
            t.memory[i] = base

    def set_scm(self, t: Table, valid: bool = False) -> None:
        fd = t.fd if valid or self.chance(0.7) else self.pick(-1, -7)
        align = 4096 if valid else int(self.pick(512, 1024, 2048, 4096, 0, 3000, 8192, -512))
        rc = self.lib.et_table_set_scm(t.h, fd, align)
        ok = fd >= 0 and 512 <= align <= 4096 and align & (align - 1) == 0
        self.verify("et_table_set_scm", rc, (self.lib.ET_OK if ok else self.lib.ET_E_ARG, None))
        if ok:
            t.scm_fd = fd

    def set_scm_chunk(self, t: Table, valid: bool = False) -> None:
        """File space for an SCM chunk (valid: a whole chunk's, mostly inside the file)."""
        lib = self.lib
        whole = lib.et_scm_chunk_bytes(t.stride, 1 << t.chunk_shift)
        if valid:
            chunk, offset, nbytes = int(self.rng.integers(0, t.max_chunks)), SCM_BLOCK * int(self.rng.integers(0, 1100)), whole
        else:
            chunk = int(self.pick(*range(min(t.max_chunks, 4)), t.max_chunks, -1, t.max_chunks - 1))
            offset = int(self.pick(0, SCM_BLOCK * self.rng.integers(0, 1100), 100, 2**63, 2**64 - SCM_BLOCK))
            nbytes = int(self.pick(whole, self.rng.integers(0, whole + 1), 0, t.stride // 2, 2**63, 2**64 - 1))
        rc = lib.et_table_set_scm_chunk(t.h, chunk, offset, nbytes)
        if not 0 <= chunk < t.max_chunks or offset % SCM_BLOCK or offset > 2**63 - 1 or nbytes > 2**63 - 1 - offset:
            return self.verify("et_table_set_scm_chunk", rc, (lib.ET_E_ARG, None))
        if nbytes and t.scm_rows(nbytes) == 0:
            return self.verify("et_table_set_scm_chunk", rc, (lib.ET_E_SIZE, None))
        if nbytes and t.scm_fd < 0:
            return self.verify("et_table_set_scm_chunk", rc, (lib.ET_E_ARG, None))
        self.verify("et_table_set_scm_chunk", rc, (lib.ET_OK, None))
        t.slots[(2 << t.chunk_bits) + chunk] = min(t.scm_rows(nbytes), 1 << t.chunk_shift)

    def set_parts(self, t: Table, valid: bool = False) -> None:
        lib, ffi = self.lib, self.ffi
        nparts = int(self.pick(1, 2, 3, 5, 255) if valid else self.pick(1, 2, 3, 5, 255, 0, -1, 256))
        rc = lib.et_table_set_parts(t.h, nparts)
        ok = 1 <= nparts <= 255 and t.nparts == 0
        self.verify("et_table_set_parts", rc, None if ok else (lib.ET_E_ARG, None))
        if ok and rc == lib.ET_OK:
            t.nparts = nparts
        entries = ffi.new("int64_t *")
        parts = lib.et_table_chunk_parts(t.h, entries)
        want = t.entries if t.nparts else 0
        self.expect(entries[0] == want and (parts == ffi.NULL) == (want == 0), "et_table_chunk_parts",
                    f"{entries[0]} entries, want {want}")

    def set_chunk_part(self, t: Table) -> None:
        tier, chunk = self.tier_and_chunk(t)
        part = int(self.pick(0, 1, 2, t.nparts - 1, t.nparts, -1, 300))
        rc = self.lib.et_table_set_chunk_part(t.h, tier, chunk, part)
        ok = t.nparts and 0 <= tier < NUM_TIERS and 0 <= chunk < t.max_chunks and 0 <= part < t.nparts
        self.verify("et_table_set_chunk_part", rc, (self.lib.ET_OK if ok else self.lib.ET_E_ARG, None))
        if ok:
            t.parts[(tier << t.chunk_bits) + chunk] = part

    def random_entry(self, t: Table) -> int:
        """A placement entry of any kind: random bits, a tier past the last, any chunk and slot of a tier
        (chunks past max_chunks and slots past a chunk's storage among them), an SCM chunk past
        max_chunks, or one that names a slot with storage."""
        kind = self.rng.integers(5)
        chunk = int(self.rng.integers(0, 1 << t.chunk_bits))
        slot = int(self.rng.integers(0, 1 << t.chunk_shift))
        if kind == 0:
            return int(self.rng.integers(0, 2**32))
        if kind == 1:
            return t.entry(int(self.rng.integers(3, 1 << (32 - t.tier_shift))), chunk, slot)
        if kind == 2:
            return t.entry(int(self.rng.integers(0, 3)), chunk, slot)
        if kind == 3 and t.max_chunks < 1 << t.chunk_bits:
            return t.entry(2, int(self.rng.integers(t.max_chunks, 1 << t.chunk_bits)), slot)
        return int(t.valid_entries(1, self.rng)[0]) if t.slots.any() else 0

    def forge(self, t: Table) -> None:
        """Memory corruption: random entries written straight into the map."""
        for row in self.rng.integers(0, t.num_rows, int(self.rng.integers(1, 8))).tolist():
            t.loc[row] = self.random_entry(t)

    def entries_of(self, t: Table, n: int) -> np.ndarray:
        """n placement entries to write or publish: mostly valid ones, some of any kind."""
        locs = t.valid_entries(n, self.rng) if t.slots.any() else np.zeros(n, dtype=np.uint32)
        if n and self.chance(0.3):
            for i in self.rng.integers(0, n, int(self.rng.integers(1, 3))).tolist():
                locs[i] = self.random_entry(t)
        return locs

    # ---- calls -------------------------------------------------------------------------------

    def publish(self, t: Table, every_row: bool = False) -> None:
        lib = self.lib
        if every_row:
            ids, locs = np.arange(t.num_rows, dtype=np.int64), t.valid_entries(t.num_rows, self.rng)
            if not locs.size:
                return
        else:
            n = self.count()
            ids, locs = self.ids(t, n), self.entries_of(t, n)
            if self.chance(0.1):
                locs = locs[:int(self.rng.integers(0, n + 1))]
        n_told, locs_told = self.told(ids), locs.size if self.chance(0.9) else self.told(locs)
        null = n_told > 0 and self.chance(0.03)
        rc = lib.et_publish(t.h, self.ffi.NULL if null else self.ptr("int64_t *", ids), n_told,
                            self.ptr("uint32_t *", locs), locs_told, self.err)
        expected = self.first_failure(t, arg=n_told < 0 or null, size=locs_told != n_told, ids=ids[:n_told],
                                      entries=locs[:n_told])
        self.verify("et_publish", rc, expected)

    def write_slots(self, t: Table) -> None:
        n = self.count() % 300
        locs = self.entries_of(t, n)
        rows = self.buffer(n * t.stride, np.uint8)
        n_told, rows_told = self.told(locs), self.told(rows)
        rc = self.lib.et_write_slots(t.h, self.ptr("uint32_t *", locs), n_told, self.ptr("uint8_t *", rows),
                                     rows_told, self.err)
        size = n_told > 0 and not (rows_told >= 0 and n_told <= rows_told // t.stride)
        self.verify("et_write_slots", rc, self.first_failure(t, arg=n_told < 0, size=size, entries=locs[:n_told]))

    def rows_call(self, t: Table, write: bool) -> None:
        """et_write_rows or et_read_rows of random ids."""
        n = self.count() % 2000
        ids = self.ids(t, n)
        rows = self.buffer(n * t.stride, np.uint8)
        n_told, rows_told = self.told(ids), self.told(rows)
        call = "et_write_rows" if write else "et_read_rows"
        rc = getattr(self.lib, call)(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("uint8_t *", rows),
                                     rows_told, self.err)
        size = n_told > 0 and not (rows_told >= 0 and n_told <= rows_told // t.stride)
        valid_ids = ids[:max(n_told, 0)]
        entries = t.loc[valid_ids] if ((valid_ids >= 0) & (valid_ids < t.num_rows)).all() else None
        self.verify(call, rc, self.first_failure(t, arg=n_told < 0, size=size, ids=valid_ids, entries=entries))
        if entries is not None:
            self.note_path(call, t, rc, entries)

    def counters(self, t: Table) -> tuple[np.ndarray | None, np.ndarray | None]:
        """tier_rows and part_rows for a lookup (part_rows mostly only once the table has parts)."""
        return self.optional(NUM_TIERS, np.int64), (self.optional(t.nparts, np.int64)
                                                    if t.nparts or self.chance(0.1) else None)

    def check_counts(self, call: str, t: Table, rc: int, entries: np.ndarray, tier_rows, part_rows) -> None:
        """On success, the rows served per tier and per part are the model's."""
        if rc != self.lib.ET_OK:
            return
        if tier_rows is not None:
            want = np.bincount(entries.astype(np.int64) >> t.tier_shift, minlength=NUM_TIERS)
            self.expect(np.array_equal(tier_rows[:NUM_TIERS], want), call, f"tier_rows {tier_rows[:3]}, want {want}")
        if part_rows is not None:
            want = np.bincount(t.parts[entries.astype(np.int64) >> t.chunk_shift], minlength=t.nparts)
            self.expect(np.array_equal(part_rows[:t.nparts], want), call, f"part_rows {part_rows}, want {want}")

    def lookup(self, t: Table, pooled: bool) -> None:
        """et_gather or et_pool, every buffer of a random size."""
        lib = self.lib
        n = self.count()
        if n >= 16384 and self.chance(0.7):
            self.publish(t, every_row=True)  # (forged entries would stop most requests this large)
        ids = self.ids(t, n)
        bags = n if not pooled else int(self.pick(0, 1, max(n // 4, 1), n, n + 3))
        lengths = self.lengths(n, bags) if pooled else None
        weights = (self.buffer(n, np.float32) if self.chance(0.5) else None) if pooled else None
        out = self.buffer(bags * t.dim, np.float32) if not self.chance(0.02) else None
        tier_rows, part_rows = self.counters(t)
        mode = int(self.rng.integers(0, 3)) if not pooled or self.chance(0.95) else int(self.pick(-1, 3))
        n_told = self.told(ids)
        bags_told = self.told(lengths) if pooled else n_told
        out_told, weights_told, tier_told, part_told = (self.told(a) for a in (out, weights, tier_rows, part_rows))
        counters = (self.ptr("int64_t *", tier_rows), tier_told, self.ptr("int64_t *", part_rows), part_told)
        if pooled:
            rc = lib.et_pool(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("int32_t *", lengths), bags_told,
                             self.ptr("float *", weights), weights_told, mode, self.ptr("float *", out), out_told,
                             *counters, self.err)
        else:
            rc = lib.et_gather(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("float *", out), out_told,
                               *counters, self.err)
        arg = (not 0 <= mode <= 2) or bags_told < 0 or n_told < 0 or (out is None and bags_told > 0) or \
            (part_rows is not None and t.nparts == 0)
        size = (weights is not None and weights_told != n_told) or \
            not (bags_told <= 0 or (out_told >= 0 and bags_told <= out_told // t.dim)) or \
            (tier_rows is not None and tier_told < NUM_TIERS) or (part_rows is not None and part_told < t.nparts)
        ids = ids[:max(n_told, 0)]
        entries = t.loc[ids] if ((ids >= 0) & (ids < t.num_rows)).all() else None
        lengths = None if lengths is None else lengths[:max(bags_told, 0)]
        call = "et_pool" if pooled else "et_gather"
        self.verify(call, rc, self.first_failure(t, arg=arg, size=size, ids=ids, lengths=lengths, n=n_told,
                                                 entries=entries))
        if entries is not None:
            self.check_counts(call, t, rc, entries, tier_rows, part_rows)
            self.note_path(call, t, rc, entries)

    def note_path(self, call: str, t: Table, rc: int, entries: np.ndarray) -> None:
        """Counts the calls that got through to the rows, by path: SCM rows (the batch read) or none (the
        fused pipeline), on one kernel thread or several."""
        if rc == self.lib.ET_OK:
            scm = "with SCM rows" if ((entries.astype(np.int64) >> t.tier_shift) == 2).any() else "memory rows"
            parts = "several threads" if entries.size >= 16384 and self.lib.et_kernel_threads() > 1 and \
                call in ("et_gather", "et_pool") else "one thread"
            self.paths[(call, scm, parts)] += 1

    def partition(self, t: Table) -> None:
        lib = self.lib
        n = self.count()
        if n >= 16384 and self.chance(0.7):
            self.publish(t, every_row=True)
        ids = self.ids(t, n)
        bags = int(self.pick(0, 1, max(n // 4, 1), n))
        lengths = self.lengths(n, bags)
        weights = self.buffer(n, np.float32) if self.chance(0.5) else None
        out_ids = self.buffer(n, np.int64)
        out_lengths = self.buffer(max(t.nparts, 1) * bags, np.int32)
        out_weights = self.buffer(n, np.float32) if weights is not None or self.chance(0.2) else None
        part_rows = self.buffer(t.nparts, np.int64) if not self.chance(0.03) else None
        told = [self.told(a) for a in (ids, lengths, weights, out_ids, out_lengths, out_weights, part_rows)]
        n_told, bags_told, weights_told, out_ids_told, out_lengths_told, out_weights_told, part_rows_told = told
        rc = lib.et_partition(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("int32_t *", lengths), bags_told,
                              self.ptr("float *", weights), weights_told, self.ptr("int64_t *", out_ids), out_ids_told,
                              self.ptr("int32_t *", out_lengths), out_lengths_told, self.ptr("float *", out_weights),
                              out_weights_told, self.ptr("int64_t *", part_rows), part_rows_told, self.err)

        def holds(told: int, count: int, each: int) -> bool:
            return count <= 0 or (told >= 0 and count <= told // each)
        arg = n_told < 0 or bags_told < 0 or part_rows is None or (weights is not None and out_weights is None) or \
            t.nparts == 0
        size = (weights is not None and weights_told != n_told) or not holds(out_ids_told, n_told, 1) or \
            not holds(out_lengths_told, bags_told, max(t.nparts, 1)) or \
            (weights is not None and not holds(out_weights_told, n_told, 1)) or part_rows_told < t.nparts
        ids = ids[:max(n_told, 0)]
        ids_ok = ((ids >= 0) & (ids < t.num_rows)).all()
        entries = t.loc[ids] if ids_ok else None
        self.verify("et_partition", rc, self.first_failure(t, arg=arg, size=size, ids=ids,
                                                           lengths=lengths[:max(bags_told, 0)], n=n_told,
                                                           entries=entries))
        if rc == lib.ET_OK:
            self.note_path("et_partition", t, rc, entries)
            want = np.bincount(t.parts[entries.astype(np.int64) >> t.chunk_shift], minlength=t.nparts)
            self.expect(np.array_equal(part_rows[:t.nparts], want), "et_partition", f"part_rows {part_rows}")
            self.expect(np.array_equal(np.sort(out_ids[:n_told]), np.sort(ids)), "et_partition", "out_ids")

    def dirty(self, t: Table) -> None:
        lib = self.lib
        need = (t.num_rows + 63) // 64
        if self.chance(0.5):
            bits = None if self.chance(0.2) else self.buffer(need, np.uint64)
            told = self.told(bits)
            rc = lib.et_table_set_dirty(t.h, self.ptr("uint64_t *", bits), told)
            ok = bits is None or told >= need
            self.verify("et_table_set_dirty", rc, (lib.ET_OK if ok else lib.ET_E_SIZE, None))
            if ok:
                t.dirty = bits
        else:
            out = None if self.chance(0.05) else self.buffer(need, np.uint64)
            told = self.told(out)
            rc = lib.et_table_take_dirty(t.h, self.ptr("uint64_t *", out), told)
            want = lib.ET_E_ARG if out is None else lib.ET_E_SIZE if told < need else \
                lib.ET_OK if t.dirty is not None else lib.ET_E_ARG
            self.verify("et_table_take_dirty", rc, (want, None))

    def settings(self, t: Table) -> None:
        lib = self.lib
        lib.et_table_set_heat_sampling(t.h, int(self.pick(0, 1, 3, 16, 17, -1, 2**31 - 1)))
        lib.et_table_set_prefetch(t.h, int(self.pick(0, 1, 4, 16, 64, 256, 257, -1)))
        ns = int(self.pick(0, 5, 50, 1000000, 1000001, 2**32 - 1))
        rc = lib.et_table_set_cxl_delay(t.h, ns)
        self.verify("et_table_set_cxl_delay", rc, (lib.ET_OK if ns <= 1000000 else lib.ET_E_ARG, None))
        lib.et_table_set_cxl_delay(t.h, int(self.pick(0, 0, 20)))  # (a long injected wait would only cost time)
        if self.chance(0.3):
            t.heat[self.rng.integers(0, t.num_rows, 8)] = self.pick(0, 254, 255)  # the policy's in-place ageing

    def drop(self, t: Table) -> None:
        self.lib.et_table_mark_dropped(t.h)
        t.dropped = True

    def process_wide(self) -> None:
        lib = self.lib
        threads = int(self.pick(1, 2, 3, 1, 0, -1, 257))
        rc = lib.et_set_kernel_threads(threads)
        self.verify("et_set_kernel_threads", rc, None if 1 <= threads <= 256 else (lib.ET_E_ARG, None))
        self.expect(1 <= lib.et_kernel_threads() <= 3, "et_kernel_threads", "out of what was asked")
        isa = int(self.pick(0, 1, 2, -1, 3))
        rc = lib.et_force_isa(isa)
        self.codes[("et_force_isa", self.names.get(rc, rc))] += 1
        self.expect(rc == lib.ET_OK if isa == 0 else rc == lib.ET_E_ARG if not 0 <= isa <= 2 else
                    rc in (lib.ET_OK, lib.ET_E_ARG), "et_force_isa", f"{rc} for {isa}")  # (avx2 / avx512: if the CPU has it)
        self.expect(rc != lib.ET_OK or lib.et_isa() == isa, "et_isa", "not the forced instruction set")
        depth = int(self.pick(1, 8, 64, 256, 0, 257, -3))
        rc = lib.et_set_scm_queue_depth(depth)
        self.verify("et_set_scm_queue_depth", rc, (lib.ET_OK if 1 <= depth <= 256 else lib.ET_E_ARG, None))
        self.expect(lib.et_scm_async() in (0, 1), "et_scm_async", "not a boolean")

    def sizes(self) -> None:
        """The functions that compute sizes, on random and extreme arguments."""
        lib = self.lib
        dim, dtype = int(self.pick(1, 3, 8, 0, -4, 2**29, 2**31 - 1)), int(self.pick(0, 1, 2, 3, -1))
        stride = lib.et_row_stride(dim, dtype)
        if dim < 1 or dtype not in (0, 1, 2) or dim > (2**31 - 17) // 4:
            self.expect(stride == -1, "et_row_stride", f"{stride} for dim {dim}, dtype {dtype}")
        else:
            self.expect(stride >= dim and stride % 4 == 0, "et_row_stride", f"{stride} for dim {dim}, dtype {dtype}")
        stride, rows = int(self.pick(1, 4, 300, 4096, 5000, 0, -8)), int(self.pick(1, 7, 4096, 0, -1, 2**62))
        nbytes = lib.et_scm_chunk_bytes(stride, rows)
        self.expect(nbytes == 0 or (nbytes % SCM_BLOCK == 0 and nbytes >= stride * rows), "et_scm_chunk_bytes",
                    f"{nbytes} for {rows} rows of {stride} bytes")
        bits = int(self.pick(2, 3, 4, 8, 1, 9, -2))
        got = lib.et_quant_row_bytes(dim, bits)
        want = (dim * bits + 7) // 8 if dim >= 1 and 2 <= bits <= 8 else lib.ET_E_ARG
        self.expect(got == want, "et_quant_row_bytes", f"{got} for dim {dim}, bits {bits}")

    def quantize(self) -> None:
        lib = self.lib
        n, dim = int(self.pick(0, 1, 5, 40, -1)), int(self.pick(1, 3, 8, 33, 0, -2))
        bits, method, fp16 = int(self.pick(2, 3, 4, 8, 5, 1, 9)), int(self.pick(0, 1, 2, -1)), int(self.pick(0, 1))
        row_bytes = (dim * bits + 7) // 8 if dim > 0 else 0
        need = max(n, 0)
        rows = (self.rng.standard_normal(self.size_for(need * max(dim, 0))) *
                self.pick(1, 1e30, 1e-30, 7e4)).astype(np.float32)
        if self.chance(0.2) and rows.size:
            rows[self.rng.integers(rows.size)] = self.pick(np.nan, np.inf, -np.inf)
        codes, lo, scale = (self.buffer(need * row_bytes, np.uint8), self.buffer(need, np.float32),
                            self.buffer(need, np.float32))
        told = [self.told(a) for a in (rows, codes, lo, scale)]
        arg = n < 0 or dim <= 0 or not 2 <= bits <= 8
        size = n > 0 and not arg and (told[0] < n * dim or told[1] < n * row_bytes or told[2] < n or told[3] < n)
        if self.chance(0.5):
            rc = lib.et_quantize(self.ptr("float *", rows), told[0], n, dim, bits, method, fp16,
                                 self.ptr("uint8_t *", codes), told[1], self.ptr("float *", lo), told[2],
                                 self.ptr("float *", scale), told[3], self.err)
            self.verify_quant("et_quantize", rc, n, arg or method not in (0, 1), size)
        else:
            lo[:] = self.rng.standard_normal(lo.size) * self.pick(1, 1e38)
            scale[:] = self.rng.standard_normal(scale.size) * self.pick(1, 1e37)
            rc = lib.et_dequantize(self.ptr("uint8_t *", codes), told[1], self.ptr("float *", lo), told[2],
                                   self.ptr("float *", scale), told[3], n, dim, bits, self.ptr("float *", rows),
                                   told[0], self.err)
            self.verify_quant("et_dequantize", rc, n, arg, size)

    def verify_quant(self, call: str, rc: int, n: int, arg: bool, size: bool) -> None:
        lib = self.lib
        if arg or size:
            return self.verify(call, rc, (lib.ET_E_ARG if arg else lib.ET_E_SIZE, None))
        self.codes[(call, self.names.get(rc, rc))] += 1
        self.expect(rc in (lib.ET_OK, lib.ET_E_NOMEM) or (rc == lib.ET_E_ARG and 0 <= self.err[0] < n), call,
                    f"returned {self.names.get(rc, rc)} at row {self.err[0]} of {n}")

    def memory(self) -> None:
        """et_mem_map / et_mem_bind / et_mem_unmap on mappings of the harness's own."""
        lib, ffi = self.lib, self.ffi
        nbytes = int(self.pick(1, 4095, 4096, (2 << 20) + 1, 0, 2**56 + 1, 2**64 - 1))
        err, huge_err = ffi.new("int *"), ffi.new("int *")
        addr = lib.et_mem_map(nbytes, int(self.pick(0, 1)), err, huge_err)
        self.expect((addr == ffi.NULL) == (err[0] != 0), "et_mem_map", f"{addr} with errno {err[0]}")
        self.expect(addr != ffi.NULL or nbytes == 0 or nbytes > 2**56, "et_mem_map", f"refused {nbytes} bytes")
        if addr == ffi.NULL:
            return self.verify("et_mem_unmap", lib.et_mem_unmap(ffi.NULL, nbytes), (lib.ET_E_ARG, None))
        view = ffi.cast("unsigned char *", addr)
        view[0], view[nbytes - 1] = 1, 2  # the whole range is mapped
        words = self.rng.integers(0, 4, self.pick(0, 1, 2, 3), dtype=np.uint64)
        if words.size:
            words[0] |= 1
        maxnode = int(self.pick(0, 1, 2, 64, 65, 66, 129, 200, 4097))
        told = self.told(words)
        offset = int(self.pick(0, 0, 1, 4096)) if nbytes > 4096 else 0
        bind = int(self.pick(nbytes - offset, 0, 1))
        rc = lib.et_mem_bind(ffi.cast("char *", addr) + offset, bind,
                             ffi.NULL if not words.size else ffi.cast("unsigned long *", ffi.from_buffer(words)),
                             told, maxnode)
        self.codes[("et_mem_bind", rc)] += 1
        short = words.size and (told < 0 or max(maxnode - 1, 0) > 64 * told)
        self.expect(rc >= 0 and (not short or rc == 22) and (offset % 4096 == 0 and bind or rc == 22), "et_mem_bind",
                    f"{rc} for maxnode {maxnode}, {told} words, offset {offset}, {bind} bytes")
        self.verify("et_mem_unmap", lib.et_mem_unmap(addr, nbytes), (lib.ET_OK, None))

    # ---- the run -----------------------------------------------------------------------------

    def step(self) -> None:
        if self.chance(0.04) or not self.tables:
            return self.new_table()
        t = self.table()
        op = self.rng.integers(20)
        if op < 4:
            self.lookup(t, pooled=True)
        elif op < 6:
            self.lookup(t, pooled=False)
        elif op < 8:
            self.partition(t)
        elif op < 9:
            self.rows_call(t, write=True)
        elif op < 10:
            self.rows_call(t, write=False)
        elif op < 11:
            self.publish(t)
        elif op < 12:
            self.write_slots(t)
        elif op < 13:
            self.forge(t)
        elif op < 14:
            self.pick(self.set_chunk, self.set_scm_chunk, self.set_chunk_part, self.set_parts, self.set_scm)(t)
        elif op < 15:
            self.dirty(t)
        elif op < 16:
            self.settings(t)
        elif op < 17:
            self.pick(self.process_wide, self.sizes, self.memory)()
        elif op < 19:
            self.quantize()
        elif self.chance(0.1):
            self.drop(t)
        elif self.chance(0.1):
            self.free_table(t)

    def run(self, iterations: int, seconds: float) -> None:
        end = time.monotonic() + seconds
        done = 0
        self.lib.et_set_kernel_threads(2)
        while done < iterations or time.monotonic() < end:
            self.step()
            done += 1
        for t in list(self.tables):
            self.free_table(t)
        missing = self.lib.entry_points() - set(self.lib.calls)
        self.expect(not missing, "coverage", f"entry points never called: {', '.join(sorted(missing))}")
        print(f"{done} steps, {sum(self.lib.calls.values())} calls of {len(self.lib.calls)} entry points")
        for (call, code), count in sorted(self.codes.items(), key=str):
            print(f"  {call:28} {code!s:16} {count}")
        print("calls that read or wrote rows:")
        for (call, scm, parts), count in sorted(self.paths.items()):
            print(f"  {call:28} {scm:14} {parts:16} {count}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module_dir", type=Path)
    parser.add_argument("module")
    parser.add_argument("work", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=0.0, help="run at least this long")
    args = parser.parse_args()
    sys.path.insert(0, str(args.module_dir))
    module = importlib.import_module(args.module)
    fuzzer = Fuzzer(module.lib, module.ffi, args.work, args.seed)
    try:
        with np.errstate(all="ignore"):  # (rows and parameters overflow float32 on purpose)
            fuzzer.run(args.iterations, args.seconds)
    except Mismatch as e:
        print(f"boundary contract broken (seed {args.seed}): {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
