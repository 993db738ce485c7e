"""Fuzz harness of the kernels' C boundary, run by test_native_boundary.py in a process of its own
on an AddressSanitizer build of native/ (a cffi module in a directory; this file imports nothing
of embtierd, so the real build stays out of the process; the documented hash of HASHED tables is
clients/embtier/keys.py's, loaded from its file).

It calls every entry point with random tables (dtypes, dims, chunk geometry, valid or not), random
storage (memory chunks of random sizes, SCM file space at random offsets, parts), placement entries
forged straight into the map (random, past the last tier, past max_chunks, past a chunk's storage)
or published, random ids (in range, negative, huge), lengths (negative, not summing up), buffers of
random sizes (none, too small, right, larger; NULL now and then), and random dtypes, modes, tiers,
chunk indexes, bits, instruction sets and thread counts.  Some tables get a key space (DENSE,
HASHED or MANAGED; and random invalid ones): their lookups then take keys (any int64) or rows
(by_key 1 or 0, now and then an invalid by_key), and their managed maps are planned, applied
(plans, and batches forged with bad rows), loaded, read back and advanced an epoch.  Every call
must return one of the boundary's codes, and the lookups, the partition, the row calls and the
key calls the very code (and position) that a model of the boundary's checks predicts, in its
documented order (argument, size, id, lengths, dropped, placement entry).  The model of a managed
map (ids -> rows, the rows touched in the current and the previous epoch) predicts the rows of
known ids, unknown ids, when a plan finds no row (ET_E_FULL), evictions and the map after an
apply or a load.  An out-of-bounds access is the sanitizer's to report (the process then aborts).
Exits 1 on a wrong code, or when some entry point was never called.

  python native_fuzz.py MODULE_DIR MODULE WORK_DIR [--seed N] [--iterations N] [--seconds S]
"""

from __future__ import annotations

import argparse
import collections
import errno
import importlib
import importlib.util
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

NUM_TIERS = 3
SCM_BLOCK = 4096
MAX_TABLES = 4
SCM_FILE_BYTES = 4 << 20
DENSE, HASHED, MANAGED, MAPPED = 0, 1, 2, 3  # ET_KEYS_*
KEY_SPACE_NAMES = {DENSE: "dense", HASHED: "hashed", MANAGED: "managed", MAPPED: "mapped"}
MAPPING_MAX = 2**32 - 2  # listed ids a mapping may have
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def holds(told: int, count: int, each: int = 1) -> bool:
    """The model of et_holds: whether a buffer of told elements holds count items of each elements."""
    return count <= 0 or (told >= 0 and count <= told // each)


def first_repeat(values: list[int]) -> int | None:
    """The first position whose value came before, or None."""
    seen: set[int] = set()
    for position, value in enumerate(values):
        if value in seen:
            return position
        seen.add(value)
    return None


def load_keys():
    """clients/embtier/keys.py (the documented hash and mapping rule), without importing the client package."""
    path = Path(__file__).resolve().parents[2] / "clients" / "embtier" / "keys.py"
    spec = importlib.util.spec_from_file_location("embtier_keys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_keys = load_keys()
hashed_rows, mapped_rows = _keys.hashed_rows, _keys.mapped_rows


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
        self.scm_read_errors = 0  # et_scm_read_errors as last seen
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
        self.key_space, self.seed, self.keys_set = DENSE, 0, False
        self.listed, self.listed_rows, self.hash_from = [], [], 0  # a MAPPED table's mapping
        self.set_managed_map([])
        self.epoch_ns = 0
        self.forged = False  # entries were ever forged into the map

    @property
    def capacity(self) -> int:
        """Rows a MANAGED table can give ids (the last is the default row)."""
        return self.num_rows - 1

    @property
    def default_row(self) -> int:
        return self.num_rows - 1

    @property
    def epochs_known(self) -> bool:
        """Whether epochs begin only at et_keys_epoch (no clock), so that the model knows them."""
        return self.epoch_ns == 0

    def set_managed_map(self, keys: list[int]) -> None:
        """The model of a MANAGED map as a load leaves it: keys[r] the id of live row r, counts from 0,
        no row touched."""
        self.keys = list(keys)
        self.row_of = {k: r for r, k in enumerate(self.keys)}
        self.evictions = self.unknown = self.epoch = 0
        self.touched = [set(), set()]  # rows touched in the current epoch, in the previous one

    def touch(self, rows) -> None:
        self.touched[0].update(rows)

    def new_epoch(self) -> None:
        self.touched = [set(), self.touched[0]]
        self.epoch += 1

    def looked_up_entries(self, lib, rows: np.ndarray) -> np.ndarray:
        """The placement entries a lookup of rows goes by: the map's, except that a table whose map C
        counts as the identity (et_table_displaced) and whose only chunks with slots are DRAM chunks of
        one fabric part is looked up without reading the map (entry = row), so that entries forged
        behind et_publish's back are not seen there."""
        tiers = np.arange(self.entries) >> self.chunk_bits
        dram = (tiers == 0) & (self.slots > 0)
        dram_only = not self.slots[tiers != 0].any() and (self.nparts == 0 or np.unique(self.parts[dram]).size <= 1)
        if dram_only and lib.et_table_displaced(self.h) == 0:
            return rows.astype(np.uint32)
        return self.loc[rows]

    def translates(self, by_key: int) -> bool:
        """Whether a lookup with by_key takes keys (of a HASHED or MANAGED table) rather than rows."""
        return by_key == 1 and self.key_space != DENSE

    def rows_of(self, ids: np.ndarray, by_key: int) -> np.ndarray | None:
        """The rows a lookup of ids reads (None when they are rows and one is out of range); unknown
        MANAGED keys read the default row."""
        if not self.translates(by_key):
            return ids if ((ids >= 0) & (ids < self.num_rows)).all() else None
        if self.key_space == HASHED:
            return hashed_rows(ids, self.num_rows, self.seed)
        if self.key_space == MAPPED:
            return mapped_rows(ids, self.listed, self.listed_rows, self.num_rows, self.hash_from, self.seed)
        return np.fromiter((self.row_of.get(k, self.default_row) for k in ids.tolist()), np.int64, ids.size)

    def apply(self, ids: list[int], rows: list[int]) -> int:
        """A successful et_keys_apply: rows[i] becomes the row of ids[i] (a row == live extends the live
        rows, another id's row forgets that id), every row touched; returns the ids forgotten."""
        gone = 0
        for key, row in zip(ids, rows):
            if row == len(self.keys):
                self.keys.append(key)
            elif self.keys[row] != key:
                del self.row_of[self.keys[row]]
                self.keys[row] = key
                gone += 1
            self.row_of[key] = row
        self.touch(rows)
        self.evictions += gone
        return gone

    def apply_failure(self, ids: list[int], rows: list[int], codes) -> tuple[int, int | None]:
        """What et_keys_apply's checks say of a batch, position by position, on the map before the call:
        a row out of [0, capacity) or past the live rows so far ET_E_ID_RANGE; an id given two rows, a
        row given two ids, an id live at another row ET_E_ARG; (ET_OK, None) when none fails."""
        row_of, id_of, extended = {}, {}, len(self.keys)
        for position, (key, row) in enumerate(zip(ids, rows)):
            if not 0 <= row < self.capacity or row > extended:
                return codes.ET_E_ID_RANGE, position
            if row_of.setdefault(key, row) != row or id_of.setdefault(row, key) != key or \
                    self.row_of.get(key, row) != row:
                return codes.ET_E_ARG, position
            extended += row == extended
        return codes.ET_OK, None

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
                               c.ET_E_DROPPED, c.ET_E_LOCATION, c.ET_E_SIZE, c.ET_E_FULL, c.ET_E_SCM_READ}
        self.names = {getattr(c, name): name for name in dir(c) if name.startswith("ET_E_")} | {0: "ET_OK"}

    # ---- checks ------------------------------------------------------------------------------

    def expect(self, condition: bool, call: str, what: str) -> None:
        if not condition:
            raise Mismatch(f"{call}: {what}")

    def verify(self, call: str, rc: int, expected: tuple[int, int | None] | None) -> None:
        """rc must be the expected (code, *err_pos or None), or with None expected: OK, I/O (an SCM row read
        past the file's end, check_scm_reads) or no memory."""
        self.codes[(call, self.names.get(rc, rc))] += 1
        self.expect(rc in self.boundary_codes, call, f"returned {rc}, not a code of the boundary")
        lib = self.lib
        if expected is None:
            self.expect(rc in (lib.ET_OK, lib.ET_E_IO, lib.ET_E_SCM_READ, lib.ET_E_NOMEM), call,
                        f"returned {self.names[rc]} (err_pos {self.err[0]}) where the model sees no error")
            return
        code, pos = expected
        self.expect(rc == code, call, f"returned {self.names[rc]} (err_pos {self.err[0]}), "
                                      f"the model expects {self.names[code]} (err_pos {pos})")
        if pos is not None:
            self.expect(self.err[0] == pos, call, f"{self.names[rc]} at {self.err[0]}, the model expects {pos}")

    def first_failure(self, t: Table, arg: bool = False, size: bool = False, ids: np.ndarray | None = None,
                      lengths: np.ndarray | None = None, n: int = 0, entries: np.ndarray | None = None,
                      buffer: int | None = None):
        """The outcome the boundary owes a call: its first failing check, in the documented order
        (buffer: the ET_BUF_* an ET_E_SIZE names, where the model knows it)."""
        lib = self.lib
        if arg:
            return lib.ET_E_ARG, None
        if size:
            return lib.ET_E_SIZE, buffer
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
            ids[self.rng.integers(n)] = self.pick(-1, t.num_rows, t.num_rows + 5, 2**62, INT64_MIN, INT64_MAX)
        return ids

    def random_keys(self, t: Table, n: int) -> np.ndarray:
        """n keys of a keyed table: live ids of a managed one, small ids (a few thousand distinct, so
        that maps fill and evict), any int64, the extremes."""
        keys = self.rng.integers(-3000, 3000, n, dtype=np.int64)
        kind = self.rng.integers(0, 8, n)
        if t.keys:
            live = np.flatnonzero(kind < 3)
            keys[live] = np.array(t.keys, dtype=np.int64)[self.rng.integers(0, len(t.keys), live.size)]
        anything = np.flatnonzero(kind == 3)
        keys[anything] = self.rng.integers(INT64_MIN, INT64_MAX, anything.size, dtype=np.int64, endpoint=True)
        extreme = np.flatnonzero(kind == 4)
        keys[extreme] = self.rng.choice(np.array([INT64_MIN, INT64_MAX, INT64_MIN + 1, -1, 0]), extreme.size)
        return keys

    def by_key(self) -> int:
        """A lookup's by_key: mostly 0 or 1, now and then a value that is neither."""
        return int(self.pick(0, 1)) if self.chance(0.97) else int(self.pick(2, -1, 2**31 - 1, -2**31))

    def request_ids(self, t: Table, n: int, by_key: int) -> np.ndarray:
        """A lookup's ids: keys when by_key asks for them of a keyed table (sometimes anyway), else rows."""
        keyed = by_key == 1 and t.key_space != DENSE
        return self.random_keys(t, n) if keyed or (t.key_space != DENSE and self.chance(0.05)) else self.ids(t, n)

    def key_count(self) -> int:
        """How many ids a key call has: mostly a few, now and then some thousands."""
        return int(self.pick(0, 1, self.rng.integers(2, 64), self.rng.integers(64, 600), self.rng.integers(600, 4000)))

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

    def counter(self) -> np.ndarray | None:
        """A single-value out-parameter that may be NULL (unknown): None, or one int64 of garbage."""
        return None if self.chance(0.4) else self.rng.integers(INT64_MIN, INT64_MAX, 1, dtype=np.int64)

    # ---- tables ------------------------------------------------------------------------------

    def table(self) -> Table:
        while not self.tables:
            self.new_table()
        return self.tables[self.rng.integers(len(self.tables))]

    def new_table(self) -> None:
        lib, ffi = self.lib, self.ffi
        valid = self.chance(0.85)
        num_rows = int(self.rng.integers(1, self.pick(40, 3000, 3000))) if valid else self.pick(0, -5, 2**32 + 1, 2**62)
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
        if self.chance(0.6):
            self.set_mapping(t, valid=self.chance(0.7)) if self.chance(0.2) else self.set_keys(t, valid=True)
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
        """Memory corruption: random entries written straight into the map (C's count of entries that
        are not their id, which et_publish keeps, no longer tells: it is checked on tables never forged)."""
        for row in self.rng.integers(0, t.num_rows, int(self.rng.integers(1, 8))).tolist():
            t.loc[row] = self.random_entry(t)
        t.forged = True

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
            identity = ids.astype(np.uint32)  # each row in its own slot, as a new table is: lookups skip the map
            if self.chance(0.4) and (ids >> t.tier_shift == 0).all() and \
                    (t.slots[ids >> t.chunk_shift] > (ids & ((1 << t.chunk_shift) - 1))).all():
                locs = identity
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
        if not t.forged:
            displaced = int((t.loc != np.arange(t.num_rows, dtype=np.uint32)).sum())
            self.expect(lib.et_table_displaced(t.h) == displaced, "et_table_displaced",
                        f"{lib.et_table_displaced(t.h)}, the map has {displaced} entries that are not their id")

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
        """et_write_rows (now and then et_write_rows_logged: the model is the same, and the record is in the
        log exactly when the checks before it passed) or et_read_rows of random ids."""
        n = self.count() % 2000
        ids = self.ids(t, n)
        rows = self.buffer(n * t.stride, np.uint8)
        n_told, rows_told = self.told(ids), self.told(rows)
        call = "et_write_rows" if write else "et_read_rows"
        logged = write and self.chance(0.3)
        if logged:  # the same write with its log record first, in one call
            call = "et_write_rows_logged"
            path = self.work / f"logged-{self.serial}.log"
            self.serial += 1
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
            c = self.lib.et_commit_new(0)
            self.lib.et_commit_switch(c, fd, 0, 0)
            done = self.ffi.new("int32_t *")
            payload = self.rng.integers(0, 256, 40, dtype=np.uint8)
            try:
                rc = self.lib.et_write_rows_logged(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("uint8_t *", rows),
                                                   rows_told, c, 1, 3, self.ffi.new("uint8_t *[]", [self.ptr(
                                                       "uint8_t *", payload)]), self.ffi.new("int64_t[]", [40]), 1, 0,
                                                   done, self.err)
                self.expect(path.stat().st_size == (21 + 40 if done[0] else 0), call,
                            f"logged {done[0]} but the log has {path.stat().st_size} bytes")
                self.expect(bool(done[0]) == (rc not in (self.lib.ET_E_ARG, self.lib.ET_E_SIZE,
                                                         self.lib.ET_E_ID_RANGE)), call,
                            f"logged {done[0]} with code {self.names.get(rc, rc)}")
            finally:
                self.lib.et_commit_free(c)
                os.close(fd)
                path.unlink()
        else:
            rc = getattr(self.lib, call)(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("uint8_t *", rows),
                                         rows_told, self.err)
        size = n_told > 0 and not (rows_told >= 0 and n_told <= rows_told // t.stride)
        valid_ids = ids[:max(n_told, 0)]
        entries = t.loc[valid_ids] if ((valid_ids >= 0) & (valid_ids < t.num_rows)).all() else None
        self.verify(call, rc, self.first_failure(t, arg=n_told < 0, size=size, ids=valid_ids, entries=entries))
        self.check_scm_reads(call, t, rc, entries)
        if entries is not None:
            self.note_path(call, t, rc, entries)

    def check_scm_reads(self, call: str, t: Table, rc: int, entries: np.ndarray | None) -> None:
        """After a call that reads rows: ET_E_SCM_READ names the position of an SCM row (a read past
        the file's end) and et_scm_read_errors counts one more failed read at least, with its errno;
        any other outcome but ET_E_IO counts none."""
        lib = self.lib
        last_errno = self.ffi.new("int32_t *")
        count = lib.et_scm_read_errors(t.h, last_errno)
        if rc == lib.ET_E_SCM_READ:
            pos = int(self.err[0])
            self.expect(entries is None or (0 <= pos < entries.size and int(entries[pos]) >> t.tier_shift == 2),
                        call, f"ET_E_SCM_READ at position {pos}, not one of an SCM row")
            self.expect(count > t.scm_read_errors and last_errno[0] > 0, "et_scm_read_errors",
                        f"{count} (errno {last_errno[0]}) after an ET_E_SCM_READ, {t.scm_read_errors} before")
        else:  # (an ET_E_IO of the batch itself may come after reads of it failed)
            self.expect(count == t.scm_read_errors or (rc == lib.ET_E_IO and count > t.scm_read_errors),
                        "et_scm_read_errors", f"{count} after {self.names.get(rc, rc)}, {t.scm_read_errors} before")
        t.scm_read_errors = count
        self.expect(lib.et_scm_read_errors(t.h, self.ffi.NULL) == lib.ET_E_ARG, "et_scm_read_errors",
                    "took a NULL last_errno")

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

    def lookup(self, t: Table, pooled: bool, n: int | None = None) -> None:
        """et_gather or et_pool of n ids (a random count if None), every buffer of a random size."""
        lib = self.lib
        n = self.count() if n is None else n
        if n >= 16384 and self.chance(0.7):
            self.publish(t, every_row=True)  # (forged entries would stop most requests this large)
        by_key = self.by_key()
        ids = self.request_ids(t, n, by_key)
        bags = n if not pooled else int(self.pick(0, 1, max(n // 4, 1), n, n + 3))
        lengths = self.lengths(n, bags) if pooled else None
        weights = (self.buffer(n, np.float32) if self.chance(0.5) else None) if pooled else None
        out = self.buffer(bags * t.dim, np.float32) if not self.chance(0.02) else None
        tier_rows, part_rows = self.counters(t)
        unknown = self.counter()
        mode = int(self.rng.integers(0, 3)) if not pooled or self.chance(0.95) else int(self.pick(-1, 3))
        n_told = self.told(ids)
        bags_told = self.told(lengths) if pooled else n_told
        out_told, weights_told, tier_told, part_told = (self.told(a) for a in (out, weights, tier_rows, part_rows))
        counters = (self.ptr("int64_t *", tier_rows), tier_told, self.ptr("int64_t *", part_rows), part_told,
                    by_key, self.ptr("int64_t *", unknown))
        if pooled:
            rc = lib.et_pool(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("int32_t *", lengths), bags_told,
                             self.ptr("float *", weights), weights_told, mode, self.ptr("float *", out), out_told,
                             *counters, self.err)
        else:
            rc = lib.et_gather(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("float *", out), out_told,
                               *counters, self.err)
        arg = (not 0 <= mode <= 2) or bags_told < 0 or n_told < 0 or (out is None and bags_told > 0) or \
            (part_rows is not None and t.nparts == 0) or by_key not in (0, 1)
        size = (weights is not None and weights_told != n_told) or \
            not (bags_told <= 0 or (out_told >= 0 and bags_told <= out_told // t.dim)) or \
            (tier_rows is not None and tier_told < NUM_TIERS) or (part_rows is not None and part_told < t.nparts)
        ids = ids[:max(n_told, 0)]
        rows = t.rows_of(ids, by_key)
        entries = None if rows is None else t.looked_up_entries(lib, rows)
        lengths = None if lengths is None else lengths[:max(bags_told, 0)]
        call = "et_pool" if pooled else "et_gather"
        expected = self.first_failure(t, arg=arg, size=size, ids=None if t.translates(by_key) else ids,
                                      lengths=lengths, n=n_told, entries=entries)
        self.verify(call, rc, expected)
        self.check_scm_reads(call, t, rc, entries)
        self.keyed_read(call, t, rc, expected, by_key, rows, unknown)
        if entries is not None:
            self.check_counts(call, t, rc, entries, tier_rows, part_rows)
            self.note_path(call, t, rc, entries, by_key)

    def keyed_read(self, call: str, t: Table, rc: int, expected, by_key: int, rows: np.ndarray | None,
                   unknown: np.ndarray | None) -> None:
        """After a lookup or partition: a keyed read of a MANAGED table touches the rows of its known ids
        once it got past the checks (to its placement entries), and on success counts its unknown ids
        (the others count none)."""
        lib = self.lib
        managed = t.translates(by_key) and t.key_space == MANAGED
        missed = int(np.count_nonzero(rows == t.default_row)) if managed else 0
        if managed and (expected is None or expected[0] == lib.ET_E_LOCATION):
            t.touch(rows[rows != t.default_row].tolist())
        if rc != lib.ET_OK:
            return
        t.unknown += missed
        self.expect(unknown is None or unknown[0] == missed, call, f"unknown {unknown}, the model counts {missed}")

    def note_path(self, call: str, t: Table, rc: int, entries: np.ndarray, by_key: int = 0) -> None:
        """Counts the calls that got through to the rows, by path: rows or keys (translated by a key
        space), SCM rows (the batch read) or none (the fused pipeline), on one kernel thread or several."""
        if rc == self.lib.ET_OK:
            ids = f"{KEY_SPACE_NAMES[t.key_space]} keys" if t.translates(by_key) else "rows"
            scm = "with SCM rows" if ((entries.astype(np.int64) >> t.tier_shift) == 2).any() else "memory rows"
            parts = "several threads" if entries.size >= 16384 and self.lib.et_kernel_threads() > 1 and \
                call in ("et_gather", "et_pool") else "one thread"
            self.paths[(call, ids, scm, parts)] += 1

    def partition(self, t: Table) -> None:
        lib = self.lib
        n = self.count()
        if n >= 16384 and self.chance(0.7):
            self.publish(t, every_row=True)
        by_key = self.by_key()
        ids = self.request_ids(t, n, by_key)
        bags = int(self.pick(0, 1, max(n // 4, 1), n))
        lengths = self.lengths(n, bags)
        weights = self.buffer(n, np.float32) if self.chance(0.5) else None
        out_ids = self.buffer(n, np.int64)
        out_lengths = self.buffer(max(t.nparts, 1) * bags, np.int32)
        out_weights = self.buffer(n, np.float32) if weights is not None or self.chance(0.2) else None
        part_rows = self.buffer(t.nparts, np.int64) if not self.chance(0.03) else None
        unknown = self.counter()
        told = [self.told(a) for a in (ids, lengths, weights, out_ids, out_lengths, out_weights, part_rows)]
        n_told, bags_told, weights_told, out_ids_told, out_lengths_told, out_weights_told, part_rows_told = told
        rc = lib.et_partition(t.h, self.ptr("int64_t *", ids), n_told, self.ptr("int32_t *", lengths), bags_told,
                              self.ptr("float *", weights), weights_told, self.ptr("int64_t *", out_ids), out_ids_told,
                              self.ptr("int32_t *", out_lengths), out_lengths_told, self.ptr("float *", out_weights),
                              out_weights_told, self.ptr("int64_t *", part_rows), part_rows_told, by_key,
                              self.ptr("int64_t *", unknown), self.err)
        arg = n_told < 0 or bags_told < 0 or part_rows is None or (weights is not None and out_weights is None) or \
            t.nparts == 0 or by_key not in (0, 1)
        size = (weights is not None and weights_told != n_told) or not holds(out_ids_told, n_told, 1) or \
            not holds(out_lengths_told, bags_told, max(t.nparts, 1)) or \
            (weights is not None and not holds(out_weights_told, n_told, 1)) or part_rows_told < t.nparts
        ids = ids[:max(n_told, 0)]
        rows = t.rows_of(ids, by_key)
        entries = None if rows is None else t.loc[rows]
        expected = self.first_failure(t, arg=arg, size=size, ids=None if t.translates(by_key) else ids,
                                      lengths=lengths[:max(bags_told, 0)], n=n_told, entries=entries)
        self.verify("et_partition", rc, expected)
        self.keyed_read("et_partition", t, rc, expected, by_key, rows, unknown)
        if rc == lib.ET_OK:
            self.note_path("et_partition", t, rc, entries, by_key)
            want = np.bincount(t.parts[entries.astype(np.int64) >> t.chunk_shift], minlength=t.nparts)
            self.expect(np.array_equal(part_rows[:t.nparts], want), "et_partition", f"part_rows {part_rows}")
            self.expect(np.array_equal(np.sort(out_ids[:n_told]), np.sort(rows)), "et_partition", "out_ids (rows)")

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

    # ---- key spaces --------------------------------------------------------------------------

    def set_keys(self, t: Table, valid: bool = False) -> None:
        """et_table_set_keys: one of the three key spaces (valid), or any arguments (an unknown key
        space, a negative epoch, a second call)."""
        lib = self.lib
        kind = int(self.pick(DENSE, HASHED, MANAGED, MANAGED) if valid else self.pick(0, 1, 2, -1, 3, 2**31 - 1))
        seed = int(self.pick(0, 1, 2**64 - 1, self.rng.integers(0, 2**64, dtype=np.uint64)))
        epoch_ns = (0 if self.chance(0.8) else int(self.pick(1000, 10**9))) if valid else \
            int(self.pick(0, 1000, -1, INT64_MIN))
        rc = lib.et_table_set_keys(t.h, kind, seed, epoch_ns)
        arg = not DENSE <= kind <= MANAGED or epoch_ns < 0 or t.keys_set or (kind == MANAGED and t.num_rows < 2)
        self.verify("et_table_set_keys", rc, (lib.ET_E_ARG, None) if arg else
                    (lib.ET_E_DROPPED, None) if t.dropped else None)
        if rc == lib.ET_OK:
            t.key_space, t.seed, t.keys_set, t.epoch_ns = kind, seed, True, epoch_ns
            t.set_managed_map([])

    def set_mapping(self, t: Table, valid: bool = False) -> None:
        """et_table_set_mapping: distinct ids with rows in range and hash_from in [0, num_rows) (valid), or
        now and then a repeated id, a row out of range, a bad hash_from, a bad count or a NULL."""
        lib, ffi = self.lib, self.ffi
        n = int(self.pick(0, 1, self.rng.integers(2, 400), 2000))
        ids = self.rng.integers(INT64_MIN, INT64_MAX, n, dtype=np.int64, endpoint=True)
        if self.chance(0.3):
            ids = np.concatenate([ids, [INT64_MIN, INT64_MAX]])
        ids = self.rng.permutation(np.unique(ids))
        rows = self.rng.integers(0, t.num_rows, ids.size, dtype=np.int64)
        hash_from = int(self.rng.integers(0, t.num_rows))
        seed = int(self.pick(0, 1, 2**64 - 1, self.rng.integers(0, 2**64, dtype=np.uint64)))
        n_told, null = ids.size, False
        if not valid:
            r = self.rng.random()
            if r < 0.15 and ids.size >= 2:
                i, j = sorted(self.rng.choice(ids.size, 2, replace=False))
                ids[j] = ids[i]
            elif r < 0.3 and ids.size:
                rows[self.rng.integers(ids.size)] = int(self.pick(-1, t.num_rows, INT64_MAX, INT64_MIN))
            elif r < 0.45:
                hash_from = int(self.pick(-1, t.num_rows, INT64_MAX))
            elif r < 0.55:
                n_told = int(self.pick(-1, MAPPING_MAX + 1, INT64_MIN))
            elif r < 0.65 and ids.size:
                null = True
        pointers = [self.ptr("int64_t *", ids), self.ptr("int64_t *", rows)]
        if null:
            pointers[self.rng.integers(2)] = ffi.NULL
        rc = lib.et_table_set_mapping(t.h, seed, pointers[0], pointers[1], n_told, hash_from, self.err)
        out = (rows < 0) | (rows >= t.num_rows)
        repeat = first_repeat(ids.tolist())
        expected = (lib.ET_E_ARG, -1) if (n_told < 0 or n_told > MAPPING_MAX or null or t.keys_set or
                                          not 0 <= hash_from < t.num_rows) else \
            (lib.ET_E_ID_RANGE, int(np.flatnonzero(out)[0])) if out.any() else \
            (lib.ET_E_DROPPED, None) if t.dropped else \
            (lib.ET_E_ARG, repeat) if repeat is not None else (lib.ET_OK, None)
        self.verify("et_table_set_mapping", rc, expected)
        if rc == lib.ET_OK:
            t.key_space, t.seed, t.keys_set = MAPPED, seed, True
            t.listed, t.listed_rows, t.hash_from = ids.tolist(), rows.tolist(), hash_from
            self.mapping_of(t)

    def mapping_of(self, t: Table) -> None:
        """et_mapping_of: a MAPPED table's listed ids and rows as given; nothing of another table."""
        ffi = self.ffi
        ids, rows, entries = ffi.new("const int64_t **"), ffi.new("const uint32_t **"), ffi.new("int64_t *")
        self.lib.et_mapping_of(t.h, ids, rows, entries)
        n = entries[0]
        self.codes[("et_mapping_of", "mapping" if n else "none")] += 1
        got_ids = np.frombuffer(ffi.buffer(ids[0], 8 * n), np.int64).tolist() if n else []
        got_rows = np.frombuffer(ffi.buffer(rows[0], 4 * n), np.uint32).tolist() if n else []
        want = (t.listed, t.listed_rows) if t.key_space == MAPPED else ([], [])
        self.expect((got_ids, got_rows) == want and (n > 0 or (ids[0] == ffi.NULL and rows[0] == ffi.NULL)),
                    "et_mapping_of", f"{n} entries, the model has {len(want[0])}")

    def churn(self, t: Table) -> None:
        """Rounds of small plans (mostly applied), epochs, forged applies and small lookups: a small
        MANAGED map fills, then its new ids take the rows of the ids that are not protected, or find none."""
        for _ in range(int(self.rng.integers(1, 16))):
            r = self.rng.random()
            if r < 0.55:
                self.plan(t, int(self.rng.integers(1, min(t.capacity // 3 + 2, 600))))
            elif r < 0.75:
                self.keys_epoch(t)
            elif r < 0.85:
                self.apply(t)
            else:
                self.lookup(t, pooled=False, n=int(self.rng.integers(1, 16)))

    def plan(self, t: Table, n: int | None = None) -> None:
        """et_keys_plan of n random ids (keys of a keyed table, rows of a dense one; a random count if
        None); a plan that succeeds is mostly applied."""
        lib, ffi = self.lib, self.ffi
        n = self.key_count() if n is None else n
        ids = self.random_keys(t, n) if t.key_space != DENSE else self.ids(t, n)
        rows, fresh = self.buffer(n, np.int64), self.buffer(n, np.uint8)
        n_told, rows_told, fresh_told = self.told(ids), self.told(rows), self.told(fresh)
        pointers = [self.ptr("int64_t *", ids), self.ptr("int64_t *", rows), self.ptr("uint8_t *", fresh)]
        null = self.chance(0.03)
        if null:
            pointers[self.rng.integers(3)] = ffi.NULL
        rc = lib.et_keys_plan(t.h, pointers[0], n_told, pointers[1], rows_told, pointers[2], fresh_told, self.err)
        ids = ids[:max(n_told, 0)]
        short = lib.ET_BUF_ROWS if not holds(rows_told, n_told) else \
            lib.ET_BUF_FRESH if not holds(fresh_told, n_told) else None
        expected = self.first_failure(t, arg=n_told < 0 or (n_told > 0 and null), size=short is not None,
                                      buffer=short, ids=ids if t.key_space == DENSE else None)
        if t.key_space == MANAGED and expected is None:
            return self.managed_plan(t, ids, rc, rows[:ids.size], fresh[:ids.size])
        self.verify("et_keys_plan", rc, expected or (lib.ET_OK, None))
        if rc == lib.ET_OK:
            want = t.rows_of(ids, 1)
            self.expect(np.array_equal(rows[:ids.size], want) and not fresh[:ids.size].any(), "et_keys_plan",
                        "rows of a dense or hashed table are not the ids or their hashes, or some are fresh")

    def managed_plan(self, t: Table, ids: np.ndarray, rc: int, rows: np.ndarray, fresh: np.ndarray) -> None:
        """The outcome of a MANAGED plan that passed the checks: the live ids of the batch are touched
        (even when it fails); the distinct new ids, in order, take the never-used rows in order, then
        rows of live ids that are not protected (touched in the current or the previous epoch): with
        too few of them ET_E_FULL at the first new id left without a row."""
        lib = self.lib
        keys = ids.tolist()
        known = [t.row_of[k] for k in keys if k in t.row_of]
        t.touch(known)
        new = list(dict.fromkeys(k for k in keys if k not in t.row_of))
        first = {}
        for position, key in enumerate(keys):
            first.setdefault(key, position)
        live = len(t.keys)
        unused = t.capacity - live
        free = {r for r in range(live) if r not in t.touched[0] and r not in t.touched[1]}
        if t.epochs_known:
            self.verify("et_keys_plan", rc, (lib.ET_E_FULL, first[new[unused + len(free)]])
                        if len(new) > unused + len(free) else (lib.ET_OK, None))
        else:  # (epochs that began by the clock: any live row may be free)
            self.codes[("et_keys_plan", self.names.get(rc, rc))] += 1
            self.expect(rc == lib.ET_OK or (rc == lib.ET_E_FULL and self.err[0] in {first[k] for k in new[unused:]}),
                        "et_keys_plan", f"returned {self.names.get(rc, rc)} (err_pos {self.err[0]}) for "
                        f"{len(new)} new ids, {unused} rows never used")
            free = set(range(live)) - set(known)
        if rc != lib.ET_OK:
            return
        want = t.rows_of(ids, 1)
        is_new = want == t.default_row
        self.expect(np.array_equal(fresh.astype(bool), is_new), "et_keys_plan", "fresh is not the new ids")
        self.expect(np.array_equal(rows[~is_new], want[~is_new]), "et_keys_plan", "a live id's row is not its own")
        given = {k: int(rows[first[k]]) for k in new}
        self.expect(all(given.get(k, row) == row for k, row in zip(keys, rows.tolist())), "et_keys_plan",
                    "duplicates of a new id got different rows")
        taken = [given[k] for k in new]
        self.expect(taken[:unused] == list(range(live, live + min(unused, len(new)))), "et_keys_plan",
                    f"new ids took {taken[:8]}..., not the never-used rows from {live} on")
        victims = taken[unused:]
        self.expect(len(set(victims)) == len(victims) and set(victims) <= free, "et_keys_plan",
                    f"new ids took rows {victims[:8]}... that are protected, the batch's, or taken twice")
        if self.chance(0.8):
            self.apply(t, ids, np.ascontiguousarray(rows))

    def apply(self, t: Table, ids: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
        """et_keys_apply of a plan's rows, or of a batch made from the model (often forged)."""
        lib, ffi = self.lib, self.ffi
        if ids is None:
            ids, rows = self.apply_batch(t)
        evicted = ffi.new("int64_t *") if self.chance(0.97) else None
        n_told = self.told(ids)
        rows_told = n_told if self.chance(0.9) else self.told(rows)
        pointers = [self.ptr("int64_t *", ids), self.ptr("int64_t *", rows)]
        null = n_told > 0 and self.chance(0.03)
        if null:
            pointers[self.rng.integers(2)] = ffi.NULL
        rc = lib.et_keys_apply(t.h, *pointers, n_told, rows_told, evicted or ffi.NULL, self.err)
        ids, rows = ids[:max(n_told, 0)].tolist(), rows[:max(n_told, 0)].tolist()
        expected = self.first_failure(t, arg=n_told < 0 or null or evicted is None or t.key_space != MANAGED,
                                      size=rows_told != n_told, buffer=lib.ET_BUF_ROWS)
        self.verify("et_keys_apply", rc, expected or t.apply_failure(ids, rows, lib))
        if rc == lib.ET_OK:
            gone = t.apply(ids, rows)
            self.expect(evicted[0] == gone, "et_keys_apply", f"evicted {evicted[0]}, the model {gone}")
            self.keys_of_rows(t)

    def apply_batch(self, t: Table) -> tuple[np.ndarray, np.ndarray]:
        """ids and rows for et_keys_apply: live ids at their rows, new ids at the next row or at a live
        row (evicting), repeats; half the time one position forged (a row out of range or past the
        live rows, perhaps another position's row or id, perhaps an id live at another row)."""
        live = extended = len(t.keys)
        pairs: list[tuple[int, int]] = []
        for _ in range(int(self.pick(0, 1, self.rng.integers(2, 40)))):
            kind = self.rng.integers(4)
            if kind == 0 and live:
                row = int(self.rng.integers(live))
                pairs.append((t.keys[row], row))
            elif kind == 1 and extended < t.capacity:
                pairs.append((self.new_key(t), extended))
                extended += 1
            elif kind == 2 and live:
                pairs.append((self.new_key(t), int(self.rng.integers(live))))
            elif pairs:
                pairs.append(pairs[self.rng.integers(len(pairs))])
        if pairs and self.chance(0.5):
            i = int(self.rng.integers(len(pairs)))
            key, row = pairs[i]
            forged = self.rng.integers(4)
            if forged == 0:
                row = int(self.pick(-1, INT64_MIN, t.capacity, t.capacity + 7, extended + 1, INT64_MAX))
            elif forged == 1:
                row = pairs[self.rng.integers(len(pairs))][1]
            elif forged == 2:
                key = pairs[self.rng.integers(len(pairs))][0]
            elif t.keys:
                key = t.keys[self.rng.integers(len(t.keys))]
            pairs[i] = (key, row)
        return np.array([k for k, _ in pairs], np.int64), np.array([r for _, r in pairs], np.int64)

    def new_key(self, t: Table) -> int:
        """An id the model's map does not hold."""
        while True:
            key = int(self.pick(self.rng.integers(-3000, 3000), INT64_MIN, INT64_MAX,
                                self.rng.integers(INT64_MIN, INT64_MAX, dtype=np.int64, endpoint=True)))
            if key not in t.row_of:
                return key

    def keys_of_rows(self, t: Table) -> None:
        """et_keys_of_rows: the model's id of every live row of a MANAGED map; nothing of another table."""
        ffi = self.ffi
        entries = ffi.new("int64_t *")
        keys = self.lib.et_keys_of_rows(t.h, entries)
        self.codes[("et_keys_of_rows", "NULL" if keys == ffi.NULL else "ids")] += 1
        if t.key_space != MANAGED:
            return self.expect(keys == ffi.NULL and entries[0] == 0, "et_keys_of_rows", f"{entries[0]} ids of a "
                               f"table that is not managed")
        got = np.frombuffer(ffi.buffer(keys, 8 * entries[0]), np.int64).tolist() if entries[0] else []
        self.expect(got == t.keys, "et_keys_of_rows", f"{len(got)} ids, not the model's {len(t.keys)}")

    def keys_stats(self, t: Table) -> None:
        """et_keys_stats into a buffer of random size: the model's figures (all 0 but for MANAGED maps)."""
        lib = self.lib
        stats = None if self.chance(0.03) else self.buffer(lib.ET_KEYS_STATS, np.int64)
        told = self.told(stats)
        rc = lib.et_keys_stats(t.h, self.ptr("int64_t *", stats), told)
        self.verify("et_keys_stats", rc, self.first_failure(t, arg=stats is None, size=told < lib.ET_KEYS_STATS)
                    or (lib.ET_OK, None))
        if rc != lib.ET_OK:
            return
        got = stats[:lib.ET_KEYS_STATS].tolist()
        if t.key_space == MAPPED:  # its listed ids and its map's bytes, nothing else
            listed = len(t.listed)
            return self.expect(got[lib.ET_KEYS_STAT_LIVE] == listed and (got[lib.ET_KEYS_STAT_BYTES] > 16 * listed
                                                                         if listed else not any(got)) and
                               not any(v for i, v in enumerate(got) if i not in (lib.ET_KEYS_STAT_LIVE,
                                                                                 lib.ET_KEYS_STAT_BYTES)),
                               "et_keys_stats", f"{got} of a mapped table listing {listed} ids")
        if t.key_space != MANAGED:
            return self.expect(not any(got), "et_keys_stats", f"{got} of a table that is not managed")
        want = {lib.ET_KEYS_STAT_LIVE: len(t.keys), lib.ET_KEYS_STAT_EVICTIONS: t.evictions,
                lib.ET_KEYS_STAT_CAPACITY: t.capacity, lib.ET_KEYS_STAT_UNKNOWN: t.unknown}
        self.expect(all(got[i] == v for i, v in want.items()), "et_keys_stats", f"{got}, the model has {want}")
        epoch = got[lib.ET_KEYS_STAT_EPOCH]
        self.expect(epoch == t.epoch if t.epochs_known else epoch >= t.epoch, "et_keys_stats",
                    f"epoch {epoch}, the model counts {t.epoch}")
        self.expect(0 < got[lib.ET_KEYS_STAT_BYTES] <= 15.9375 * t.capacity + 40, "et_keys_stats",
                    f"{got[lib.ET_KEYS_STAT_BYTES]} bytes of map for {t.capacity} rows")

    def load(self, t: Table) -> None:
        """et_keys_load of some of the model's ids and new ones, now and then a repeat or more than fit."""
        lib, ffi = self.lib, self.ffi
        capacity = max(t.capacity, 0)
        n = int(self.pick(0, self.rng.integers(0, capacity + 1), capacity, capacity + 1, len(t.keys)))
        old = self.rng.permutation(np.array(t.keys, np.int64))[:self.rng.integers(0, n + 1)]
        new = self.rng.integers(INT64_MIN, INT64_MAX, n - old.size, dtype=np.int64, endpoint=True)
        keys = self.rng.permutation(np.concatenate([old, new]))
        if n >= 2 and self.chance(0.2):
            i, j = sorted(self.rng.choice(n, 2, replace=False))
            keys[j] = keys[i]
        n_told = self.told(keys)
        null = n_told > 0 and self.chance(0.03)
        rc = lib.et_keys_load(t.h, ffi.NULL if null else self.ptr("int64_t *", keys), n_told, self.err)
        keys = keys[:max(n_told, 0)].tolist()
        repeat = first_repeat(keys)
        expected = (lib.ET_E_ARG, None) if n_told < 0 or null or t.key_space != MANAGED else \
            (lib.ET_E_ID_RANGE, t.capacity) if n_told > t.capacity else \
            (lib.ET_E_ARG, repeat) if repeat is not None else self.first_failure(t) or (lib.ET_OK, None)
        self.verify("et_keys_load", rc, expected)
        if rc == lib.ET_OK:
            t.set_managed_map(keys)
            self.keys_of_rows(t)

    def keys_epoch(self, t: Table) -> None:
        lib = self.lib
        rc = lib.et_keys_epoch(t.h)
        self.verify("et_keys_epoch", rc, (lib.ET_E_DROPPED if t.dropped else lib.ET_OK, None))
        if rc == lib.ET_OK and t.key_space == MANAGED:
            t.new_epoch()

    def hash_rows(self) -> None:
        """et_hash_rows of any ids, seeds and num_rows (0 and past 2^32 among them), into buffers of
        random sizes: clients/embtier/keys.py's rows."""
        lib, ffi = self.lib, self.ffi
        n = int(self.pick(0, 1, self.rng.integers(2, 600), -1))
        ids = self.rng.integers(INT64_MIN, INT64_MAX, max(n, 0), dtype=np.int64, endpoint=True)
        seed = int(self.pick(0, 1, 2**64 - 1, self.rng.integers(0, 2**64, dtype=np.uint64)))
        num_rows = int(self.pick(1, 7, self.rng.integers(1, 2**32, endpoint=True), 2**32, 0, -1, 2**32 + 1, INT64_MAX))
        rows = self.buffer(max(n, 0), np.int64)
        n_told, rows_told = n if n < 0 else self.told(ids), self.told(rows)
        pointers = [self.ptr("int64_t *", ids), self.ptr("int64_t *", rows)]
        null = n_told > 0 and self.chance(0.03)
        if null:
            pointers[self.rng.integers(2)] = ffi.NULL
        rc = lib.et_hash_rows(pointers[0], n_told, seed, num_rows, pointers[1], rows_told)
        arg = n_told < 0 or null or not 1 <= num_rows <= 2**32
        self.verify("et_hash_rows", rc, (lib.ET_E_ARG if arg else lib.ET_E_SIZE if not holds(rows_told, n_told)
                                         else lib.ET_OK, None))
        if rc == lib.ET_OK:
            want = hashed_rows(ids[:n_told], num_rows, seed)
            self.expect(np.array_equal(rows[:n_told], want), "et_hash_rows", f"not keys.py's rows for seed {seed}, "
                        f"num_rows {num_rows}")

    def wal(self) -> None:
        """et_commit_* on a log file of the harness's own, and et_crc32: the record written is the documented
        one (header, zlib's CRC-32 over the packed LSN and kind then the payload), byte for byte."""
        lib, ffi = self.lib, self.ffi
        data = self.rng.integers(0, 256, int(self.pick(0, 1, 7, 4097)), dtype=np.uint8)
        start, seed = int(self.rng.integers(0, data.size + 1)), int(self.rng.integers(0, 2**32))
        how = self.pick("data", "data", "null", "negative")
        got = lib.et_crc32(seed, ffi.NULL if how == "null" else self.ptr("uint8_t *", data[start:]),
                           -1 if how == "negative" else data.size - start)
        want = zlib.crc32(data[start:].tobytes(), seed) if how == "data" else seed
        self.expect(got == want, "et_crc32", f"{got:#x} for {data.size - start} bytes ({how}) from {seed:#x}, "
                                             f"expected {want:#x}")
        durable = int(self.pick(0, 3, 1000))
        c = lib.et_commit_new(durable)
        self.expect(c != ffi.NULL, "et_commit_new", "NULL")
        if self.chance(0.1):
            return lib.et_commit_free(self.pick(c, ffi.NULL))  # (a leak of the other is harmless here)
        path = self.work / f"wal-{self.serial}.log"
        self.serial += 1
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        appended = durable
        try:
            fd_arg, appended_arg, durable_arg = self.pick((fd, durable, durable), (fd, durable + 2, durable),
                                                          (-2, durable, durable), (fd, durable, durable + 1),
                                                          (fd, -1, -1))
            null = self.chance(0.1)
            rc = lib.et_commit_switch(ffi.NULL if null else c, fd_arg, appended_arg, durable_arg)
            bad = null or fd_arg < -1 or appended_arg < 0 or durable_arg < 0 or durable_arg > appended_arg
            self.verify("et_commit_switch", rc, (lib.ET_E_ARG if bad else lib.ET_OK, None))
            if rc != lib.ET_OK:
                self.verify("et_commit_switch", lib.et_commit_switch(c, fd, durable, durable), (lib.ET_OK, None))
            else:
                appended = appended_arg
            expected = b""
            for _ in range(int(self.rng.integers(0, 6))):
                nparts = int(self.pick(0, 1, 3, 16, 17, -1))
                parts = [self.rng.integers(0, 256, int(self.pick(0, 1, 100, 5000)), dtype=np.uint8)
                         for _ in range(max(nparts, 0))]
                sizes = [p.size for p in parts]
                pointers = [self.ptr("uint8_t *", p) for p in parts]
                arg = nparts < 0 or nparts > 16
                size = False
                if parts and self.chance(0.2):
                    k = int(self.rng.integers(len(parts)))
                    how = self.pick("null", "negative", "huge")
                    if how == "null":
                        pointers[k], arg = ffi.NULL, arg or sizes[k] > 0
                    elif how == "negative":
                        sizes[k], arg = -1, True
                    else:
                        sizes[k], size = 2**32, True
                lsn = int(self.pick(appended + 1, appended + 1, -1))
                kind = int(self.pick(0, 7, 255, 256, -1))
                arg = arg or lsn < 0 or not 0 <= kind <= 255
                crc = ffi.new("uint32_t *")
                rc = lib.et_commit_append(c, lsn, kind, ffi.new("uint8_t *[]", pointers) if parts else ffi.NULL,
                                          ffi.new("int64_t[]", sizes) if parts else ffi.NULL, nparts,
                                          len(expected), crc, self.err)
                self.verify("et_commit_append", rc, (lib.ET_E_ARG if arg else lib.ET_E_SIZE if size else lib.ET_OK,
                                                     None))
                if rc == lib.ET_OK:
                    payload = b"".join(p.tobytes() for p in parts)
                    want_crc = zlib.crc32(payload, zlib.crc32(struct.pack("<QB", lsn, kind)))
                    expected += struct.pack("<IIIQB", 0x4C415745, len(payload), want_crc, lsn, kind) + payload
                    self.expect(crc[0] == want_crc, "et_commit_append", f"CRC {crc[0]:#x}, zlib says {want_crc:#x}")
                    appended = lsn
            self.expect(path.read_bytes() == expected, "et_commit_append", "the file is not the records appended")
            seconds = ffi.new("double *")
            for lsn in (durable, appended, appended + 1):
                rc = lib.et_commit_wait(c, lsn, seconds, self.err)
                self.verify("et_commit_wait", rc, (lib.ET_E_ARG if lsn > appended else lib.ET_OK, None))
                if rc == lib.ET_OK:
                    self.expect(lib.et_commit_durable(c) >= lsn, "et_commit_durable", f"below {lsn} after a wait")
            self.verify("et_commit_switch", lib.et_commit_switch(c, -1, appended, lib.et_commit_durable(c)),
                        (lib.ET_OK, None))
            rc = lib.et_commit_append(c, appended + 1, 1, ffi.NULL, ffi.NULL, 0, len(expected), ffi.NULL, self.err)
            self.verify("et_commit_append", rc, (lib.ET_E_ARG, None))  # closed
            self.verify("et_commit_wait", lib.et_commit_wait(c, appended, seconds, self.err), (lib.ET_OK, None))
            self.verify("et_commit_wait", lib.et_commit_wait(ffi.NULL, appended, seconds, self.err),
                        (lib.ET_E_ARG, None))
            self.expect(lib.et_commit_durable(ffi.NULL) == lib.ET_E_ARG, "et_commit_durable", "NULL handle")
            self.expect(lib.et_commit_failed(c) == 0, "et_commit_failed", "set while no fdatasync failed")
            self.expect(lib.et_commit_failed(ffi.NULL) == lib.ET_E_ARG, "et_commit_failed", "NULL handle")
            read_end, write_end = os.pipe()  # fdatasync of a pipe fails (EINVAL), as of a disk that lost pages
            try:
                self.verify("et_commit_switch", lib.et_commit_switch(c, write_end, appended, appended),
                            (lib.ET_OK, None))
                rc = lib.et_commit_append(c, appended + 1, 1, ffi.NULL, ffi.NULL, 0, 0, ffi.NULL, self.err)
                self.verify("et_commit_append", rc, (lib.ET_OK, None))
                for _ in range(2):  # the failure stays: no later fdatasync can make the record durable
                    rc = lib.et_commit_wait(c, appended + 1, seconds, self.err)
                    self.verify("et_commit_wait", rc, (lib.ET_E_IO, errno.EINVAL))
                self.expect(lib.et_commit_failed(c) == errno.EINVAL, "et_commit_failed", "not the fdatasync's errno")
                self.expect(lib.et_commit_durable(c) == appended, "et_commit_durable", "moved by a failed fdatasync")
                rc = lib.et_commit_append(c, appended + 2, 1, ffi.NULL, ffi.NULL, 0, 0, ffi.NULL, self.err)
                self.verify("et_commit_append", rc, (lib.ET_E_IO, errno.EINVAL))
                self.verify("et_commit_switch", lib.et_commit_switch(c, -1, appended + 1, appended), (lib.ET_OK, None))
            finally:
                os.close(read_end)
                os.close(write_end)
        finally:
            os.close(fd)
            path.unlink()
            lib.et_commit_free(c)

    # ---- the run -----------------------------------------------------------------------------

    def step(self) -> None:
        if self.chance(0.04) or not self.tables:
            return self.new_table()
        t = self.table()
        op = self.rng.integers(24)
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
            self.pick(self.process_wide, self.sizes, self.memory, self.hash_rows, self.wal)()
        elif op < 19:
            self.quantize()
        elif op < 20:
            self.plan(t)
        elif op < 21:
            self.churn(t) if t.key_space == MANAGED else self.plan(t)
        elif op < 22:
            self.apply(t)
        elif op < 23:
            self.pick(self.keys_stats, self.keys_of_rows, self.keys_epoch, self.keys_epoch, self.load,
                      self.set_keys, self.set_mapping, self.mapping_of)(t)
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
        for (call, ids, scm, parts), count in sorted(self.paths.items()):
            print(f"  {call:28} {ids:13} {scm:14} {parts:16} {count}")


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
