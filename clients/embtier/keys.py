"""The hashing trick of HASHED tables, exactly as the daemon computes it, so that a trainer
can map raw feature ids to the rows it trains offline.

For an int64 id, a table's seed and its num_rows:

    key = fmix64((id as unsigned 64-bit + seed * 0x9E3779B97F4A7C15) mod 2^64)
    row = (key * num_rows) >> 64          (the top 64 bits of the 128-bit product)

fmix64 is MurmurHash3's 64-bit finalizer (x ^= x >> 33; x *= 0xff51afd7ed558ccd;
x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53; x ^= x >> 33, all mod 2^64): every bit of the id
reaches every bit of the key, so ids that differ in a few low bits (consecutive user ids)
or only in high bits (hash-like ids) spread evenly.  The multiply-shift maps the key onto
[0, num_rows) without a division (a division per lookup would cost the kernels more than
the rest of the hash), uniformly to within one part in 2^64 / num_rows.
"""

from __future__ import annotations

import numpy as np

SEED_MIX = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53
_MASK32 = np.uint64(0xFFFFFFFF)
_S32, _S33 = np.uint64(32), np.uint64(33)


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer of a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> _S33)
    x = x * np.uint64(MIX1)
    x = x ^ (x >> _S33)
    x = x * np.uint64(MIX2)
    return x ^ (x >> _S33)


def hashed_rows(ids, num_rows: int, seed: int = 0) -> np.ndarray:
    """The row of each id (int64 array) in a HASHED table of num_rows rows (1 to 2^32) and seed."""
    if not 1 <= num_rows <= 1 << 32:
        raise ValueError(f"num_rows must be in [1, 2^32], got {num_rows}")
    ids = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        key = fmix64(ids + np.uint64((seed * SEED_MIX) & 0xFFFFFFFFFFFFFFFF))
        n = np.uint64(num_rows)
        # (key * n) >> 64 in 64-bit pieces: key = hi * 2^32 + lo, both products below 2^64
        top = ((key >> _S32) * n + (((key & _MASK32) * n) >> _S32)) >> _S32
    return top.astype(np.int64)


def mapped_rows(ids, listed_ids, listed_rows, num_rows: int, hash_from: int = 0, seed: int = 0) -> np.ndarray:
    """The row of each id in a MAPPED table: a listed id's row is the one its mapping gives it
    (listed_ids -> listed_rows, the ids distinct); any other id hashes into the rows from hash_from
    on: hash_from + hashed_rows(id, num_rows - hash_from, seed).  (0 <= hash_from < num_rows.)"""
    if not 0 <= hash_from < num_rows:
        raise ValueError(f"hash_from must be in [0, num_rows = {num_rows}), got {hash_from}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    listed_ids = np.asarray(listed_ids, dtype=np.int64)
    listed_rows = np.asarray(listed_rows, dtype=np.int64)
    rows = hash_from + hashed_rows(ids, num_rows - hash_from, seed)
    if listed_ids.size:
        order = np.argsort(listed_ids, kind="stable")
        keys = listed_ids[order]
        at = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        hit = keys[at] == ids
        rows[hit] = listed_rows[order[at[hit]]]
    return rows
