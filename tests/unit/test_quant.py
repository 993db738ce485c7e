"""Checkpoint quantization kernels against a numpy reference: bit packing, codes, dequantized
values bit for bit, the per-value error bounds of min-max and adaptive ranges, float16
parameters (exact in half precision and covering the row), constant, zero, huge and tiny rows,
adaptive never worse than min-max, every instruction set and thread count alike, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
from embtierd import native
from embtierd.errors import InvalidArgumentError
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import AVAILABLE_ISAS

BITS = (2, 3, 4, 8)
DIMS = (1, 3, 7, 8, 33, 64)
FLOAT_MAX = float(np.finfo(np.float32).max)


# ---- numpy reference -------------------------------------------------------

def pack_reference(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [n, dim] -> rows of bytes: each code's low bits LSB first, one bit stream per row."""
    n, dim = q.shape
    stream = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits].reshape(n, dim * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_reference(codes: np.ndarray, dim: int, bits: int) -> np.ndarray:
    stream = np.unpackbits(codes, axis=-1, bitorder="little")[:, :dim * bits].reshape(len(codes), dim, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(axis=-1)


def dequantize_reference(q: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """lo + q * scale, computed in double and rounded once to float32 (as the kernel does)."""
    return (lo.astype(np.float64)[:, None] + q * scale.astype(np.float64)[:, None]).astype(np.float32)


def codes_reference(rows: np.ndarray, lo: np.ndarray, scale: np.ndarray,
                    bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(nearest codes of rows under lo and scale, whether each value is near a tie between two codes)."""
    safe = np.where(scale > 0, scale, 1).astype(np.float64)[:, None]
    t = np.clip((rows - lo.astype(np.float64)[:, None]) / safe, 0, 2**bits - 1)
    t[scale == 0] = 0
    return np.rint(t).astype(np.int64), np.abs(t - np.floor(t) - 0.5) < 1e-4


def half_below(x: np.ndarray) -> np.ndarray:
    """x (float64) rounded down to float16."""
    h = x.astype(np.float16)
    with np.errstate(over="ignore"):
        below = np.nextafter(h, np.float16(-np.inf))
    return np.where(h.astype(np.float64) > x, below, h).astype(np.float64)


def float_slack(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per row: what float rounding may add to the exact bounds (a few ulps of the row and of scale)."""
    return 2**-20 * np.abs(rows.astype(np.float64)).max(axis=1) + 1e-5 * scale.astype(np.float64) + 1e-44


def check_quantized(rows: np.ndarray, bits: int, adaptive: bool, fp16: bool) -> np.ndarray:
    """Quantizes rows, checks everything the contract says, returns the dequantized rows."""
    codes, lo, scale = native.quantize(rows, bits, adaptive, fp16)
    n, dim = rows.shape
    assert codes.shape == (n, native.quant_row_bytes(dim, bits)) and lo.shape == scale.shape == (n,)
    q = unpack_reference(codes, dim, bits)
    np.testing.assert_array_equal(pack_reference(q.astype(np.uint8), bits), codes)  # padding bits are zero
    out = native.dequantize(codes, lo, scale, dim, bits)
    np.testing.assert_array_equal(out, dequantize_reference(q, lo, scale))
    assert np.all(scale >= 0) and np.all(np.isfinite(lo)) and np.all(np.isfinite(scale))

    want, tie = codes_reference(rows, lo, scale, bits)
    assert np.all((q == want) | (tie & (np.abs(q - want) == 1)))

    rows64 = rows.astype(np.float64)
    mins, maxs = rows64.min(axis=1), rows64.max(axis=1)
    shrink = native.QUANT_ADAPTIVE_MAX_SHRINK * (maxs - mins) if adaptive else 0
    bound = scale.astype(np.float64) / 2 + shrink + float_slack(rows, scale)
    assert np.all(np.abs(out - rows64).max(axis=1) <= bound)
    if fp16:
        np.testing.assert_array_equal(lo.astype(np.float16).astype(np.float32), lo)
        np.testing.assert_array_equal(scale.astype(np.float16).astype(np.float32), scale)
    lowest = half_below(mins) if fp16 else mins  # min-max's lo: the row's min, rounded down
    top = lo.astype(np.float64) + (2**bits - 1) * scale.astype(np.float64)
    if not adaptive:  # the range stored covers the row, and no more than rounding needs
        np.testing.assert_array_equal(lo, lowest)
        assert np.all(top >= maxs - float_slack(rows, scale))
        grid = (2**-9, 2**-23) if fp16 else (2**-22, 1e-44)
        assert np.all(scale <= (maxs - lo) / (2**bits - 1) * (1 + grid[0]) + grid[1])
    else:  # inside min-max, shrunk by at most the limit
        assert np.all(lo >= lowest)
        assert np.all(lo - mins <= shrink + float_slack(rows, scale))
        assert np.all(maxs - top <= shrink + float_slack(rows, scale))
    return out


def mse(out: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return ((out.astype(np.float64) - rows) ** 2).mean(axis=1)


# ---- properties --------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", DIMS)
def test_gaussian_rows(bits, dim):
    rows = np.random.default_rng(dim * 10 + bits).standard_normal((300, dim), dtype=np.float32)
    for fp16 in (False, True):
        minmax = check_quantized(rows, bits, False, fp16)
        adaptive = check_quantized(rows, bits, True, fp16)
        assert np.all(mse(adaptive, rows) <= mse(minmax, rows) * (1 + 1e-5))


@pytest.mark.parametrize("bits", [2, 4])
def test_adaptive_lowers_the_error_of_gaussian_rows(bits):
    rows = np.random.default_rng(bits).standard_normal((500, 64), dtype=np.float32)
    for fp16 in (False, True):
        minmax = mse(check_quantized(rows, bits, False, fp16), rows).mean()
        adaptive = mse(check_quantized(rows, bits, True, fp16), rows).mean()
        assert adaptive < 0.9 * minmax


@st.composite
def row_batches(draw):
    n, dim = draw(st.integers(0, 12)), draw(st.sampled_from(DIMS))
    magnitude = draw(st.sampled_from([1e-30, 1e-3, 1.0, 300.0, 6e4]))
    values = draw(st.lists(st.floats(-1, 1, width=32), min_size=n * dim, max_size=n * dim))
    return (np.array(values, dtype=np.float32).reshape(n, dim) * np.float32(magnitude)).astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(rows=row_batches(), bits=st.sampled_from(BITS), adaptive=st.booleans(), fp16=st.booleans())
def test_matches_reference(rows, bits, adaptive, fp16):
    check_quantized(rows, bits, adaptive, fp16)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_constant_and_zero_rows(bits, fp16, adaptive):
    rows = np.array([[0.0] * 7, [-0.0] * 7, [0.5] * 7, [-3.0] * 7, [0.1] * 7, [1e-30] * 7], dtype=np.float32)
    codes, lo, scale = native.quantize(rows, bits, adaptive, fp16)
    out = native.dequantize(codes, lo, scale, 7, bits)
    exact = slice(0, 4)  # zero and half-exact constants: scale 0, codes 0, values back exactly
    np.testing.assert_array_equal(out[exact], rows[exact])
    np.testing.assert_array_equal(scale[exact], 0)
    np.testing.assert_array_equal(codes[exact], 0)
    if fp16:  # 0.1 and 1e-30 are no halves: lo below them, the smallest scale that reaches them
        levels = 2**bits - 1
        value = rows[4:, 0].astype(np.float64)
        assert np.all(lo[4:] < value) and np.all(lo[4:] + levels * scale[4:].astype(np.float64) >= value)
        smaller = np.nextafter(scale[4:].astype(np.float16), np.float16(0)).astype(np.float64)
        assert np.all(lo[4:] + levels * smaller < value)
    else:
        np.testing.assert_array_equal(out, rows)
        np.testing.assert_array_equal(scale, 0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_extreme_magnitudes(adaptive):
    tiny = np.float32(1e-45)  # the smallest subnormal
    rows = np.array([
        [-FLOAT_MAX, FLOAT_MAX, 0.0, 1.0, -1.0, 3e38, -3e38],
        [FLOAT_MAX, FLOAT_MAX * 0.999, FLOAT_MAX, FLOAT_MAX * 0.5, FLOAT_MAX, FLOAT_MAX, 0.0],
        [1e30, 1e30 * (1 + 2**-20), 1e30 * (1 - 2**-20), 1e30, 1e30, 1e30, 1e30],
        [tiny, 2 * tiny, 0.0, -tiny, 5 * tiny, tiny, 0.0],
        [1e-38, -2e-38, 3e-38, 0.0, 1e-39, 5e-39, -1e-38],
        [-1e-20, 1e20, 0.0, 1.0, -1.0, 3.0, 1e19],
    ], dtype=np.float32)
    for bits in BITS:
        out = check_quantized(rows, bits, adaptive, fp16=False)
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("bits", BITS)
def test_largest_values_for_float16_parameters(bits):
    rows = np.array([[-60000.0, 60000.0, 0.0], [-65504.0, 65504.0, 1.0], [59999.0, 60000.0, 60000.0]],
                    dtype=np.float32)
    for adaptive in (False, True):
        check_quantized(rows, bits, adaptive, fp16=True)


def test_every_instruction_set_and_thread_count_gives_the_same_bytes():
    rows = np.random.default_rng(5).standard_normal((5000, 37), dtype=np.float32)
    rows[::7] *= 1000
    best = native.isa()
    results = []
    try:
        for isa in AVAILABLE_ISAS:
            native.force_isa(isa)
            for threads in (1, 3):
                native.set_kernel_threads(threads)
                for adaptive in (False, True):
                    codes, lo, scale = native.quantize(rows, 3, adaptive, False)
                    results.append((isa, threads, adaptive, codes, lo, scale,
                                    native.dequantize(codes, lo, scale, 37, 3)))
    finally:
        native.force_isa(best)
        native.set_kernel_threads(1)
    for isa, threads, adaptive, *arrays in results:
        first = next(r for r in results if r[2] == adaptive)
        for got, want in zip(arrays, first[3:]):
            np.testing.assert_array_equal(got, want, err_msg=f"{isa}, {threads} threads, adaptive={adaptive}")


def test_row_bytes():
    cases = {(1, 2): 1, (1, 8): 1, (3, 3): 2, (7, 3): 3, (8, 3): 3, (33, 4): 17, (64, 2): 16, (5, 8): 5}
    assert {case: native.quant_row_bytes(*case) for case in cases} == cases


def test_no_rows():
    codes, lo, scale = native.quantize(np.zeros((0, 5), dtype=np.float32), 4, True, True)
    assert codes.shape == (0, 3) and lo.shape == scale.shape == (0,)
    assert native.dequantize(codes, lo, scale, 5, 4).shape == (0, 5)


# ---- errors ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value_names_its_row(bad):
    rows = np.ones((20, 9), dtype=np.float32)
    rows[12, 4] = bad
    rows[15, 0] = bad
    for adaptive in (False, True):
        with pytest.raises(InvalidArgumentError, match=r"rows\[12\] has a non-finite value"):
            native.quantize(rows, 4, adaptive, False)


def test_non_finite_value_names_the_first_row_across_threads():
    native.set_kernel_threads(2)  # two parts: rows [0, 3000) and [3000, 6000)
    try:
        for bad, first in [([4000, 2999], 2999), ([5999, 4000], 4000)]:
            rows = np.ones((6000, 4), dtype=np.float32)
            rows[bad, 1] = np.nan
            with pytest.raises(InvalidArgumentError, match=rf"rows\[{first}\] has a non-finite value"):
                native.quantize(rows, 2, True, False)
    finally:
        native.set_kernel_threads(1)


@pytest.mark.parametrize("adaptive", [False, True])
def test_float16_parameters_out_of_range(adaptive):
    rows = np.zeros((3, 4), dtype=np.float32)
    for value, bits in [(-70000.0, 8), (1e6, 2), (65504.0 * 3.5, 2)]:  # lo would be -inf; scale would be
        rows[1, 2] = value
        with pytest.raises(InvalidArgumentError, match=r"rows\[1\]: quantization parameters overflow float16"):
            native.quantize(rows, bits, adaptive, True)
    rows[1, 2] = 70000.0  # above the caller's limit, but lo and scale are still halves
    check_quantized(rows, 2, adaptive, True)


@pytest.mark.parametrize("bits", [0, 1, 5, 9, True, 4.0])
def test_bad_bits(bits):
    rows = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match=rf"quant_bits must be one of 2, 3, 4, 8; got {bits}"):
        native.quantize(rows, bits, False, False)
    params = np.zeros(2, np.float32)
    with pytest.raises(InvalidArgumentError, match="quant_bits must be one of"):
        native.dequantize(np.zeros((2, 2), np.uint8), params, params, 4, bits)


@pytest.mark.parametrize("rows, message", [
    (np.zeros(8, dtype=np.float32), r"rows must have 2 dimension\(s\)"),
    (np.zeros((2, 4), dtype=np.float64), "rows must have dtype float32, got float64"),
    (np.zeros((4, 6), dtype=np.float32)[:, ::2], "rows must be C-contiguous"),
    (np.zeros((3, 0), dtype=np.float32), "dim must be at least 1, got 0"),
    ([[1.0, 2.0]], "rows must be a numpy array, got list"),
])
def test_bad_rows(rows, message):
    with pytest.raises(InvalidArgumentError, match=message):
        native.quantize(rows, 4, True, False)


def test_bad_dequantize_arguments():
    codes, lo, scale = native.quantize(np.ones((3, 5), dtype=np.float32), 4, False, False)
    with pytest.raises(InvalidArgumentError,
                       match=r"codes must have 2 bytes a row for dim=3 and quant_bits=4, got shape \(3, 3\)"):
        native.dequantize(codes, lo, scale, 3, 4)
    with pytest.raises(InvalidArgumentError, match=r"one entry per row of codes \(3\), got 2 and 3"):
        native.dequantize(codes, lo[:2].copy(), scale, 5, 4)
    with pytest.raises(InvalidArgumentError, match="dim must be at least 1, got 0"):
        native.dequantize(codes, lo, scale, 0, 4)
    with pytest.raises(InvalidArgumentError, match="scale must have dtype float32, got float16"):
        native.dequantize(codes, lo, scale.astype(np.float16), 5, 4)


@pytest.mark.parametrize("lo, scale", [(np.nan, 1.0), (0.0, np.inf), (0.0, -1.0),
                                       (-FLOAT_MAX, FLOAT_MAX / 7)])  # the last: lo + 15 * scale overflows
def test_invalid_parameters_name_their_row(lo, scale):
    codes, los, scales = native.quantize(np.ones((4, 5), dtype=np.float32), 4, False, False)
    los[2], scales[2] = lo, scale
    with pytest.raises(InvalidArgumentError, match=r"row 2: lo = .*, scale = .* are not quantization param"):
        native.dequantize(codes, los, scales, 5, 4)
