"""Row encodings: float32 rows <-> the bytes a table stores.

float32 rows are stored as they are, float16 rows rounded to nearest
(numpy's conversion), int8 rows quantized row-wise: q = round((x - min) /
scale) with scale = (max - min) / 255, stored as uint8 with the float32
scale and bias (= min) at the end of the row, so value = q * scale + bias
and the reconstruction error of each element is at most scale / 2.
Vectorised over the whole batch; the kernels decode on the fly.

What a table can store (check_storable, before anything is written): finite
values in every dtype; |x| <= 65504 (float16's largest) in float16; in int8,
rows whose range max - min is finite in float32 (the scale is kept in
float32, so a row spanning more than float32's largest value cannot be
quantized; any finite row that spans less can, however coarsely).
"""

from __future__ import annotations

import numpy as np

from embtierd.errors import InvalidArgumentError

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def _i8_offset(dim: int) -> int:
    return (dim + 3) & ~3


def check_storable(values: np.ndarray, dtype: str, field: str = "values", row_ids: np.ndarray | None = None) -> None:
    """InvalidArgumentError naming the first element of values ([n, dim] float32, row-major
    order) that a table of dtype cannot store: NaN or +-inf in any table, |x| > 65504 in float16;
    in int8, the first row whose range max - min is not finite in float32 (naming its first
    non-finite element, or its min and max).  An element is named field[r, c], or, given row_ids
    (the table row each of values' rows is for), "field of row <id>, element c".  No numpy
    warning escapes."""
    if not values.size:
        return

    def at(r: int, c: int | None = None) -> str:
        if row_ids is None:
            return f"{field}[{r}]" if c is None else f"{field}[{r}, {c}]"
        return f"{field} of row {int(row_ids[r])}" + ("" if c is None else f", element {c}")

    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf, a range past float32's largest
        if dtype != "int8":
            _reject_first(values, ~(np.abs(values) <= FLOAT16_MAX) if dtype == "float16" else ~np.isfinite(values),
                          at)
            return
        bad_rows = ~np.isfinite(values.max(axis=1) - values.min(axis=1))  # a NaN or inf in a row makes it so too
    if bad_rows.any():
        r = int(bad_rows.argmax())
        row = values[r : r + 1]
        _reject_first(row, ~np.isfinite(row), lambda _, c: at(r, c))
        lo, hi = int(row.argmin()), int(row.argmax())
        raise InvalidArgumentError(
            f"{at(r)} ranges from {row[0, lo]!s} ({at(r, lo)}) to {row[0, hi]!s} ({at(r, hi)}): "
            "an int8 row's max - min must be finite in float32 (its quantization scale is float32)")


def _reject_first(values: np.ndarray, bad: np.ndarray, at) -> None:
    """InvalidArgumentError for the first True of bad (a mask of values) if it has one, its place
    named by at(row, column)."""
    if bad.any():
        r, c = divmod(int(bad.argmax()), bad.shape[1])
        x = values[r, c]
        problem = "is not finite" if not np.isfinite(x) else f"does not fit float16 (largest {FLOAT16_MAX:g})"
        raise InvalidArgumentError(f"{at(r, c)} = {x!s} {problem}")


def encode(values: np.ndarray, dtype: str, stride: int) -> np.ndarray:
    """[n, dim] float32 -> [n, stride] uint8 in the table's storage encoding."""
    n, dim = values.shape
    if dtype == "float32":
        return values.view(np.uint8).reshape(n, stride)
    out = np.zeros((n, stride), dtype=np.uint8)
    if dtype == "float16":
        out[:, : 2 * dim] = values.astype("<f2").view(np.uint8).reshape(n, 2 * dim)
        return out
    lo = values.min(axis=1) if dim else np.zeros(n, np.float32)
    hi = values.max(axis=1) if dim else np.zeros(n, np.float32)
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    divisor = np.where(scale > 0, scale, np.float32(1))  # a constant row stores q = 0, scale 0, bias = value
    q = np.rint((values - lo[:, None]) / divisor[:, None])
    out[:, :dim] = np.clip(q, 0, 255).astype(np.uint8)
    off = _i8_offset(dim)
    out[:, off : off + 4] = scale.astype("<f4").view(np.uint8).reshape(n, 4)
    out[:, off + 4 : off + 8] = lo.astype("<f4").view(np.uint8).reshape(n, 4)
    return out


def decode(rows: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    """[n, stride] uint8 -> [n, dim] float32 (the value the kernels compute with)."""
    n = rows.shape[0]
    if dtype == "float32":
        return np.ascontiguousarray(rows[:, : 4 * dim]).view("<f4").reshape(n, dim)
    if dtype == "float16":
        return np.ascontiguousarray(rows[:, : 2 * dim]).view("<f2").reshape(n, dim).astype(np.float32)
    off = _i8_offset(dim)
    scale = np.ascontiguousarray(rows[:, off : off + 4]).view("<f4").reshape(n, 1)
    bias = np.ascontiguousarray(rows[:, off + 4 : off + 8]).view("<f4").reshape(n, 1)
    return rows[:, :dim].astype(np.float32) * scale + bias


def int8_scales(rows: np.ndarray, dim: int) -> np.ndarray:
    """Per-row quantization step of int8-encoded rows (the error bound is half of it)."""
    off = _i8_offset(dim)
    return np.ascontiguousarray(rows[:, off : off + 4]).view("<f4").reshape(-1)
