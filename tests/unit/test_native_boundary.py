"""The C boundary checks itself: the placement map is C's and read-only in Python, every buffer
reaches C with its real size and a buffer too small is an error naming it, every placement entry
is checked before it is used; and a fuzz run of every entry point on an AddressSanitizer build of
the kernels (native_fuzz.py) ends without a sanitizer report and with every code as predicted."""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from embtierd import native
from embtierd.errors import EmbtierError, InvalidArgumentError

ROOT = Path(__file__).resolve().parents[2]
CHUNK_SHIFT = 4   # 16 slots a chunk
MAX_CHUNKS = 3    # 2 bits of chunk index: chunk 3 fits in an entry but is past max_chunks
ROWS = 40         # all in DRAM, row r in slot r
# CI's run: about 15 s under the sanitizer (plus about 20 s to build it); EMBTIER_FUZZ_SECONDS=n runs longer
FUZZ_ITERATIONS = 12000


@pytest.fixture
def table():
    """A table of ROWS float32 rows of dim 8 in three DRAM chunks, with two fabric parts."""
    t = native.NativeTable("b", ROWS, 8, "float32", CHUNK_SHIFT, MAX_CHUNKS)
    chunk_bytes = t.stride << CHUNK_SHIFT
    address, _ = native.mem_map(MAX_CHUNKS * chunk_bytes, False)
    for chunk in range(MAX_CHUNKS):
        t.set_chunk(native.TIER_DRAM, chunk, address + chunk * chunk_bytes, chunk_bytes)
    t.set_parts(2)
    ids = np.arange(ROWS, dtype=np.int64)
    t.publish(ids, ids.astype(np.uint32))
    yield t
    t.mark_dropped()
    native.mem_unmap(address, MAX_CHUNKS * chunk_bytes)


def entry(t: native.NativeTable, tier: int, chunk: int, slot: int) -> int:
    return (tier << t.tier_shift) | (chunk << CHUNK_SHIFT) | slot


def ids_of(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def read_only(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def test_placement_map_is_read_only_and_heat_writable(table):
    assert table.loc.tolist() == list(range(ROWS))
    with pytest.raises(ValueError, match="read-only"):
        table.loc[3] = 0
    with pytest.raises(ValueError):
        table.loc.flags.writeable = True
    with pytest.raises(ValueError, match="read-only"):
        table.chunk_parts[0] = 1
    table.heat[:] = 9
    np.right_shift(table.heat, 1, out=table.heat)  # the tiering policy ages the counters in place
    assert table.heat.tolist() == [4] * ROWS


def test_views_keep_the_table_alive():
    t = native.NativeTable("v", 1000, 4, "float16", 6, 8)
    loc, heat = t.loc, t.heat
    t.set_parts(3)
    parts = t.chunk_parts
    gone = weakref.ref(t)
    del t
    gc.collect()
    assert gone() is None
    heat[:] = 7  # the C table (and its mappings) outlive the Python object while a view remains
    assert loc.sum() == 0 and heat.sum() == 7000 and parts.size == 3 << 3


@pytest.mark.parametrize("field, call", [
    ("out", lambda t: t.gather(ids_of(1, 2, 3), np.empty((2, 8), np.float32))),
    ("tier_rows", lambda t: t.gather(ids_of(1), np.empty((1, 8), np.float32), np.zeros(2, np.int64))),
    ("part_rows", lambda t: t.gather(ids_of(1), np.empty((1, 8), np.float32), None, np.zeros(1, np.int64))),
    ("weights", lambda t: t.pool(ids_of(1, 2), np.array([2], np.int32), np.ones(3, np.float32), 0,
                                 np.empty((1, 8), np.float32))),
    ("out", lambda t: t.pool(ids_of(1, 2), np.array([1, 1], np.int32), None, 0, np.empty(15, np.float32))),
    ("out_ids", lambda t: t.partition(ids_of(1, 2), np.array([2], np.int32), None, np.empty(1, np.int64),
                                      np.empty(2, np.int32), None, np.empty(2, np.int64))),
    ("out_lengths", lambda t: t.partition(ids_of(1, 2), np.array([1, 1], np.int32), None, np.empty(2, np.int64),
                                          np.empty(3, np.int32), None, np.empty(2, np.int64))),
    ("out_weights", lambda t: t.partition(ids_of(1), np.array([1], np.int32), np.ones(1, np.float32),
                                          np.empty(1, np.int64), np.empty(2, np.int32), np.empty(0, np.float32),
                                          np.empty(2, np.int64))),
    ("part_rows", lambda t: t.partition(ids_of(1), np.array([1], np.int32), None, np.empty(1, np.int64),
                                        np.empty(2, np.int32), None, np.empty(1, np.int64))),
    ("rows", lambda t: t.write_rows(ids_of(1, 2), np.zeros((1, 32), np.uint8))),
    ("rows", lambda t: t.read_rows(ids_of(1, 2), np.zeros(63, np.uint8))),
    ("rows", lambda t: t.write_slots(np.array([50, 51], np.uint32), np.zeros((1, 32), np.uint8))),
    ("locs", lambda t: t.publish(ids_of(1, 2), np.array([5], np.uint32))),
])
def test_a_buffer_too_small_is_an_error_naming_it(table, field, call):
    before = table.loc.copy()
    with pytest.raises(InvalidArgumentError, match=rf"table 'b': {field} does not fit the call: \d+ x "):
        call(table)
    np.testing.assert_array_equal(table.loc, before)


@pytest.mark.parametrize("message, call", [
    ("out must have dtype float32, got float64", lambda t: t.gather(ids_of(1), np.empty((1, 8)))),
    ("out must be writable", lambda t: t.gather(ids_of(1), read_only(np.empty((1, 8), np.float32)))),
    ("ids must have dtype int64, got int32", lambda t: t.read_rows(np.zeros(1, np.int32), np.zeros(32, np.uint8))),
    ("locs must be C-contiguous", lambda t: t.publish(ids_of(1, 2), np.zeros(4, np.uint32)[::2])),
    ("weights must be a numpy array, got list", lambda t: t.pool(ids_of(1), np.array([1], np.int32), [1.0], 0,
                                                                  np.empty((1, 8), np.float32))),
])
def test_what_c_cannot_check_is_checked_before_the_call(table, message, call):
    with pytest.raises(InvalidArgumentError, match=message):
        call(table)


@pytest.mark.parametrize("tier, chunk, slot", [
    (3, 0, 0),                        # a tier that does not exist
    (native.TIER_SCM, MAX_CHUNKS, 0),  # an SCM chunk past max_chunks (et_publish once read past scm_off)
    (native.TIER_SCM, 0, 0),          # an SCM chunk without file space
    (native.TIER_CXL, 1, 2),          # a CXL chunk without memory
    (native.TIER_DRAM, MAX_CHUNKS, 0),  # a DRAM chunk past max_chunks
])
def test_an_invalid_entry_is_refused_where_it_is_used(table, tier, chunk, slot):
    bad = entry(table, tier, chunk, slot)
    pattern = rf"locs\[1\] = {bad:#x} \(tier {tier}, slot {(chunk << CHUNK_SHIFT) | slot}\) names no slot with storage"
    with pytest.raises(EmbtierError, match=pattern):
        table.publish(ids_of(4, 5), np.array([7, bad], np.uint32))
    with pytest.raises(EmbtierError, match=pattern):
        table.write_slots(np.array([7, bad], np.uint32), np.zeros((2, 32), np.uint8))
    assert table.loc[4] == 4
    table.publish(ids_of(0, 1), np.array([1, 0], np.uint32))  # two rows swap homes: lookups read the map
    from embtierd._native import ffi
    ffi.cast("uint32_t *", ffi.from_buffer(table.loc))[6] = bad  # memory corruption, forged
    ids, lengths = ids_of(1, 6, 2), np.array([3], np.int32)
    for call in (lambda: table.gather(ids, np.empty((3, 8), np.float32)),
                 lambda: table.pool(ids, lengths, None, 0, np.empty((1, 8), np.float32)),
                 lambda: table.partition(ids, lengths, None, np.empty(3, np.int64), np.empty(2, np.int32), None,
                                         np.empty(2, np.int64)),
                 lambda: table.read_rows(ids, np.empty((3, 32), np.uint8)),
                 lambda: table.write_rows(ids, np.zeros((3, 32), np.uint8))):
        with pytest.raises(EmbtierError, match=rf"ids\[1\] has a home with no storage \(id 6 at {bad:#x}"):
            call()
    with pytest.raises(EmbtierError, match=r"ids\[1\] = 6 maps to a row whose home has no storage"):
        table.gather(ids, np.empty((3, 8), np.float32), by_key=True)  # (the keys of a dense table are its rows)


def test_a_partial_chunk_holds_only_the_rows_its_memory_holds(table):
    """The C side takes a chunk's size: slots past the rows it holds are not storage (NativeTable.set_chunk
    gives whole chunks; the kernels take any size)."""
    from embtierd._native import ffi, lib
    memory = np.zeros(3 * table.stride + 5, np.uint8)  # three rows and a bit
    assert lib.et_table_set_chunk(table._h, native.TIER_CXL, 0, ffi.from_buffer(memory), memory.size) == lib.ET_OK
    assert lib.et_table_set_chunk(table._h, native.TIER_CXL, 1, ffi.from_buffer(memory), 7) == lib.ET_E_SIZE
    table.publish(ids_of(0), np.array([entry(table, native.TIER_CXL, 0, 2)], np.uint32))
    with pytest.raises(EmbtierError, match="names no slot with storage"):
        table.publish(ids_of(0), np.array([entry(table, native.TIER_CXL, 0, 3)], np.uint32))
    table.publish(ids_of(0), np.array([0], np.uint32))  # (before the memory goes)


def test_quantization_buffers_are_checked():
    from embtierd._native import ffi, lib
    rows = np.ones((4, 5), np.float32)
    codes, lo, scale = np.empty((4, 3), np.uint8), np.empty(4, np.float32), np.empty(3, np.float32)  # scale: 3 of 4
    err = ffi.new("int64_t *")
    rc = lib.et_quantize(ffi.from_buffer("float *", rows), rows.size, 4, 5, 4, lib.ET_QUANT_MINMAX, 0,
                         ffi.from_buffer("uint8_t *", codes), codes.size, ffi.from_buffer("float *", lo), lo.size,
                         ffi.from_buffer("float *", scale), scale.size, err)
    assert (rc, err[0]) == (lib.ET_E_SIZE, lib.ET_BUF_SCALE)
    out = np.empty((4, 4), np.float32)  # 16 floats for 4 rows of 5
    rc = lib.et_dequantize(ffi.from_buffer("uint8_t *", codes), codes.size, ffi.from_buffer("float *", lo), lo.size,
                           ffi.from_buffer("float *", lo), lo.size, 4, 5, 4, ffi.from_buffer("float *", out), out.size,
                           err)
    assert (rc, err[0]) == (lib.ET_E_SIZE, lib.ET_BUF_ROWS)


def asan_runtime() -> str | None:
    """The path of gcc's AddressSanitizer runtime, or None when gcc has none or it cannot start here."""
    try:
        path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    if not (os.path.isabs(path) and os.path.exists(path)):
        return None
    probe = subprocess.run([sys.executable, "-c", "pass"], env=asan_env(path), capture_output=True, check=False,
                           timeout=60)
    return path if probe.returncode == 0 else None  # (some kernels' ASLR settings stop older runtimes)


def asan_env(runtime: str) -> dict[str, str]:
    """The environment of a Python run on the sanitizer: every allocation redzoned (no pymalloc arenas),
    the first error fatal, no leak report (CPython leaves memory to the exit)."""
    return {**os.environ, "LD_PRELOAD": runtime, "PYTHONMALLOC": "malloc",
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"}


def test_fuzz_every_entry_point_under_address_sanitizer(tmp_path):
    runtime = asan_runtime()
    if runtime is None:
        pytest.skip("no AddressSanitizer runtime (gcc's libasan) that starts on this host")
    spec = importlib.util.spec_from_file_location("embtier_build_ffi", ROOT / "native" / "build_ffi.py")
    build_ffi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_ffi)
    build = tmp_path / "build"
    build.mkdir()
    build_ffi.builder("_embtier_asan", sanitize="address", absolute_paths=True, optimize="-O0").compile(
        tmpdir=str(build))
    work = tmp_path / "work"
    work.mkdir()
    seconds = os.environ.get("EMBTIER_FUZZ_SECONDS")
    length = ["--seconds", seconds, "--iterations", "0"] if seconds else ["--iterations", str(FUZZ_ITERATIONS)]
    harness = [sys.executable, str(Path(__file__).with_name("native_fuzz.py")), str(build), "_embtier_asan", str(work),
               "--seed", os.environ.get("EMBTIER_FUZZ_SEED", "1"), *length]
    proc = subprocess.run(harness, env=asan_env(runtime), capture_output=True, text=True, check=False,
                          timeout=600 + float(seconds or 0))
    report = f"exit {proc.returncode}\n{proc.stderr[-20000:]}\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0 and "ERROR: AddressSanitizer" not in proc.stderr, report


def test_a_chunk_cut_short_has_storage_for_its_rows_only(store_factory):
    """A tier's last chunk backed with fewer rows than a chunk (the tier ran out of room) tells the
    kernels so: an entry past its end is an error, never a row of whatever follows in the arena."""
    store = store_factory(dram="4K", cxl="0", scm="4M")
    store.create_table("p", 1000, 8)  # 128 rows in DRAM (4K / 32 bytes), the rest on SCM
    table = store._tables["p"]
    space = table.slots[native.TIER_DRAM]
    assert space.held == [128] and table.chunk_shift > 7  # one chunk of DRAM, cut short
    past_the_end = (native.TIER_DRAM << table.native.tier_shift) | 128
    with pytest.raises(EmbtierError, match=r"locs\[0\] = 0x80 \(tier 0, slot 128\) names no slot with storage"):
        table.native.publish(np.array([5], dtype=np.int64), np.array([past_the_end], dtype=np.uint32))


def test_a_table_placed_as_made_is_looked_up_without_its_map(table):
    """While every entry is its own id (as a table is made) lookups of a DRAM-only table go straight to
    row id's slot; a publish that moves a row makes them read the map again, and moving it back lets
    them skip it again: the results follow the published homes throughout."""
    rows = np.arange(ROWS * 8, dtype=np.float32).reshape(ROWS, 8)
    table.write_rows(np.arange(ROWS, dtype=np.int64), rows.view(np.uint8))
    ids, out = ids_of(3, 39, 0, 3), np.empty((4, 8), np.float32)
    assert table.displaced() == 0
    table.gather(ids, out)
    np.testing.assert_array_equal(out, rows[ids])
    spare = entry(table, native.TIER_DRAM, 2, 15)  # slot 47: no row's home
    moved = np.full(8, -1.0, np.float32)
    table.write_slots(np.array([spare], np.uint32), moved.view(np.uint8))
    table.publish(ids_of(3), np.array([spare], np.uint32))
    assert table.displaced() == 1
    table.gather(ids, out)
    np.testing.assert_array_equal(out, np.stack([moved, rows[39], rows[0], moved]))
    pooled = np.empty((1, 8), np.float32)
    table.pool(ids, np.array([4], np.int32), None, 0, pooled)
    np.testing.assert_array_equal(pooled[0], 2 * moved + rows[39] + rows[0])
    table.publish(ids_of(3, 3), np.array([spare, 3], np.uint32))  # (the last entry of an id wins)
    assert table.displaced() == 0
    table.gather(ids, out)
    np.testing.assert_array_equal(out, rows[ids])
