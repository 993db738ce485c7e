"""Human sizes, read the same way by the command line and the daemon's configuration:
a number of bytes (4096) or a number with a binary unit ("512M", "4G", "1.5T"; "MiB",
"MB" and lower case read the same)."""

from __future__ import annotations

import re

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """Bytes for a size; ValueError naming the value when it is not one (or is negative), TypeError for
    what is neither a number nor a string."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        size = value
    elif m := _SIZE_RE.match(value):
        size = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    else:
        raise ValueError(f"cannot read {value!r} as a size (examples: 4096, \"512M\", \"4G\")")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


def row_stride(dim: int, dtype: str) -> int:
    """Bytes one stored row of a table takes on a daemon (what a client planning capacity needs): the
    kernels' layout (native/src/table.c et_row_stride, held to it by tests/unit/test_wire.py): float32
    4 bytes a value; float16 2, padded to 4; int8 1, padded to 4, plus its scale and bias (8)."""
    if dtype == "float32":
        return dim * 4
    if dtype == "float16":
        return (dim * 2 + 3) & ~3
    if dtype == "int8":
        return ((dim + 3) & ~3) + 8
    raise ValueError(f"dtype must be float32, float16 or int8; got {dtype!r}")
