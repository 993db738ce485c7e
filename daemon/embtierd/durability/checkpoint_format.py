"""The checkpoint format on disk: one directory per checkpoint, written
whole or not at all.

    <root>/ckpt-<id:08d>/manifest.json     format version, id, kind (the wire enum's name:
                                           FULL, INCREMENTAL, DIFFERENTIAL), parent, base,
                                           LSN, quantization, one entry per table
    <root>/ckpt-<id:08d>/table-<i:04d>.dat that table's rows in this checkpoint

A table entry holds the table's spec (shape, dtype, tiering settings),
whether the file covers every row ("whole") or only some (then an ids
section lists them, ascending), and the file's SHA-256, size and sections
as [offset, length] in bytes:

    ids     uint32 (uint64 for tables of more than 2^32 rows), little-endian
    rows    exact: the rows exactly as the table stores them (bit for bit)
    codes   quantized: each row's values packed at quant_bits per value
    lo      quantized: per row, the low end of its range (float16 when every
            value of the table fits, else float32)
    scale   quantized: per row, the step; value = lo + code * scale
    heat    the table's access counters (uint8 per row, zlib), so that a
            restored daemon puts the hot rows back in DRAM
    keys    a managed table's: the id of each row the entry holds (int64,
            aligned with its rows; meaningful for rows below the entry's
            "live", the rows that had an id)
    mapping_ids, mapping_rows
            a mapped table's mapping, in every entry of the table (it never
            changes: the newest entry's is the table's): its "mapped"
            listed ids (int64) and the row of each (uint32)

A checkpoint is written into ckpt-<id>.tmp (each file fsynced), the
manifest last, then the directory is fsynced, renamed to its final name
and the parent directory fsynced: a crash leaves either the whole
checkpoint or a .tmp directory that the next start removes.  Directories
are made 0700 and files 0600: a checkpoint holds every row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from embtier.v1 import embtier_pb2 as pb
from embtier.wire import CHECKPOINT_KINDS, name_of

from embtierd import codec, native
from embtierd.durability.wal import fsync_directory
from embtierd.errors import CorruptCheckpointError
from embtierd.keys.space import rows_inside

FORMAT_VERSION = 2
FP16_LIMIT = 60000.0  # largest magnitude whose range parameters are stored as float16
_PIECE = 16 << 20


@dataclass
class TableRows:
    """One table's share of a checkpoint, as taken from the store."""

    spec: dict
    whole: bool             # every row, in id order (ids is then arange(num_rows))
    ids: np.ndarray         # int64, ascending
    encoded: np.ndarray     # [len(ids), stride] uint8, the table's storage encoding
    heat: np.ndarray        # uint8 [num_rows]
    live: int = 0                     # a managed table: its rows [0, live) have an id
    keys: np.ndarray | None = None    # a managed table: the id of each row of ids (those below live)
    mapping: tuple[np.ndarray, np.ndarray] | None = None  # a mapped table: (listed ids, their rows)


def directory(root: Path, checkpoint_id: int) -> Path:
    return root / f"ckpt-{checkpoint_id:08d}"


def list_ids(root: Path) -> list[int]:
    """Ids of the published checkpoints under root, ascending."""
    return sorted(int(p.name[5:]) for p in root.glob("ckpt-*") if p.name[5:].isdigit() and p.is_dir())


def remove_unfinished(root: Path) -> list[Path]:
    gone = list(root.glob("ckpt-*.tmp"))
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def remove(root: Path, checkpoint_id: int) -> None:
    shutil.rmtree(directory(root, checkpoint_id), ignore_errors=True)


class Writer:
    """Writes one checkpoint: add() each table, then publish() the manifest."""

    def __init__(self, root: Path, checkpoint_id: int, quant_bits: int, quantizer: str):
        self.root, self.id = root, checkpoint_id
        self.quant_bits, self.quantizer = quant_bits, quantizer
        self.final = directory(root, checkpoint_id)
        self.tmp = root / f"ckpt-{checkpoint_id:08d}.tmp"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(mode=0o700)
        self.entries: list[dict] = []
        self.bytes_written = 0
        self.rows_written = 0

    def add(self, table: TableRows) -> None:
        spec = table.spec
        sections: list[tuple[str, np.ndarray | bytes]] = []
        entry = {**spec, "whole": table.whole, "rows": int(table.ids.size)}
        if not table.whole:
            id_dtype = "<u4" if rows_inside(spec) <= 1 << 32 else "<u8"
            sections.append(("ids", table.ids.astype(id_dtype)))
            entry["id_dtype"] = id_dtype
        if table.keys is not None:
            sections.append(("keys", table.keys.astype("<i8")))
            entry["live"] = table.live
        if table.mapping is not None:
            ids, rows = table.mapping
            sections += [("mapping_ids", ids.astype("<i8")), ("mapping_rows", rows.astype("<u4"))]
            entry["mapped"] = int(ids.size)
        if self.quant_bits == 0:
            sections.append(("rows", table.encoded))
        else:
            values = codec.decode(table.encoded, spec["dtype"], spec["dim"])
            values = np.ascontiguousarray(values, dtype=np.float32)
            fp16 = bool(values.size == 0 or float(np.abs(values).max()) <= FP16_LIMIT)
            codes, lo, scale = native.quantize(values, self.quant_bits, self.quantizer == "adaptive", fp16)
            param_dtype = "<f2" if fp16 else "<f4"
            sections += [("codes", codes), ("lo", lo.astype(param_dtype)), ("scale", scale.astype(param_dtype))]
            entry["param_dtype"] = param_dtype
        sections.append(("heat", zlib.compress(np.ascontiguousarray(table.heat).tobytes(), 1)))
        file = f"table-{len(self.entries):04d}.dat"
        entry["file"] = file
        entry["sections"], entry["sha256"], entry["size"] = _write_sections(self.tmp / file, sections)
        self.entries.append(entry)
        self.bytes_written += entry["size"]
        self.rows_written += int(table.ids.size)

    def publish(self, head: dict) -> dict:
        """Writes the manifest (head + format version, quantization and table entries) and
        publishes the directory; returns the manifest."""
        manifest = {"format_version": FORMAT_VERSION, "id": self.id, "quant_bits": self.quant_bits,
                    "quantizer": self.quantizer if self.quant_bits else "exact", **head,
                    "kind": pb.CheckpointKind.Name(CHECKPOINT_KINDS[head["kind"]]),
                    "rows_written": self.rows_written, "tables": self.entries}
        _write_sections(self.tmp / "manifest.json", [("manifest", json.dumps(manifest, indent=1).encode())])
        fsync_directory(self.tmp)
        os.rename(self.tmp, self.final)
        fsync_directory(self.root)
        return {**manifest, "kind": head["kind"]}

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write_sections(path: Path, sections) -> tuple[dict, str, int]:
    """Writes the sections back to back and fsyncs; returns ({name: [offset, length]}, SHA-256, size)."""
    digest = hashlib.sha256()
    layout, offset = {}, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for name, data in sections:
            view = memoryview(data if isinstance(data, bytes) else np.ascontiguousarray(data).reshape(-1).view(np.uint8))
            digest.update(view)
            layout[name] = [offset, len(view)]
            offset += len(view)
            while view:
                view = view[os.write(fd, view[:_PIECE]):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return layout, digest.hexdigest(), offset


def read_manifest(root: Path, checkpoint_id: int) -> dict:
    path = directory(root, checkpoint_id)
    try:
        manifest = json.loads((path / "manifest.json").read_bytes())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint {checkpoint_id} ({path}): unreadable manifest: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"checkpoint {checkpoint_id} ({path}): format version "
                                     f"{manifest.get('format_version')!r}, this daemon reads {FORMAT_VERSION}")
    try:
        manifest["kind"] = name_of(CHECKPOINT_KINDS, pb.CheckpointKind.Value(manifest["kind"]))
    except (KeyError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint {checkpoint_id} ({path}): no kind {manifest.get('kind')!r}") from e
    return manifest


def size_bytes(root: Path, manifest: dict) -> int:
    """Bytes the checkpoint takes on disk: its data files and manifest."""
    path = directory(root, manifest["id"]) / "manifest.json"
    return sum(entry["size"] for entry in manifest["tables"]) + (path.stat().st_size if path.exists() else 0)


def verify(root: Path, manifest: dict) -> None:
    """Checks every data file's size and SHA-256 (read in pieces); CorruptCheckpointError if one fails."""
    for entry in manifest["tables"]:
        verify_entry(root, manifest, entry)


def verify_entry(root: Path, manifest: dict, entry: dict) -> None:
    """Checks one table entry's data file; CorruptCheckpointError naming the file and the table if it fails."""
    path = directory(root, manifest["id"]) / entry["file"]
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while piece := f.read(_PIECE):
                digest.update(piece)
                size += len(piece)
    except OSError as e:
        raise CorruptCheckpointError(f"checkpoint {manifest['id']}: {entry['file']} (table {entry['name']!r}) "
                                     f"is unreadable: {e.strerror or e} ({path})") from e
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise CorruptCheckpointError(f"checkpoint {manifest['id']}: {entry['file']} (table {entry['name']!r}) "
                                     f"fails its checksum ({path})")


def stamp(root: Path, manifest: dict) -> tuple:
    """What changes when any file of the checkpoint is written, replaced or removed: per file its
    size, modification and change times (None for a file that is gone)."""
    path = directory(root, manifest["id"])
    out = []
    for name in ["manifest.json", *(entry["file"] for entry in manifest["tables"])]:
        try:
            st = os.stat(path / name)
            out.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            out.append((name, None))
    return tuple(out)


def read_table(root: Path, manifest: dict, entry: dict, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, rows [len(ids), stride] in the table's storage encoding) of one table entry;
    quantized rows are decoded to float32 and encoded for the table's dtype."""
    data = np.fromfile(directory(root, manifest["id"]) / entry["file"], dtype=np.uint8)
    if data.size != entry["size"]:
        raise CorruptCheckpointError(f"checkpoint {manifest['id']}: {entry['file']} changed size since it was "
                                     f"verified")

    def section(name: str, dtype="u1") -> np.ndarray:
        offset, length = entry["sections"][name]
        return data[offset:offset + length].view(dtype)

    n, dim = entry["rows"], entry["dim"]
    ids = (np.arange(rows_inside(entry), dtype=np.int64) if entry["whole"]
           else section("ids", entry["id_dtype"]).astype(np.int64))
    if manifest["quant_bits"] == 0:
        rows = section("rows").reshape(n, stride)
    else:
        bits = manifest["quant_bits"]
        codes = section("codes").reshape(n, native.quant_row_bytes(dim, bits))
        lo = section("lo", entry["param_dtype"]).astype(np.float32)
        scale = section("scale", entry["param_dtype"]).astype(np.float32)
        values = native.dequantize(codes, lo, scale, dim, bits)
        rows = codec.encode(values, entry["dtype"], stride)
    return ids, rows


def _read_section(root: Path, manifest: dict, entry: dict, name: str) -> bytes:
    offset, length = entry["sections"][name]
    with open(directory(root, manifest["id"]) / entry["file"], "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise CorruptCheckpointError(f"checkpoint {manifest['id']}: {entry['file']} is shorter than its manifest says")
    return data


def read_ids(root: Path, manifest: dict, entry: dict) -> np.ndarray:
    """The ids a table entry holds (int64, ascending)."""
    if entry["whole"]:
        return np.arange(rows_inside(entry), dtype=np.int64)
    return np.frombuffer(_read_section(root, manifest, entry, "ids"), dtype=entry["id_dtype"]).astype(np.int64)


def read_keys(root: Path, manifest: dict, entry: dict) -> tuple[int, np.ndarray]:
    """(live, the id of each row the entry holds: meaningful for rows below live) of a managed table."""
    keys = np.frombuffer(_read_section(root, manifest, entry, "keys"), dtype="<i8").astype(np.int64)
    return int(entry["live"]), keys


def read_mapping(root: Path, manifest: dict, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(listed ids, their rows), int64 each, of a mapped table's entry."""
    ids = np.frombuffer(_read_section(root, manifest, entry, "mapping_ids"), dtype="<i8").astype(np.int64)
    rows = np.frombuffer(_read_section(root, manifest, entry, "mapping_rows"), dtype="<u4").astype(np.int64)
    if ids.size != entry["mapped"] or rows.size != ids.size:
        raise CorruptCheckpointError(f"checkpoint {manifest['id']}: {entry['file']}'s mapping holds {ids.size} ids "
                                     f"and {rows.size} rows; its manifest says {entry['mapped']}")
    return ids, rows


def read_heat(root: Path, manifest: dict, entry: dict) -> np.ndarray:
    """The table's access counters saved with the entry (uint8 [num_rows])."""
    return np.frombuffer(zlib.decompress(_read_section(root, manifest, entry, "heat")), dtype=np.uint8)
