"""The one module that calls the C kernels.

Each function checks dtypes, contiguity and lengths before the call, and
turns a negative return code into an EmbtierError whose message names the
field and the offending value.  The C side checks bounds again, so nothing
that reaches it can crash the process.  The cffi calls release the GIL.
"""

from __future__ import annotations

import os

import numpy as np
from embtier import wire

from embtierd._native import ffi, lib
from embtierd.errors import EmbtierError, InvalidArgumentError, NotFoundError, storage_error
from embtierd.topology import nodemask_words

# the kernels' codes of embtier.wire's names (in the same order)
DTYPES = dict(zip(wire.DTYPES, (lib.ET_DTYPE_F32, lib.ET_DTYPE_F16, lib.ET_DTYPE_I8), strict=True))
POOL_MODES = dict(zip(wire.POOL_MODES, (lib.ET_POOL_SUM, lib.ET_POOL_MEAN, lib.ET_POOL_MAX), strict=True))
TIER_DRAM, TIER_CXL, TIER_SCM = lib.ET_TIER_DRAM, lib.ET_TIER_CXL, lib.ET_TIER_SCM  # = their index in wire.TIERS
ISA_NAMES = {lib.ET_ISA_GENERIC: "generic", lib.ET_ISA_AVX2: "avx2", lib.ET_ISA_AVX512: "avx512"}


def row_stride(dim: int, dtype: str) -> int:
    """Bytes one stored row takes."""
    return int(lib.et_row_stride(dim, DTYPES[dtype]))


def scm_chunk_bytes(stride: int, rows: int) -> int:
    """Bytes of SCM file a run of rows takes (rows never straddle a 4 KiB block)."""
    return int(lib.et_scm_chunk_bytes(stride, rows))


def require(arr: object, field: str, dtype: np.dtype, ndim: int) -> np.ndarray:
    """arr itself if it is a C-contiguous ndarray of dtype and ndim, else InvalidArgumentError."""
    if not isinstance(arr, np.ndarray):
        raise InvalidArgumentError(f"{field} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise InvalidArgumentError(f"{field} must have dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
    if arr.ndim != ndim:
        raise InvalidArgumentError(f"{field} must have {ndim} dimension(s), got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError(f"{field} must be C-contiguous (got strides {arr.strides}); "
                                   "pass np.ascontiguousarray(...)")
    return arr


def _ptr(ctype: str, arr: np.ndarray | None):
    return ffi.NULL if arr is None else ffi.from_buffer(ctype, arr, require_writable=False)


def _wptr(ctype: str, arr: np.ndarray):
    return ffi.from_buffer(ctype, arr, require_writable=True)


def _wptr_or_null(ctype: str, arr: np.ndarray | None):
    return ffi.NULL if arr is None else _wptr(ctype, arr)


def _sized(arr: np.ndarray | None, size: int, field: str, dtype: np.dtype) -> np.ndarray | None:
    """arr (None passes) if it is a contiguous 1-d dtype array of size elements, else InvalidArgumentError."""
    if arr is not None:
        require(arr, field, dtype, 1)
        if arr.size != size:
            raise InvalidArgumentError(f"{field} must have {size} entries, got {arr.size}")
    return arr


class NativeTable:
    """A C table handle over a placement map and heat counters owned here."""

    def __init__(self, name: str, num_rows: int, dim: int, dtype: str, chunk_shift: int, max_chunks: int):
        self.name = name
        self.num_rows = num_rows
        self.max_chunks = max_chunks
        self.chunk_shift = chunk_shift
        self.nparts = 0  # fabric parts, once set_parts ran
        self.loc = huge_array(num_rows, np.uint32)
        self.heat = huge_array(num_rows, np.uint8)
        handle = lib.et_table_new(num_rows, dim, DTYPES[dtype], chunk_shift, max_chunks,
                                  _wptr("uint32_t *", self.loc), _wptr("uint8_t *", self.heat))
        if handle == ffi.NULL:
            raise InvalidArgumentError(
                f"table {name!r}: cannot build a table of num_rows={num_rows}, dim={dim}, dtype={dtype}")
        self._h = ffi.gc(handle, lib.et_table_free)
        self.tier_shift = int(lib.et_table_tier_shift(handle))  # placement entry = (tier << tier_shift) | slot
        self._dirty = np.zeros((num_rows + 63) // 64, dtype=np.uint64)  # rows written (et_write_rows sets bits)
        lib.et_table_set_dirty(handle, _wptr("uint64_t *", self._dirty))

    def set_chunk(self, tier: int, chunk: int, address: int) -> None:
        self._check(lib.et_table_set_chunk(self._h, tier, chunk, ffi.cast("void *", address)), None, "chunk")

    def set_scm(self, fd: int, align_bytes: int) -> None:
        self._check(lib.et_table_set_scm(self._h, fd, align_bytes), None, "scm")

    def set_scm_chunk(self, chunk: int, file_offset: int) -> None:
        self._check(lib.et_table_set_scm_chunk(self._h, chunk, file_offset), None, "scm chunk")

    def configure(self, prefetch_distance: int, heat_sample_shift: int) -> None:
        lib.et_table_set_prefetch(self._h, prefetch_distance)
        lib.et_table_set_heat_sampling(self._h, heat_sample_shift)

    def set_cxl_delay(self, ns: int) -> None:
        """Injects ns of latency per CXL row a lookup serves (0 = off), for a CXL tier emulated in DRAM.

        Serialised per row, so an upper bound of the latency effect; raw reads are not delayed."""
        if isinstance(ns, bool) or not isinstance(ns, int) or not 0 <= ns <= lib.ET_CXL_DELAY_MAX_NS:
            raise InvalidArgumentError(f"table {self.name!r}: injected CXL latency must be an integer number "
                                       f"of ns in [0, {lib.ET_CXL_DELAY_MAX_NS}], got {ns!r}")
        self._check(lib.et_table_set_cxl_delay(self._h, ns), None, "cxl delay")

    def take_dirty(self) -> np.ndarray:
        """The bitmap of rows written since the last call (uint64 words, row r = bit r % 64 of word
        r // 64), cleared in the same step."""
        out = np.empty_like(self._dirty)
        self._check(lib.et_table_take_dirty(self._h, _wptr("uint64_t *", out)), None, "dirty")
        return out

    def mark_dropped(self) -> None:
        lib.et_table_mark_dropped(self._h)

    def set_parts(self, nparts: int) -> None:
        """Gives the table nparts fabric parts (once); chunks are in part 0 until set_chunk_part."""
        self._check(lib.et_table_set_parts(self._h, nparts), None, "parts")
        entries = ffi.new("int64_t *")
        pointer = lib.et_table_chunk_parts(self._h, entries)
        self.chunk_parts = np.frombuffer(ffi.buffer(pointer, entries[0]), dtype=np.uint8)
        self.chunk_parts.flags.writeable = False  # set through set_chunk_part, which checks the part
        self.nparts = nparts

    def set_chunk_part(self, tier: int, chunk: int, part: int) -> None:
        self._check(lib.et_table_set_chunk_part(self._h, tier, chunk, part), None, "chunk part")

    def parts_of_locs(self, locs: np.ndarray) -> np.ndarray:
        """The fabric part of each placement entry (uint8)."""
        return self.chunk_parts[locs >> self.chunk_shift]

    def gather(self, ids: np.ndarray, out: np.ndarray, tier_rows: np.ndarray | None = None,
               part_rows: np.ndarray | None = None) -> None:
        """out = rows of ids; tier_rows (int64 [3], optional) receives the rows served per tier,
        part_rows (int64 [nparts], optional) per fabric part."""
        err = ffi.new("int64_t *")
        _sized(part_rows, self.nparts, "part_rows", np.int64)
        rc = lib.et_gather(self._h, _ptr("int64_t *", ids), ids.size, _wptr("float *", out),
                           _wptr_or_null("int64_t *", tier_rows), _wptr_or_null("int64_t *", part_rows), err)
        self._check(rc, ids, "ids", err[0])

    def pool(self, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, mode: int,
             out: np.ndarray, tier_rows: np.ndarray | None = None, part_rows: np.ndarray | None = None) -> None:
        _sized(part_rows, self.nparts, "part_rows", np.int64)
        err = ffi.new("int64_t *")
        rc = lib.et_pool(self._h, _ptr("int64_t *", ids), ids.size, _ptr("int32_t *", lengths), lengths.size,
                         _ptr("float *", weights), mode, _wptr("float *", out),
                         _wptr_or_null("int64_t *", tier_rows), _wptr_or_null("int64_t *", part_rows), err)
        self._check(rc, ids, "ids", err[0], lengths)

    def partition(self, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, out_ids: np.ndarray,
                  out_lengths: np.ndarray, out_weights: np.ndarray | None, part_rows: np.ndarray) -> None:
        """Orders ids by (fabric part, bag): see et_partition."""
        _sized(out_ids, ids.size, "out_ids", np.int64)
        _sized(out_lengths, self.nparts * lengths.size, "out_lengths", np.int32)
        _sized(part_rows, self.nparts, "part_rows", np.int64)
        if weights is not None:
            _sized(weights, ids.size, "weights", np.float32)
            _sized(out_weights, ids.size, "out_weights", np.float32)
        err = ffi.new("int64_t *")
        rc = lib.et_partition(self._h, _ptr("int64_t *", ids), ids.size, _ptr("int32_t *", lengths), lengths.size,
                              _ptr("float *", weights), _wptr("int64_t *", out_ids), _wptr("int32_t *", out_lengths),
                              _wptr_or_null("float *", out_weights), _wptr("int64_t *", part_rows), err)
        self._check(rc, ids, "ids", err[0], lengths)

    def write_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        err = ffi.new("int64_t *")
        rc = lib.et_write_rows(self._h, _ptr("int64_t *", ids), ids.size, _ptr("uint8_t *", rows), err)
        self._check(rc, ids, "ids", err[0])

    def write_slots(self, locs: np.ndarray, rows: np.ndarray) -> None:
        """Stores encoded rows in slots no row points at yet (the mover's copy step)."""
        err = ffi.new("int64_t *")
        rc = lib.et_write_slots(self._h, _ptr("uint32_t *", locs), locs.size, _ptr("uint8_t *", rows), err)
        self._check(rc, None, "slots", err[0])

    def publish(self, ids: np.ndarray, locs: np.ndarray) -> None:
        """Points ids at their new homes, atomically for lookups."""
        err = ffi.new("int64_t *")
        rc = lib.et_publish(self._h, _ptr("int64_t *", ids), _ptr("uint32_t *", locs), ids.size, err)
        self._check(rc, ids, "ids", err[0])

    def read_rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        err = ffi.new("int64_t *")
        rc = lib.et_read_rows(self._h, _ptr("int64_t *", ids), ids.size, _wptr("uint8_t *", out), err)
        self._check(rc, ids, "ids", err[0])

    def _check(self, rc: int, ids: np.ndarray | None, field: str, pos: int = 0,
               lengths: np.ndarray | None = None) -> None:
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
        if rc == lib.ET_E_DROPPED:
            raise NotFoundError(f"{where} was dropped")
        if rc == lib.ET_E_IO:
            raise storage_error(OSError(pos, os.strerror(pos)), "the SCM file", f"{where}: SCM I/O")
        if rc == lib.ET_E_LOCATION:
            raise EmbtierError(f"{where}: {field}[{pos}] has a home with no storage (placement map corrupt)")
        if rc == lib.ET_E_NOMEM:
            raise EmbtierError(f"{where}: out of memory in a native {field} call")
        raise InvalidArgumentError(f"{where}: native call rejected its arguments ({field}, code {rc})")


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
    return int(lib.et_mem_bind(ffi.cast("void *", address), nbytes, mask, maxnode))


def mem_unmap(address: int, nbytes: int) -> None:
    lib.et_mem_unmap(ffi.cast("void *", address), nbytes)


def huge_array(size: int, dtype: type) -> np.ndarray:
    """A zeroed array in its own mapping with transparent huge pages requested.

    For the per-row metadata the lookup kernels read at random: on 4 KiB pages
    every access to a large placement map is a TLB miss (numpy's allocator
    does not ask for huge pages).  The mapping is unmapped when the array dies.
    """
    nbytes = max(1, size * np.dtype(dtype).itemsize)
    address, _ = mem_map(nbytes, True)
    owner = ffi.gc(ffi.cast("void *", address), lambda p: lib.et_mem_unmap(p, nbytes))
    return np.frombuffer(ffi.buffer(owner, nbytes), dtype=dtype, count=size)


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
    rc = lib.et_quantize(_ptr("float *", rows), n, dim, bits, method, int(params_fp16),
                         _wptr("uint8_t *", codes), _wptr("float *", lo), _wptr("float *", scale), err)
    if rc == lib.ET_E_ARG and err[0] >= 0:
        row = err[0]
        if not np.isfinite(rows[row]).all():
            raise InvalidArgumentError(f"rows[{row}] has a non-finite value")
        raise InvalidArgumentError(f"rows[{row}]: quantization parameters overflow float16 "
                                   f"(largest magnitude {float(np.abs(rows[row]).max())})")
    _check_quant(rc, "quantize")
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
    rc = lib.et_dequantize(_ptr("uint8_t *", codes), _ptr("float *", lo), _ptr("float *", scale), n, dim,
                           bits, _wptr("float *", rows), err)
    if rc == lib.ET_E_ARG and err[0] >= 0:
        row = err[0]
        raise InvalidArgumentError(
            f"row {row}: lo = {lo[row]}, scale = {scale[row]} are not quantization parameters "
            f"(finite, scale >= 0, lo + {2**bits - 1} * scale within float32)")
    _check_quant(rc, "dequantize")
    return rows


def _check_quant(rc: int, call: str) -> None:
    if rc == lib.ET_E_NOMEM:
        raise EmbtierError(f"out of memory in native {call}")
    if rc != lib.ET_OK:
        raise InvalidArgumentError(f"native {call} rejected its arguments (code {rc})")
