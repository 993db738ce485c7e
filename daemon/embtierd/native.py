"""The one module that calls the C kernels.

Each function checks what C cannot see: that every array is a numpy array of the right dtype,
C-contiguous, and writable where C writes into it.  It then hands C each buffer with its real size
(the array's own size, never one computed from what the call needs).  C checks pointers, the
sizes of the buffers (ET_E_SIZE names the one too small), ids and lengths before it touches
anything, and every placement entry before it indexes anything by it (ET_E_LOCATION for one that
names no slot with storage: a corrupt map, or a bad entry to publish).  Every code C returns
becomes an EmbtierError whose message names the field and the offending value, so nothing that
reaches C can crash the process or make it read or write past an array.  (The one input C takes
on trust is the memory behind a chunk's address, set_chunk: the tiers' arenas.)

A table's key space (set_keys, once, before it is shared) says how the ids of a lookup with
by_key=True become rows: DENSE ids are rows, HASHED ids are hashed (hash_rows), MANAGED ids are
looked up in the table's map of ids to rows, which only plan_keys / apply_keys change (the store
plans a write's rows, logs them, then applies them); MAPPED ids are looked up in the mapping the
table was given (set_mapping, instead of set_keys), the others hashed into its rows from hash_from on.

The placement map and the heat counters are C's, allocated with the table: NativeTable.loc is a
read-only view of the map (placement changes only through publish, after write_slots copied the
rows), NativeTable.heat a writable view of the counters (the tiering policy ages them in place).
Both views keep the C table alive as long as they live.  The cffi calls release the GIL.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
from embtier import wire

from embtierd._native import ffi, lib
from embtierd.errors import (
    EmbtierError,
    InvalidArgumentError,
    KeyspaceFullError,
    NotFoundError,
    ScmReadError,
    storage_error,
)
from embtierd.topology import nodemask_words

# the kernels' codes of embtier.wire's names (in the same order)
DTYPES = dict(zip(wire.DTYPES, (lib.ET_DTYPE_F32, lib.ET_DTYPE_F16, lib.ET_DTYPE_I8), strict=True))
POOL_MODES = dict(zip(wire.POOL_MODES, (lib.ET_POOL_SUM, lib.ET_POOL_MEAN, lib.ET_POOL_MAX), strict=True))
TIER_DRAM, TIER_CXL, TIER_SCM = lib.ET_TIER_DRAM, lib.ET_TIER_CXL, lib.ET_TIER_SCM  # = their index in wire.TIERS
ISA_NAMES = {lib.ET_ISA_GENERIC: "generic", lib.ET_ISA_AVX2: "avx2", lib.ET_ISA_AVX512: "avx512"}
# the buffer an ET_E_SIZE names (*err_pos), by its parameter name
BUFFER_NAMES = {lib.ET_BUF_OUT: "out", lib.ET_BUF_TIER_ROWS: "tier_rows", lib.ET_BUF_PART_ROWS: "part_rows",
                lib.ET_BUF_WEIGHTS: "weights", lib.ET_BUF_OUT_IDS: "out_ids", lib.ET_BUF_OUT_LENGTHS: "out_lengths",
                lib.ET_BUF_OUT_WEIGHTS: "out_weights", lib.ET_BUF_ROWS: "rows", lib.ET_BUF_LOCS: "locs",
                lib.ET_BUF_CODES: "codes", lib.ET_BUF_LO: "lo", lib.ET_BUF_SCALE: "scale",
                lib.ET_BUF_FRESH: "fresh"}
# the kernels' codes of the key spaces (embtierd.keys.space names them)
KEY_SPACES = {"dense": lib.ET_KEYS_DENSE, "hashed": lib.ET_KEYS_HASHED, "managed": lib.ET_KEYS_MANAGED,
              "mapped": lib.ET_KEYS_MAPPED}
# et_keys_stats' figures, by their names in keys_stats()
KEY_STATS = {"live": lib.ET_KEYS_STAT_LIVE, "evictions": lib.ET_KEYS_STAT_EVICTIONS,
             "map_bytes": lib.ET_KEYS_STAT_BYTES, "capacity": lib.ET_KEYS_STAT_CAPACITY,
             "unknown": lib.ET_KEYS_STAT_UNKNOWN, "epoch": lib.ET_KEYS_STAT_EPOCH}


def row_stride(dim: int, dtype: str) -> int:
    """Bytes one stored row takes."""
    return int(lib.et_row_stride(dim, DTYPES[dtype]))


def scm_chunk_bytes(stride: int, rows: int) -> int:
    """Bytes of SCM file a run of rows takes (rows never straddle a 4 KiB block)."""
    return int(lib.et_scm_chunk_bytes(stride, rows))


def require(arr: object, field: str, dtype: np.dtype, ndim: int | None = None, writable: bool = False) -> np.ndarray:
    """arr itself if it is a C-contiguous ndarray of dtype (and of ndim dimensions, and writable,
    when asked), else InvalidArgumentError."""
    if not isinstance(arr, np.ndarray):
        raise InvalidArgumentError(f"{field} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise InvalidArgumentError(f"{field} must have dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
    if ndim is not None and arr.ndim != ndim:
        raise InvalidArgumentError(f"{field} must have {ndim} dimension(s), got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError(f"{field} must be C-contiguous (got strides {arr.strides}); "
                                   "pass np.ascontiguousarray(...)")
    if writable and not arr.flags.writeable:
        raise InvalidArgumentError(f"{field} must be writable (the kernel writes into it)")
    return arr


def _optional(arr: np.ndarray | None, field: str, dtype: np.dtype, ndim: int | None = None,
              writable: bool = False) -> np.ndarray | None:
    """An optional array: None, or what require() accepts."""
    return None if arr is None else require(arr, field, dtype, ndim, writable)


def _ptr(ctype: str, arr: np.ndarray | None):
    return ffi.NULL if arr is None else ffi.from_buffer(ctype, arr, require_writable=False)


def _wptr(ctype: str, arr: np.ndarray | None):
    return ffi.NULL if arr is None else ffi.from_buffer(ctype, arr, require_writable=True)


def _size(arr: np.ndarray | None) -> int:
    """Elements of an array handed to C (0 for None)."""
    return 0 if arr is None else arr.size


def _size_error(where: str, which: int, buffers: dict[str, np.ndarray | None], call: str) -> InvalidArgumentError:
    """The error of an ET_E_SIZE: the buffer it names (which = *err_pos), its size, and the call."""
    name = BUFFER_NAMES.get(which, f"buffer {which}")
    arr = buffers.get(name)
    size = "none" if arr is None else f"{arr.size} x {arr.dtype.name} (shape {arr.shape})"
    return InvalidArgumentError(f"{where}: {name} does not fit the call: {size}, for {call}")


def _c_view(owner, accessor: Callable, dtype: type, writable: bool) -> np.ndarray:
    """A numpy view of an array C owns: accessor(owner, &entries) returns its pointer.  The view
    holds a reference to owner (a cdata freed by ffi.gc), so C frees the array only after the view
    is gone; a read-only view cannot be made writable."""
    entries = ffi.new("int64_t *")
    pointer = accessor(owner, entries)
    keep = ffi.gc(pointer, lambda _pointer, _owner=owner: None)  # the destructor's default holds owner
    buffer = memoryview(ffi.buffer(keep, entries[0] * np.dtype(dtype).itemsize))
    return np.frombuffer(buffer if writable else buffer.toreadonly(), dtype=dtype)


class NativeTable:
    """A C table handle, with views of the placement map (read-only) and heat counters it owns."""

    def __init__(self, name: str, num_rows: int, dim: int, dtype: str, chunk_shift: int, max_chunks: int):
        self.name = name
        self.num_rows = num_rows
        self.dim = dim
        self.max_chunks = max_chunks
        self.chunk_shift = chunk_shift
        self.nparts = 0  # fabric parts, once set_parts ran
        err = ffi.new("int *")
        handle = lib.et_table_new(num_rows, dim, DTYPES[dtype], chunk_shift, max_chunks, err)
        if handle == ffi.NULL and err[0] == lib.ET_E_NOMEM:
            raise MemoryError(f"table {name!r}: cannot allocate the placement map and heat counters of "
                              f"{num_rows} rows")
        if handle == ffi.NULL:
            raise InvalidArgumentError(
                f"table {name!r}: cannot build a table of num_rows={num_rows}, dim={dim}, dtype={dtype}")
        self._h = ffi.gc(handle, lib.et_table_free)
        self.stride = row_stride(dim, dtype)
        self.tier_shift = int(lib.et_table_tier_shift(handle))  # placement entry = (tier << tier_shift) | slot
        self.loc = _c_view(self._h, lib.et_table_loc, np.uint32, writable=False)  # changed by publish only
        self.heat = _c_view(self._h, lib.et_table_heat, np.uint8, writable=True)  # aged by the tiering policy
        self._dirty = np.zeros((num_rows + 63) // 64, dtype=np.uint64)  # rows written (et_write_rows sets bits)
        self._check(lib.et_table_set_dirty(handle, _wptr("uint64_t *", self._dirty), self._dirty.size), 0, "dirty")

    def set_chunk(self, tier: int, chunk: int, address: int, nbytes: int) -> None:
        """Backs a DRAM or CXL chunk with nbytes of memory at address (the rows that fit are its
        slots with storage; a chunk holds at most 2^chunk_shift); address 0 takes its storage away."""
        self._check(lib.et_table_set_chunk(self._h, tier, chunk, ffi.cast("void *", address),
                                           nbytes if address else 0), 0, "chunk")

    def set_scm(self, fd: int, align_bytes: int) -> None:
        self._check(lib.et_table_set_scm(self._h, fd, align_bytes), 0, "scm")

    def set_scm_chunk(self, chunk: int, file_offset: int, nbytes: int) -> None:
        """Backs an SCM chunk with nbytes of file space at file_offset (after set_scm)."""
        self._check(lib.et_table_set_scm_chunk(self._h, chunk, file_offset, nbytes), 0, "scm chunk")

    def configure(self, prefetch_distance: int, heat_sample_shift: int) -> None:
        lib.et_table_set_prefetch(self._h, prefetch_distance)
        lib.et_table_set_heat_sampling(self._h, heat_sample_shift)

    def set_cxl_delay(self, ns: int) -> None:
        """Injects ns of latency per CXL row a lookup serves (0 = off), for a CXL tier emulated in DRAM.

        Serialised per row, so an upper bound of the latency effect; raw reads are not delayed."""
        if isinstance(ns, bool) or not isinstance(ns, int) or not 0 <= ns <= lib.ET_CXL_DELAY_MAX_NS:
            raise InvalidArgumentError(f"table {self.name!r}: injected CXL latency must be an integer number "
                                       f"of ns in [0, {lib.ET_CXL_DELAY_MAX_NS}], got {ns!r}")
        self._check(lib.et_table_set_cxl_delay(self._h, ns), 0, "cxl delay")

    def take_dirty(self) -> np.ndarray:
        """The bitmap of rows written since the last call (uint64 words, row r = bit r % 64 of word
        r // 64), cleared in the same step."""
        out = np.empty_like(self._dirty)
        self._check(lib.et_table_take_dirty(self._h, _wptr("uint64_t *", out), out.size), 0, "dirty")
        return out

    def mark_dropped(self) -> None:
        lib.et_table_mark_dropped(self._h)

    def set_parts(self, nparts: int) -> None:
        """Gives the table nparts fabric parts (once); chunks are in part 0 until set_chunk_part."""
        self._check(lib.et_table_set_parts(self._h, nparts), 0, "parts")
        self.chunk_parts = _c_view(self._h, lib.et_table_chunk_parts, np.uint8, writable=False)  # set_chunk_part
        self.nparts = nparts

    def set_chunk_part(self, tier: int, chunk: int, part: int) -> None:
        self._check(lib.et_table_set_chunk_part(self._h, tier, chunk, part), 0, "chunk part")

    def parts_of_locs(self, locs: np.ndarray) -> np.ndarray:
        """The fabric part of each placement entry (uint8)."""
        return self.chunk_parts[locs >> self.chunk_shift]

    # ---- key spaces ----

    def set_keys(self, kind: str, seed: int = 0, epoch_seconds: float = 0.0) -> None:
        """Sets the key space (a KEY_SPACES name), once, before the table is shared: HASHED hashes
        with seed (an unsigned 64-bit value), MANAGED starts a new protection epoch every
        epoch_seconds (0: only keys_epoch starts one) and keeps its last row as the default row."""
        if kind not in KEY_SPACES:
            raise InvalidArgumentError(f"key space {kind!r} is not one of {sorted(KEY_SPACES)}")
        if not 0 <= seed < 1 << 64:
            raise InvalidArgumentError(f"key seed {seed} is not an unsigned 64-bit value")
        if not (math.isfinite(epoch_seconds) and 0 <= epoch_seconds < 1e9):
            raise InvalidArgumentError(f"key epoch {epoch_seconds} s is not in [0, 1e9)")
        rc = lib.et_table_set_keys(self._h, KEY_SPACES[kind], seed, int(epoch_seconds * 1e9))
        if rc == lib.ET_E_NOMEM:
            raise MemoryError(f"table {self.name!r}: cannot allocate the id map of {self.num_rows - 1} rows")
        if rc == lib.ET_E_ARG:
            raise InvalidArgumentError(f"table {self.name!r}: cannot make it {kind} (num_rows={self.num_rows}; "
                                       f"a managed table needs 2 rows or more, and the key space is set once)")
        self._check(rc, 0, "keys")

    def set_mapping(self, seed: int, ids: np.ndarray, rows: np.ndarray, hash_from: int) -> None:
        """Makes the table MAPPED (once, before it is shared, instead of set_keys): ids[i] -> rows[i],
        any other id hashed with seed into rows [hash_from, num_rows).  Errors name the request's
        fields: mapping_ids, mapping_rows, mapping_hash_from."""
        require(ids, "mapping_ids", np.int64, 1)
        require(rows, "mapping_rows", np.int64, 1)
        if ids.size != rows.size:
            raise InvalidArgumentError(f"mapping_ids has {ids.size} ids but mapping_rows has {rows.size} rows")
        if not 0 <= seed < 1 << 64:
            raise InvalidArgumentError(f"key seed {seed} is not an unsigned 64-bit value")
        if not 0 <= hash_from < self.num_rows:
            raise InvalidArgumentError(f"mapping_hash_from must be in [0, num_rows = {self.num_rows}), got {hash_from} "
                                       f"(unlisted ids hash into rows [mapping_hash_from, num_rows))")
        err = ffi.new("int64_t *", -1)
        rc = lib.et_table_set_mapping(self._h, seed, _ptr("int64_t *", ids), _ptr("int64_t *", rows), ids.size,
                                      hash_from, err)
        if rc == lib.ET_E_ID_RANGE:
            raise InvalidArgumentError(f"mapping_rows[{err[0]}] = {int(rows[err[0]])} is out of range [0, "
                                       f"{self.num_rows}) (mapping_ids[{err[0]}] = {int(ids[err[0]])})")
        if rc == lib.ET_E_ARG and 0 <= err[0] < ids.size:
            first = int(np.flatnonzero(ids[:err[0]] == ids[err[0]])[0])
            raise InvalidArgumentError(f"mapping_ids[{err[0]}] = {int(ids[err[0]])} repeats mapping_ids[{first}]: "
                                       f"each id is listed once")
        if rc == lib.ET_E_NOMEM:
            raise MemoryError(f"table {self.name!r}: cannot allocate the map of {ids.size} listed ids")
        if rc == lib.ET_E_ARG:
            raise InvalidArgumentError(f"table {self.name!r}: cannot make it mapped ({ids.size} listed ids, at most "
                                       f"2^32 - 2; the key space is set once)")
        self._check(rc, err[0], "mapping_ids")

    @property
    def mapping(self) -> tuple[np.ndarray, np.ndarray]:
        """(listed ids int64, their rows uint32): read-only views of a MAPPED table's mapping, in the
        order given (empty for other tables); valid as long as the table (they keep it alive)."""
        ids_ptr, rows_ptr = ffi.new("const int64_t **"), ffi.new("const uint32_t **")
        entries = ffi.new("int64_t *")
        lib.et_mapping_of(self._h, ids_ptr, rows_ptr, entries)
        if entries[0] == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)

        def view(pointer, dtype) -> np.ndarray:  # (holds the table: C frees the arrays only after the view)
            keep = ffi.gc(pointer, lambda _pointer, _owner=self._h: None)
            buffer = memoryview(ffi.buffer(keep, entries[0] * np.dtype(dtype).itemsize)).toreadonly()
            return np.frombuffer(buffer, dtype=dtype)

        ids, rows = view(ids_ptr[0], np.int64), view(rows_ptr[0], np.uint32)
        return ids, rows

    def plan_keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64, fresh bool): the row each id has after a write of ids, and whether it takes
        it now (a new id of a managed table); changes nothing (but marks live ids touched).
        KeyspaceFullError when a new id finds no row."""
        require(ids, "ids", np.int64, 1)
        rows = np.empty(ids.size, np.int64)
        fresh = np.empty(ids.size, np.uint8)
        err = ffi.new("int64_t *")
        rc = lib.et_keys_plan(self._h, _ptr("int64_t *", ids), ids.size, _wptr("int64_t *", rows), rows.size,
                              _wptr("uint8_t *", fresh), fresh.size, err)
        if rc == lib.ET_E_FULL:
            stats = self.keys_stats()
            raise KeyspaceFullError(
                f"table {self.name!r} has no row for ids[{err[0]}] = {int(ids[err[0]])}: all {stats['capacity']} "
                f"rows of its capacity hold ids written or read within the last two epochs, which are never "
                f"evicted; create the table with more rows, or write fewer new ids per epoch")
        self._check(rc, err[0], "ids", ids, buffers={"rows": rows, "fresh": fresh})
        return rows, fresh.view(np.bool_)

    def apply_keys(self, ids: np.ndarray, rows: np.ndarray) -> int:
        """Makes rows[i] the row of ids[i] in a managed table's map (a plan's rows, or a replayed
        record's); returns how many ids were evicted."""
        require(ids, "ids", np.int64, 1)
        require(rows, "rows", np.int64, 1)
        evicted = ffi.new("int64_t *")
        err = ffi.new("int64_t *", -1)  # (left -1 by the checks that name no position)
        rc = lib.et_keys_apply(self._h, _ptr("int64_t *", ids), _ptr("int64_t *", rows), ids.size, rows.size,
                               evicted, err)
        if rc == lib.ET_E_ID_RANGE:
            raise InvalidArgumentError(f"table {self.name!r}: rows[{err[0]}] = {int(rows[err[0]])} cannot be given "
                                       f"to an id (capacity {self.keys_stats()['capacity']}, "
                                       f"{self.keys_stats()['live']} rows live)")
        if rc == lib.ET_E_ARG and ids.size == rows.size and 0 <= err[0] < ids.size:
            raise InvalidArgumentError(f"table {self.name!r}: ids[{err[0]}] = {int(ids[err[0]])} cannot take "
                                       f"rows[{err[0]}] = {int(rows[err[0]])}: the id or the row is given twice, "
                                       f"or the id holds another row")
        if rc == lib.ET_E_ARG:
            raise InvalidArgumentError(f"table {self.name!r} is not managed: its map cannot be changed")
        self._check(rc, err[0], "ids", buffers={"rows": rows})
        return int(evicted[0])

    def keys_stats(self) -> dict[str, int]:
        """The managed map's figures (all 0 for other key spaces): live, evictions, map_bytes,
        capacity, unknown (ids counted by lookups), epoch."""
        stats = np.zeros(lib.ET_KEYS_STATS, np.int64)
        self._check(lib.et_keys_stats(self._h, _wptr("int64_t *", stats), stats.size), 0, "keys")
        return {name: int(stats[i]) for name, i in KEY_STATS.items()}

    @property
    def keys_of_rows(self) -> np.ndarray:
        """A read-only view of the id of each live row of a managed table (empty otherwise), valid
        until the map next changes: a copy is taken by whoever keeps it (checkpoints do)."""
        entries = ffi.new("int64_t *")
        ptr = lib.et_keys_of_rows(self._h, entries)
        if ptr == ffi.NULL or entries[0] == 0:
            return np.zeros(0, np.int64)
        view = np.frombuffer(ffi.buffer(ptr, entries[0] * 8), np.int64)
        view.flags.writeable = False
        return view

    def load_keys(self, keys: np.ndarray) -> None:
        """Restores a managed map: keys[i] is the id of row i (live rows [0, len(keys)))."""
        require(keys, "keys", np.int64, 1)
        err = ffi.new("int64_t *", -1)  # (left -1 by the checks that name no position)
        rc = lib.et_keys_load(self._h, _ptr("int64_t *", keys), keys.size, err)
        if rc == lib.ET_E_ID_RANGE:
            raise InvalidArgumentError(f"table {self.name!r}: {keys.size} ids do not fit its {err[0]} rows")
        if rc == lib.ET_E_ARG and 0 <= err[0] < keys.size:
            raise InvalidArgumentError(f"table {self.name!r}: keys[{err[0]}] = {int(keys[err[0]])} is given twice")
        if rc == lib.ET_E_ARG:
            raise InvalidArgumentError(f"table {self.name!r} is not managed: it has no map to load")
        self._check(rc, err[0], "keys")

    def keys_epoch(self) -> None:
        """Starts a new protection epoch of a managed table now."""
        self._check(lib.et_keys_epoch(self._h), 0, "keys")

    # ---- lookups ----

    def gather(self, ids: np.ndarray, out: np.ndarray, tier_rows: np.ndarray | None = None,
               part_rows: np.ndarray | None = None, by_key: bool = False, unknown: np.ndarray | None = None) -> None:
        """out = rows of ids (keys, with by_key: see the module's doc); tier_rows (int64 [3],
        optional) receives the rows served per tier, part_rows (int64 [nparts], optional) per fabric
        part, unknown (int64 [1], optional) the managed ids with no row (served the default row)."""
        require(ids, "ids", np.int64, 1)
        require(out, "out", np.float32, writable=True)
        _optional(tier_rows, "tier_rows", np.int64, writable=True)
        _optional(part_rows, "part_rows", np.int64, writable=True)
        _optional(unknown, "unknown", np.int64, writable=True)
        err = ffi.new("int64_t *")
        rc = lib.et_gather(self._h, _ptr("int64_t *", ids), ids.size, _wptr("float *", out), out.size,
                           _wptr("int64_t *", tier_rows), _size(tier_rows), _wptr("int64_t *", part_rows),
                           _size(part_rows), int(by_key), _unknown_ptr(unknown), err)
        self._check(rc, err[0], "ids", ids, buffers={"out": out, "tier_rows": tier_rows, "part_rows": part_rows},
                    by_key=by_key)

    def pool(self, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, mode: int,
             out: np.ndarray, tier_rows: np.ndarray | None = None, part_rows: np.ndarray | None = None,
             by_key: bool = False, unknown: np.ndarray | None = None) -> None:
        """out[b] = rows of bag b (lengths[b] ids each) pooled by mode (a POOL_MODES value), weighted
        when weights (one per id) are given; tier_rows, part_rows, by_key and unknown as for gather."""
        require(ids, "ids", np.int64, 1)
        require(lengths, "lengths", np.int32, 1)
        _optional(weights, "weights", np.float32, 1)
        require(out, "out", np.float32, writable=True)
        _optional(tier_rows, "tier_rows", np.int64, writable=True)
        _optional(part_rows, "part_rows", np.int64, writable=True)
        _optional(unknown, "unknown", np.int64, writable=True)
        err = ffi.new("int64_t *")
        rc = lib.et_pool(self._h, _ptr("int64_t *", ids), ids.size, _ptr("int32_t *", lengths), lengths.size,
                         _ptr("float *", weights), _size(weights), mode, _wptr("float *", out), out.size,
                         _wptr("int64_t *", tier_rows), _size(tier_rows), _wptr("int64_t *", part_rows),
                         _size(part_rows), int(by_key), _unknown_ptr(unknown), err)
        self._check(rc, err[0], "ids", ids, lengths, buffers={"out": out, "weights": weights,
                                                              "tier_rows": tier_rows, "part_rows": part_rows},
                    by_key=by_key)

    def partition(self, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, out_ids: np.ndarray,
                  out_lengths: np.ndarray, out_weights: np.ndarray | None, part_rows: np.ndarray,
                  by_key: bool = False, unknown: np.ndarray | None = None) -> None:
        """Orders ids by (fabric part, bag): see et_partition (out_ids are rows: pool them with
        by_key False); by_key and unknown as for gather."""
        require(ids, "ids", np.int64, 1)
        require(lengths, "lengths", np.int32, 1)
        _optional(weights, "weights", np.float32, 1)
        require(out_ids, "out_ids", np.int64, writable=True)
        require(out_lengths, "out_lengths", np.int32, writable=True)
        _optional(out_weights, "out_weights", np.float32, writable=True)
        require(part_rows, "part_rows", np.int64, writable=True)
        _optional(unknown, "unknown", np.int64, writable=True)
        err = ffi.new("int64_t *")
        rc = lib.et_partition(self._h, _ptr("int64_t *", ids), ids.size, _ptr("int32_t *", lengths), lengths.size,
                              _ptr("float *", weights), _size(weights), _wptr("int64_t *", out_ids), out_ids.size,
                              _wptr("int32_t *", out_lengths), out_lengths.size, _wptr("float *", out_weights),
                              _size(out_weights), _wptr("int64_t *", part_rows), part_rows.size, int(by_key),
                              _unknown_ptr(unknown), err)
        self._check(rc, err[0], "ids", ids, lengths,
                    buffers={"weights": weights, "out_ids": out_ids, "out_lengths": out_lengths,
                             "out_weights": out_weights, "part_rows": part_rows}, by_key=by_key)

    def write_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Stores encoded rows (uint8, stride bytes each) at the homes of ids."""
        require(ids, "ids", np.int64, 1)
        require(rows, "rows", np.uint8)
        err = ffi.new("int64_t *")
        rc = lib.et_write_rows(self._h, _ptr("int64_t *", ids), ids.size, _ptr("uint8_t *", rows), rows.nbytes, err)
        self._check(rc, err[0], "ids", ids, buffers={"rows": rows})

    def write_slots(self, locs: np.ndarray, rows: np.ndarray) -> None:
        """Stores encoded rows in slots no row points at yet (the mover's copy step)."""
        require(locs, "locs", np.uint32, 1)
        require(rows, "rows", np.uint8)
        err = ffi.new("int64_t *")
        rc = lib.et_write_slots(self._h, _ptr("uint32_t *", locs), locs.size, _ptr("uint8_t *", rows), rows.nbytes,
                                err)
        self._check(rc, err[0], "locs", locs=locs, buffers={"rows": rows})

    def displaced(self) -> int:
        """Placement entries that are not their own id: 0 while every row is where the table was made
        (then the lookups of a table with rows in DRAM only do not read the map)."""
        return lib.et_table_displaced(self._h)

    def publish(self, ids: np.ndarray, locs: np.ndarray) -> None:
        """Points ids at their new homes (placement entries locs, one per id), atomically for lookups."""
        require(ids, "ids", np.int64, 1)
        require(locs, "locs", np.uint32, 1)
        err = ffi.new("int64_t *")
        rc = lib.et_publish(self._h, _ptr("int64_t *", ids), ids.size, _ptr("uint32_t *", locs), locs.size, err)
        self._check(rc, err[0], "ids", ids, locs=locs, buffers={"locs": locs})

    def read_rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out (uint8, stride bytes a row) = the encoded rows of ids."""
        require(ids, "ids", np.int64, 1)
        require(out, "out", np.uint8, writable=True)
        err = ffi.new("int64_t *")
        rc = lib.et_read_rows(self._h, _ptr("int64_t *", ids), ids.size, _wptr("uint8_t *", out), out.nbytes, err)
        self._check(rc, err[0], "ids", ids, buffers={"rows": out})

    def scm_read_errors(self) -> tuple[int, int]:
        """(reads of rows from the SCM file that failed since the table was made, the errno of the latest)."""
        last_errno = ffi.new("int32_t *")
        return int(lib.et_scm_read_errors(self._h, last_errno)), int(last_errno[0])

    def _check(self, rc: int, pos: int, field: str, ids: np.ndarray | None = None,
               lengths: np.ndarray | None = None, locs: np.ndarray | None = None,
               buffers: dict[str, np.ndarray | None] | None = None, by_key: bool = False) -> None:
        """Raises the EmbtierError of a kernel's return code; pos is its *err_pos, field what it names
        (by_key: ids were keys, so a placement entry is the one of the row a key maps to)."""
        if rc == lib.ET_OK:
            return
        where = f"table {self.name!r}"
        if rc == lib.ET_E_ID_RANGE:
            raise InvalidArgumentError(
                f"{field}[{pos}] = {int(ids[pos])} is out of range [0, {self.num_rows}) for {where}")
        if rc == lib.ET_E_LENGTHS and pos >= 0:
            raise InvalidArgumentError(f"lengths[{pos}] = {int(lengths[pos])} is negative")
        if rc == lib.ET_E_LENGTHS:
            raise InvalidArgumentError(
                f"lengths sum to {int(lengths.sum(dtype=np.int64))} but {ids.size} ids were given")
        if rc == lib.ET_E_SIZE:
            bags = "" if lengths is None else f" in {lengths.size} bags"
            raise _size_error(where, pos, buffers or {}, f"{_size(ids)} ids{bags} of dim {self.dim} "
                              f"({self.stride} bytes a row), {self.nparts} fabric parts")
        if rc == lib.ET_E_DROPPED:
            raise NotFoundError(f"{where} was dropped")
        if rc == lib.ET_E_IO:
            raise storage_error(OSError(pos, os.strerror(pos)), "the SCM file", f"{where}: SCM I/O")
        if rc == lib.ET_E_SCM_READ:
            kind = "key" if by_key else "id"
            raise ScmReadError(f"{where}: the row of {kind} {int(ids[pos])} ({field}[{pos}]) cannot be read from the "
                               f"SCM file: {os.strerror(self.scm_read_errors()[1])}")
        if rc == lib.ET_E_LOCATION and locs is not None:  # (publish, write_slots: *err_pos is in locs)
            raise EmbtierError(f"{where}: locs[{pos}] = {self._entry(int(locs[pos]))} names no slot with storage")
        if rc == lib.ET_E_LOCATION and (by_key or not 0 <= int(ids[pos]) < self.num_rows):
            raise EmbtierError(f"{where}: {field}[{pos}] = {int(ids[pos])} maps to a row whose home has no storage "
                               f"(placement map corrupt)")
        if rc == lib.ET_E_LOCATION:
            raise EmbtierError(f"{where}: {field}[{pos}] has a home with no storage (id {int(ids[pos])} at "
                               f"{self._entry(int(self.loc[ids[pos]]))}: placement map corrupt)")
        if rc == lib.ET_E_NOMEM:
            raise EmbtierError(f"{where}: out of memory in a native {field} call")
        raise InvalidArgumentError(f"{where}: native call rejected its arguments ({field}, code {rc})")

    def _entry(self, entry: int) -> str:
        """A placement entry, spelt out."""
        return f"{entry:#x} (tier {entry >> self.tier_shift}, slot {entry & ((1 << self.tier_shift) - 1)})"


def _unknown_ptr(unknown: np.ndarray | None):
    """The C pointer of an unknown-ids counter (int64 [1]), or NULL."""
    if unknown is not None and unknown.size != 1:
        raise InvalidArgumentError(f"unknown must hold one int64 counter, got {unknown.size}")
    return _wptr("int64_t *", unknown)


def hash_rows(ids: np.ndarray, seed: int, num_rows: int) -> np.ndarray:
    """The HASHED rows of ids for seed and num_rows (what a hashed table's lookups read)."""
    require(ids, "ids", np.int64, 1)
    if not 0 <= seed < 1 << 64:
        raise InvalidArgumentError(f"key seed {seed} is not an unsigned 64-bit value")
    rows = np.empty(ids.size, np.int64)
    rc = lib.et_hash_rows(_ptr("int64_t *", ids), ids.size, seed, num_rows, _wptr("int64_t *", rows), rows.size)
    if rc != lib.ET_OK:
        raise InvalidArgumentError(f"cannot hash onto num_rows={num_rows} (1 to {1 << 32})")
    return rows


def _strerror(errno_value: int) -> str:
    return f"{os.strerror(errno_value)} (errno {errno_value})"


def mem_map(nbytes: int, huge: bool) -> tuple[int, int]:
    """(address, madvise errno) of a fresh 2 MiB-aligned anonymous mapping (bind it with mem_bind)."""
    err, huge_err = ffi.new("int *"), ffi.new("int *")
    addr = lib.et_mem_map(nbytes, int(huge), err, huge_err)
    if addr == ffi.NULL:
        raise MemoryError(f"cannot map {nbytes} bytes: {_strerror(err[0])}")
    return int(ffi.cast("uintptr_t", addr)), huge_err[0]


def mem_bind(address: int, nbytes: int, nodes: list[int]) -> int:
    """Binds the pages of [address, address + nbytes) to nodes (mbind MPOL_BIND); the errno, 0 on success.

    address must be 4 KiB aligned; pages already placed are not moved."""
    words, maxnode = nodemask_words(nodes)
    mask = ffi.new("unsigned long[]", words) if words else ffi.NULL
    return int(lib.et_mem_bind(ffi.cast("void *", address), nbytes, mask, len(words), maxnode))


def mem_unmap(address: int, nbytes: int) -> None:
    lib.et_mem_unmap(ffi.cast("void *", address), nbytes)


def set_kernel_threads(n: int) -> None:
    if lib.et_set_kernel_threads(n) != lib.ET_OK:
        raise InvalidArgumentError(f"kernels.threads = {n}: cannot start that many kernel threads")


def set_scm_queue_depth(depth: int) -> None:
    if lib.et_set_scm_queue_depth(depth) != lib.ET_OK:
        raise InvalidArgumentError(f"kernels.scm_queue_depth = {depth} is outside [1, 256]")


def isa() -> str:
    return ISA_NAMES[lib.et_isa()]


def force_isa(name: str) -> None:
    """Runs the kernels with a lower instruction set (tests of every path on one host)."""
    code = {v: k for k, v in ISA_NAMES.items()}[name]
    if lib.et_force_isa(code) != lib.ET_OK:
        raise InvalidArgumentError(f"instruction set {name!r} is not available on this CPU")


def scm_async() -> bool:
    return bool(lib.et_scm_async())


# ---- checkpoint quantization

QUANT_BITS = (2, 3, 4, 8)
# The adaptive range moves its ends in by at most this fraction of (max - min) in total.
QUANT_ADAPTIVE_MAX_SHRINK = lib.ET_QUANT_ADAPTIVE_MAX_SHRINK_BINS / lib.ET_QUANT_ADAPTIVE_BINS


def quant_row_bytes(dim: int, bits: int) -> int:
    """Bytes of one row of packed codes: ceil(dim * bits / 8)."""
    if not isinstance(bits, int | np.integer) or isinstance(bits, bool) or bits not in QUANT_BITS:
        raise InvalidArgumentError(f"quant_bits must be one of {', '.join(map(str, QUANT_BITS))}; got {bits}")
    if dim < 1:
        raise InvalidArgumentError(f"dim must be at least 1, got {dim}")
    return int(lib.et_quant_row_bytes(dim, bits))


def quantize(rows: np.ndarray, bits: int, adaptive: bool,
             params_fp16: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rows float32 [n, dim] -> (codes uint8 [n, row bytes], lo float32 [n], scale float32 [n]).

    Value ~ lo + q * scale, q in [0, 2^bits - 1]. adaptive searches a narrower range than the row's
    min-max when that lowers the row's squared error; params_fp16 rounds lo down and scale up to
    values exact in float16 (for rows within +-60000)."""
    require(rows, "rows", np.float32, 2)
    n, dim = rows.shape
    codes = np.empty((n, quant_row_bytes(dim, bits)), dtype=np.uint8)
    lo, scale = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    err = ffi.new("int64_t *", -1)
    method = lib.ET_QUANT_ADAPTIVE if adaptive else lib.ET_QUANT_MINMAX
    rc = lib.et_quantize(_ptr("float *", rows), rows.size, n, dim, bits, method, int(params_fp16),
                         _wptr("uint8_t *", codes), codes.nbytes, _wptr("float *", lo), lo.size,
                         _wptr("float *", scale), scale.size, err)
    if rc == lib.ET_E_ARG and err[0] >= 0:
        row = err[0]
        if not np.isfinite(rows[row]).all():
            raise InvalidArgumentError(f"rows[{row}] has a non-finite value")
        raise InvalidArgumentError(f"rows[{row}]: quantization parameters overflow float16 "
                                   f"(largest magnitude {float(np.abs(rows[row]).max())})")
    _check_quant(rc, "quantize", err[0], {"rows": rows, "codes": codes, "lo": lo, "scale": scale})
    return codes, lo, scale


def dequantize(codes: np.ndarray, lo: np.ndarray, scale: np.ndarray, dim: int, bits: int) -> np.ndarray:
    """codes uint8 [n, row bytes], lo and scale float32 [n] -> rows float32 [n, dim] = lo + q * scale."""
    row_bytes = quant_row_bytes(dim, bits)
    require(codes, "codes", np.uint8, 2)
    require(lo, "lo", np.float32, 1)
    require(scale, "scale", np.float32, 1)
    n = codes.shape[0]
    if codes.shape[1] != row_bytes:
        raise InvalidArgumentError(f"codes must have {row_bytes} bytes a row for dim={dim} and "
                                   f"quant_bits={bits}, got shape {codes.shape}")
    if lo.size != n or scale.size != n:
        raise InvalidArgumentError(f"lo and scale must have one entry per row of codes ({n}), "
                                   f"got {lo.size} and {scale.size}")
    rows = np.empty((n, dim), dtype=np.float32)
    err = ffi.new("int64_t *", -1)
    rc = lib.et_dequantize(_ptr("uint8_t *", codes), codes.nbytes, _ptr("float *", lo), lo.size,
                           _ptr("float *", scale), scale.size, n, dim, bits, _wptr("float *", rows), rows.size, err)
    if rc == lib.ET_E_ARG and err[0] >= 0:
        row = err[0]
        raise InvalidArgumentError(
            f"row {row}: lo = {lo[row]}, scale = {scale[row]} are not quantization parameters "
            f"(finite, scale >= 0, lo + {2**bits - 1} * scale within float32)")
    _check_quant(rc, "dequantize", err[0], {"rows": rows, "codes": codes, "lo": lo, "scale": scale})
    return rows


def _check_quant(rc: int, call: str, pos: int, buffers: dict[str, np.ndarray]) -> None:
    if rc == lib.ET_E_NOMEM:
        raise EmbtierError(f"out of memory in native {call}")
    if rc == lib.ET_E_SIZE:
        rows = buffers["rows"]
        raise _size_error(f"native {call}", pos, buffers, f"rows of shape {rows.shape}")
    if rc != lib.ET_OK:
        raise InvalidArgumentError(f"native {call} rejected its arguments (code {rc})")


class GroupCommit:
    """The write-ahead log's appends and group commit in C (et_commit_*): the GIL is released while a
    record is checksummed and written and while an fdatasync runs or is waited for.  The log
    (durability/wal.py) keeps the files; this holds the fd appended to, the last LSN appended and
    the last known durable."""

    def __init__(self, durable_lsn: int) -> None:
        handle = lib.et_commit_new(durable_lsn)
        if handle == ffi.NULL:
            raise MemoryError("et_commit_new: out of memory")
        self._h = ffi.gc(handle, lib.et_commit_free)

    def switch(self, fd: int, appended_lsn: int, durable_lsn: int) -> None:
        """Appends go to fd from now on (-1: the log is closed); records up to durable_lsn are durable."""
        rc = lib.et_commit_switch(self._h, fd, appended_lsn, durable_lsn)
        if rc != lib.ET_OK:
            raise ValueError(f"et_commit_switch(fd {fd}, appended {appended_lsn}, durable {durable_lsn}) refused")

    def append(self, lsn: int, kind: int, parts: list, used_bytes: int,
               write: tuple[NativeTable, np.ndarray, np.ndarray] | None = None) -> EmbtierError | None:
        """Writes the record of LSN lsn whose payload is parts (bytes-like, C-contiguous) in order;
        OSError when the write fails (the file is then cut back to used_bytes).  write: (table, ids,
        encoded rows) to store in the same call once the record is written (et_write_rows_logged;
        bad ids or sizes are refused before the record is written); what storing them raised
        (the record is in the log then) is returned, not raised, so that the caller can count the
        record first."""
        buffers = [ffi.from_buffer("uint8_t[]", part) for part in parts]
        sizes = ffi.new("int64_t[]", [len(b) for b in buffers])
        err = ffi.new("int64_t *")
        if write is None:
            rc = lib.et_commit_append(self._h, lsn, kind, ffi.new("uint8_t *[]", buffers), sizes, len(buffers),
                                      used_bytes, ffi.NULL, err)
        else:
            table, ids, rows = write
            require(ids, "ids", np.int64, 1)
            require(rows, "rows", np.uint8)
            done = ffi.new("int32_t *")
            rc = lib.et_write_rows_logged(table._h, _ptr("int64_t *", ids), ids.size, _ptr("uint8_t *", rows),
                                          rows.nbytes, self._h, lsn, kind, ffi.new("uint8_t *[]", buffers), sizes,
                                          len(buffers), used_bytes, done, err)
            logged = bool(done[0])
            if rc != lib.ET_OK and (logged or rc != lib.ET_E_IO):  # the table's code, not the log's
                try:
                    table._check(rc, err[0], "ids", ids, buffers={"rows": rows})
                except EmbtierError as e:
                    if logged:
                        return e
                    raise
        if rc == lib.ET_E_IO:
            raise OSError(int(err[0]), os.strerror(int(err[0])))
        if rc != lib.ET_OK:
            raise ValueError(f"write-ahead log record {lsn}: et_commit_append refused it (code {rc}: kind {kind}, "
                             f"{len(parts)} part(s) of {sum(len(b) for b in buffers)} bytes)")

    def wait(self, lsn: int) -> float:
        """Returns once lsn is durable; the seconds of the fdatasyncs this call led (0: it led none).
        OSError when the fdatasync it led failed."""
        seconds = ffi.new("double *")
        err = ffi.new("int64_t *")
        rc = lib.et_commit_wait(self._h, lsn, seconds, err)
        if rc == lib.ET_E_IO:
            raise OSError(int(err[0]), os.strerror(int(err[0])))
        if rc != lib.ET_OK:
            raise ValueError(f"write-ahead log record {lsn} was never appended, or the log is closed")
        return float(seconds[0])

    @property
    def durable_lsn(self) -> int:
        return int(lib.et_commit_durable(self._h))

    @property
    def failed(self) -> int:
        """The errno of the fdatasync that failed, after which nothing is appended or made durable
        again (et_commit_wait); 0 while none has."""
        return int(lib.et_commit_failed(self._h))
