"""codec.check_storable against a reference that scans the rows one by one:
the first value a table cannot store, named by position and value, for each
dtype; what it lets through encodes without a numpy warning and decodes
finite; the edges (65504 and the next float32 above it, int8 rows spanning
float32's whole range)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from embtierd import codec, native
from embtierd.errors import InvalidArgumentError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

DTYPES = ("float32", "float16", "int8")
FLOAT32_MAX = float(np.finfo(np.float32).max)
ABOVE_65504 = float(np.nextafter(np.float32(65504), np.float32(np.inf)))
# float32 subtraction rounds to nearest: a difference overflows to inf from FLT_MAX + half its last step on
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
EDGES = [np.nan, np.inf, -np.inf, 65504.0, -65504.0, ABOVE_65504, -70000.0, FLOAT32_MAX, -FLOAT32_MAX, 1.8e38,
         -1.8e38, 0.0, 1.5]


def first_bad_reference(values: np.ndarray, dtype: str) -> str | None:
    """The message for the first value dtype cannot store, scanning row by row in float64; None if all fit."""
    for r, row in enumerate(values.astype(np.float64)):
        for c, x in enumerate(row):
            if not np.isfinite(x):
                return f"values[{r}, {c}] = {values[r, c]!s} is not finite"
            if dtype == "float16" and abs(x) > 65504:
                return f"values[{r}, {c}] = {values[r, c]!s} does not fit float16 (largest 65504)"
        if dtype == "int8" and row.max() - row.min() >= FLOAT32_OVERFLOW:
            lo, hi = int(np.argmin(row)), int(np.argmax(row))
            return (f"values[{r}] ranges from {values[r, lo]!s} (values[{r}, {lo}]) to {values[r, hi]!s} "
                    f"(values[{r}, {hi}]): an int8 row's max - min must be finite in float32")
    return None


values_arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=7),
                           elements=st.one_of(st.floats(-4, 4, width=32), st.sampled_from(EDGES),
                                              st.floats(width=32)))


@settings(max_examples=300, deadline=None)
@given(values=values_arrays, dtype=st.sampled_from(DTYPES))
def test_the_first_value_a_table_cannot_store_is_named(values, dtype):
    expected = first_bad_reference(values, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning, whatever the values
        if expected is None:
            codec.check_storable(values, dtype)
            stored = codec.decode(codec.encode(values, dtype, native.row_stride(values.shape[1], dtype)), dtype,
                                  values.shape[1])
            assert np.isfinite(stored).all()
            return
        with pytest.raises(InvalidArgumentError) as err:
            codec.check_storable(values, dtype)
    assert str(err.value).startswith(expected), (str(err.value), expected)


@pytest.mark.parametrize("dtype, values, message", [
    ("float32", [[1, 2, 3], [4, np.inf, np.nan]], "values[1, 1] = inf is not finite"),
    ("float32", [[FLOAT32_MAX, -FLOAT32_MAX, 70000]], None),
    ("float16", [[65504, -65504, 0]], None),
    ("float16", [[65504, 0, -ABOVE_65504]], "values[0, 2] = -65504.004 does not fit float16 (largest 65504)"),
    ("float16", [[0, 0], [70000, np.nan]], "values[1, 0] = 70000.0 does not fit float16"),
    ("int8", [[FLOAT32_MAX, 0, 1], [-1.7e38, 1.7e38, 0]], None),  # ranges FLT_MAX and 3.4e38: finite
    ("int8", [[1, 2], [FLOAT32_MAX, -1]], None),
    ("int8", [[0, 1, 2], [-2e38, 0, 2e38]],
     "values[1] ranges from -2e+38 (values[1, 0]) to 2e+38 (values[1, 2]): an int8 row's max - min must be finite"),
    ("int8", [[1e38, -3e38, -np.inf]], "values[0, 2] = -inf is not finite"),  # a non-finite element first
    ("int8", [[np.nan, 0]], "values[0, 0] = nan is not finite"),
])
def test_edges(dtype, values, message):
    values = np.array(values, dtype=np.float32)
    if message is None:
        codec.check_storable(values, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stored = codec.decode(codec.encode(values, dtype, native.row_stride(values.shape[1], dtype)), dtype,
                                  values.shape[1])
        assert np.isfinite(stored).all()
    else:
        with pytest.raises(InvalidArgumentError) as err:
            codec.check_storable(values, dtype)
        assert str(err.value).startswith(message), str(err.value)


def test_the_field_is_named_and_empty_batches_pass():
    with pytest.raises(InvalidArgumentError, match=r"^rows\[0, 1\] = nan is not finite$"):
        codec.check_storable(np.array([[0, np.nan]], np.float32), "float32", field="rows")
    for dtype in DTYPES:
        codec.check_storable(np.zeros((0, 8), np.float32), dtype)
        codec.check_storable(np.zeros((3, 0), np.float32), dtype)


def test_rows_can_be_named_by_the_table_row_they_are_for():
    with pytest.raises(InvalidArgumentError, match=r"^sums of row 42, element 1 = 70000\.0 does not fit float16"):
        codec.check_storable(np.array([[1, 2], [1, 70000]], np.float32), "float16", "sums", np.array([7, 42]))
