"""Row encodings: float32 rows <-> the bytes a table stores.

float32 rows are stored as they are, float16 rows rounded to nearest
(numpy's conversion), int8 rows quantized row-wise: q = round((x - min) /
scale) with scale = (max - min) / 255, stored as uint8 with the float32
scale and bias (= min) at the end of the row, so value = q * scale + bias
and the reconstruction error of each element is at most scale / 2.
Vectorised over the whole batch; the kernels decode on the fly.
"""

from __future__ import annotations

import numpy as np


def _i8_offset(dim: int) -> int:
    return (dim + 3) & ~3


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
