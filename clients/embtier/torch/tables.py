"""Moving trained embedding tables between PyTorch and the daemon: tensors [rows, dim] written into
dense tables in chunks (any float dtype, converted to float32 on the wire, stored as the table's
dtype), read back the same way, and the tables of a saved model file found by their keys."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import torch

from ..client import Client, EmbtierClientError

CHUNK_BYTES = 2 << 20    # float32 rows per WriteRows / Lookup call when streaming a table (2 MiB: 2-3x the
                         # rate of 16 MiB calls, whose large messages cost more to allocate than to send)
TABLE_KEY = re.compile(r"(?:^|\.)embedding_bags\.([^.]+)\.weight$")   # TorchRec's EmbeddingBagCollection
STORAGE_DTYPES = {"FP32": "float32", "BF16": "float32", "FP16": "float16", "INT8": "int8"}

Progress = Callable[[str, int, int], None]   # (table, rows done, rows in all)


class TableMismatch(ValueError):
    """A table of the daemon that the weights do not fit."""


def storage_dtype(data_type) -> str:
    """The daemon's dtype for a TorchRec DataType (bfloat16 rows are exact in float32)."""
    name = getattr(data_type, "name", str(data_type))
    if name not in STORAGE_DTYPES:
        raise ValueError(f"data_type {name} has no embtier storage; use one of {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def default_storage(weight: torch.Tensor) -> str:
    """The dtype a table for weight is created with: float16 for float16 weights, else float32."""
    return "float16" if weight.dtype == torch.float16 else "float32"


def chunk_rows(dim: int) -> int:
    return max(1, CHUNK_BYTES // (4 * dim))


def ensure_table(client: Client, name: str, num_rows: int, dim: int, dtype: str) -> bool:
    """Creates the dense table name [num_rows, dim] of dtype unless it exists; one that exists must
    have that shape and dense ids.  True if it was created."""
    try:
        info = client.describe(name)
    except EmbtierClientError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
        client.create_table(name, num_rows, dim, dtype=dtype)
        return True
    if (info.num_rows, info.dim, info.key_space) != (num_rows, dim, "dense"):
        raise TableMismatch(f"embtier table {name!r} is {info.num_rows} x {info.dim} with {info.key_space} ids; "
                         f"the weights are {num_rows} x {dim} (dense ids): drop it or load another name")
    return False


def write_table(client: Client, name: str, weight: torch.Tensor, progress: Progress | None = None) -> None:
    """weight [rows, dim] into table name's rows 0..rows-1, CHUNK_BYTES at a time."""
    rows, dim = weight.shape
    step = chunk_rows(dim)
    for first in range(0, rows, step):
        chunk = weight[first:first + step].detach().to("cpu", torch.float32).contiguous().numpy()
        client.write_rows(name, np.arange(first, first + chunk.shape[0]), chunk)
        if progress is not None:
            progress(name, first + chunk.shape[0], rows)


def read_table(client: Client, name: str) -> torch.Tensor:
    """A dense table's rows as a float32 tensor [rows, dim], read CHUNK_BYTES at a time."""
    info = client.describe(name)
    if info.key_space != "dense":
        raise ValueError(f"embtier table {name!r} has {info.key_space} ids: its rows cannot be read by row number")
    out = torch.empty(info.num_rows, info.dim, dtype=torch.float32)
    rows = out.numpy()
    step = chunk_rows(info.dim)
    for first in range(0, info.num_rows, step):
        stop = min(first + step, info.num_rows)
        rows[first:stop] = client.lookup(name, np.arange(first, stop))
    return out


def flatten(obj, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of nested mappings: a state_dict, or a checkpoint that holds one."""
    for key, value in obj.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def tables_in_file(path: str | Path, chosen: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """{table: weight} of a saved state_dict (torch.save(model.state_dict(), path); memory-mapped,
    read as it is streamed): every embedding_bags.NAME.weight, or with chosen only those keys, as
    {key: table}."""
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: holds more than tensors (a pickled module?), which torch.load reads only by "
                         "running its code; save the weights with torch.save(model.state_dict(), path)") from None
    except RuntimeError as e:  # not a zip archive torch.save wrote
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(saved, Mapping):
        raise TypeError(f"{path}: holds a {type(saved).__name__}, not a state_dict; save the model with "
                         "torch.save(model.state_dict(), path)")
    tensors = {key: value for key, value in flatten(saved) if isinstance(value, torch.Tensor) and value.dim() == 2}
    if chosen:
        unknown = [key for key in chosen if key not in tensors]
        if unknown:
            raise ValueError(f"{path}: no 2-D tensor {', '.join(map(repr, unknown))}; its 2-D tensors: "
                             f"{', '.join(tensors) or 'none'}")
        return {table: tensors[key] for key, table in chosen.items()}
    found = {match.group(1): value for key, value in tensors.items() if (match := TABLE_KEY.search(key))}
    if not found:
        raise ValueError(f"{path}: no embedding_bags.NAME.weight tensor (TorchRec's EmbeddingBagCollection); name "
                         f"the tensors to load with KEY=TABLE; its 2-D tensors: {', '.join(tensors) or 'none'}")
    return found
