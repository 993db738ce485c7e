"""Id -> row mappings of MAPPED tables ("learned hash functions"): built offline from a recorded
trace, measured by how their rows are shared, kept in the file the daemon reads.

A MAPPED table lists some ids with the row each one reads and hashes every other id into the rows
from hash_from on; embtier.keys.mapped_rows is the one definition of that rule, and Mapping.rows_of
applies it.  The hashing trick makes ids collide at random; a mapping can instead give the most
frequent ids rows of their own and make the ids that are used alike share rows (Meta's "Learned
Hash Functions").

Kinds, each built by build_<kind>(trace, num_rows, ..., progress=None) -> Mapping:

  hash       the hashing trick: nothing listed, every id hashed over all rows (the baseline)
  frequency  the F = round(frequent_share x num_rows) most frequent ids of the trace get rows
             0..F-1 of their own, most frequent first (equal counts: smaller id first); every other
             id, seen or not, hashes into [F, num_rows) (hash_from = F)
  learned    the frequent ids as frequency does; every other id seen at least min_accesses times
             is embedded (from its co-access in the trace's bags, or by the rows of a previous model)
             and the embedded ids are clustered into the rows [F, num_rows), so that ids used alike
             share a row; ids seen fewer times and unseen ids hash into [F, num_rows)

How to use:

  embtier record T --ids 50000000 -o trace.npy     (trace.npy, trace.json and trace.bags.npy)
  embtier mapping build --trace trace.npy --kind learned --rows 1000000 -o mapping.npz
  embtier mapping stats --trace trace.npy --mapping mapping.npz [--groups groups.npz]
  embtier create T2 --rows 1000000 --dim 64 --key-space mapped --mapping mapping.npz
  embtier mapping export T2 -o mapping.npz          (the mapping a table holds)

or in Python: load_trace, build_learned (or BUILDERS[kind]), stats and format_stats, Mapping.save.

The mapping file is one .npz (numpy.savez, no pickles), the same for `embtier mapping build`, the
daemon's `--key-space mapped --mapping FILE` and `embtier mapping export`:

  ids        int64 [n]     the listed ids, distinct
  rows       int64 [n]     the row of each, in [0, num_rows)
  num_rows   int64 scalar  rows of the table (1 to 2^32)
  hash_from  int64 scalar  the first row of the hashed range, in [0, num_rows)
  seed       uint64 scalar the hash's seed
  kind       str scalar    how it was made: hash, frequency, learned, exported, ...

The groups file of `embtier mapping stats --groups FILE` is an .npz with integer arrays ids and
groups (the group, >= 0, of each id): stats then says how often colliding ids are of one group.

A trace is the ids of a table's lookups in access order (FILE.npy, any integer dtype) and, when the
recording has them, the ids' bags (FILE.bags.npy: int32 lengths, one per bag, in order, summing to
the ids' count); co-access is counted within bags.

Build time (tests/bench/bench_mapping_build.py, on 2 cores shared with other work): a Zipf trace of
4.6 accesses per distinct id in bags of up to 20, learned with the defaults (8 coordinates, 6
passes), 100K or 1M rows: 3.7 s for 1M distinct ids (4.6M accesses), 116 s for 10M (46M accesses:
10 s sorting the trace, 84 s embedding, 20 s clustering; 2.4 GB resident at the peak); frequency
0.12 s and 2.8 s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Mapping as MappingType
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from embtier.keys import mapped_rows

Progress = Callable[[str, int, int], None]   # (stage, done, total)
Vectors = np.ndarray | Callable[[np.ndarray], np.ndarray]

MAX_ROWS = 1 << 32
SEED_LIMIT = 1 << 64
FILE_ARRAYS = ("ids", "rows", "num_rows", "hash_from", "seed", "kind")
VECTOR_CHUNK_IDS = 65536          # ids per call of a vectors callable (one Lookup each from the CLI)
SPLIT_SHRINK = 1 - 2 / math.pi    # variance left along an axis in each half of a Gaussian cut at its median


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def _int_array(name: str, values, dtype=np.int64) -> np.ndarray:
    """values as a contiguous 1-D array of dtype; ValueError unless they are 1-D integers."""
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"{name}: expected a 1-D array of integers, got {array.dtype} of shape {array.shape}")
    return np.ascontiguousarray(array, dtype=dtype)


# ---- the mapping and its file ------------------------------------------------------------------------

@dataclass(frozen=True)
class Mapping:
    """A MAPPED table's id -> row mapping: ids[i] reads rows[i]; any other id reads
    hash_from + hashed_rows(id, num_rows - hash_from, seed)."""

    ids: np.ndarray
    rows: np.ndarray
    num_rows: int
    hash_from: int = 0
    seed: int = 0
    kind: str = "hash"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", _int_array("ids", self.ids))
        object.__setattr__(self, "rows", _int_array("rows", self.rows))
        for name in ("num_rows", "hash_from", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "kind", str(self.kind))

    def rows_of(self, ids) -> np.ndarray:
        """The row each id (int64 array) reads in a table with this mapping."""
        return mapped_rows(ids, self.ids, self.rows, self.num_rows, self.hash_from, self.seed)

    def check(self) -> None:
        """ValueError naming the first bad position unless the mapping is one a table can hold."""
        ids, rows = self.ids, self.rows
        if ids.size != rows.size:
            at = min(ids.size, rows.size)
            missing = f"ids[{at}] = {ids[at]} has no row" if ids.size > at else f"rows[{at}] = {rows[at]} has no id"
            raise ValueError(f"ids and rows differ in length ({ids.size} ids, {rows.size} rows): {missing}")
        if not 1 <= self.num_rows <= MAX_ROWS:
            raise ValueError(f"num_rows = {self.num_rows} is not in [1, 2^32]")
        if not 0 <= self.hash_from < self.num_rows:
            raise ValueError(f"hash_from = {self.hash_from} is not in [0, num_rows = {self.num_rows})")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed = {self.seed} is not in [0, 2^64)")
        outside = np.flatnonzero((rows < 0) | (rows >= self.num_rows))
        if outside.size:
            at = outside[0]
            raise ValueError(f"rows[{at}] = {rows[at]} (of ids[{at}] = {ids[at]}) is not in "
                             f"[0, num_rows = {self.num_rows})")
        order = _argsort_ids(ids)
        ordered = ids[order]
        repeats = order[1:][ordered[1:] == ordered[:-1]]
        if repeats.size:
            at = repeats.min()
            first = order[np.searchsorted(ordered, ids[at])]
            raise ValueError(f"ids[{at}] = {ids[at]} repeats ids[{first}]")

    def save(self, path: str | Path) -> None:
        """Writes the mapping file (the module's docstring describes it) at path, checked first."""
        self.check()
        with open(path, "wb") as out:
            np.savez(out, ids=self.ids, rows=self.rows, num_rows=np.int64(self.num_rows),
                     hash_from=np.int64(self.hash_from), seed=np.uint64(self.seed), kind=np.str_(self.kind))

    @classmethod
    def load(cls, path: str | Path) -> Mapping:
        """The mapping a file holds, checked; ValueError saying what is wrong with the file."""
        try:
            arrays = _npz_arrays(path, FILE_ARRAYS, "a mapping file")
            for name in ("num_rows", "hash_from", "seed", "kind"):
                if arrays[name].ndim != 0:
                    raise ValueError(f"{name} should be a scalar, it has shape {arrays[name].shape}")
            for name in ("num_rows", "hash_from", "seed"):
                if arrays[name].dtype.kind not in "iu":
                    raise ValueError(f"{name} should be an integer, it is {arrays[name].dtype}")
            mapping = cls(arrays["ids"], arrays["rows"], int(arrays["num_rows"]), int(arrays["hash_from"]),
                          int(arrays["seed"]), str(arrays["kind"]))
            mapping.check()
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: {e}") from None
        return mapping


def _npz_arrays(path: str | Path, names: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """The arrays names of the .npz at path; ValueError (OSError: the file's) if one is missing."""
    with np.load(path, allow_pickle=False) as data:
        missing = [name for name in names if name not in data.files]
        if missing:
            raise ValueError(f"no {', '.join(missing)} ({what} has {', '.join(names)})")
        return {name: data[name] for name in names}


# ---- traces ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """Ids in access order (int64) and, when known, their bags: int32 lengths in order, summing to
    the ids' count."""

    ids: np.ndarray
    lengths: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", _int_array("ids", self.ids))
        if self.lengths is None:
            return
        lengths = _int_array("lengths", self.lengths)
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            raise ValueError(f"lengths[{negative[0]}] = {lengths[negative[0]]} is negative")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError(f"lengths[{lengths.argmax()}] = {lengths.max()} is over the int32 range")
        if int(lengths.sum()) != self.ids.size:
            raise ValueError(f"the bags' lengths sum to {int(lengths.sum())}, the trace has {self.ids.size} ids")
        object.__setattr__(self, "lengths", lengths.astype(np.int32))


def bags_path(path: str | Path) -> Path:
    """Where the bag lengths of the trace FILE.npy are: FILE.bags.npy."""
    return Path(path).with_suffix(".bags.npy")


def load_trace(path: str | Path) -> Trace:
    """The trace FILE.npy with its bags (FILE.bags.npy) when that file exists; ValueError naming the
    file at fault."""
    try:
        trace = Trace(_load_npy(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    bags = bags_path(path)
    if not bags.exists():
        return trace
    try:
        return Trace(trace.ids, _load_npy(bags))
    except ValueError as e:
        raise ValueError(f"{bags}: {e}") from None


def _load_npy(path: str | Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read it as a .npy array: {e}") from None


# ---- shared steps of the builders ----------------------------------------------------------------------

def _argsort_keys(keys: np.ndarray, key_bits: int) -> np.ndarray:
    """Stable argsort of non-negative int64 keys below 2^key_bits.  When keys and positions fit in 63
    bits together it sorts keys packed above their positions: numpy sorts plain integers several
    times faster than it argsorts them."""
    pos_bits = max(1, (keys.size - 1).bit_length())
    if key_bits + pos_bits > 63:
        return np.argsort(keys, kind="stable")
    packed = keys.astype(np.int64) << pos_bits
    packed |= np.arange(keys.size, dtype=np.int64)
    packed.sort()
    packed &= (1 << pos_bits) - 1
    return packed


def _argsort_ids(ids: np.ndarray) -> np.ndarray:
    """Stable argsort of int64 ids: a packed sort when their span and their positions fit in 63 bits
    together (ids that are rows; ids less than 2^36 apart in a trace of 100M), else numpy's."""
    if not ids.size:
        return np.zeros(0, dtype=np.int64)
    low = int(ids.min())
    span_bits = (int(ids.max()) - low).bit_length()
    return _argsort_keys(ids - low, span_bits) if span_bits < 63 else np.argsort(ids, kind="stable")


@dataclass(frozen=True)
class _ById:
    """A trace's accesses grouped by id: distinct ids ascending, their counts, the trace's positions
    of each id's accesses (order[starts[i]:starts[i] + counts[i]], in trace order) and the index in
    distinct of each access's id."""

    distinct: np.ndarray
    counts: np.ndarray
    starts: np.ndarray
    order: np.ndarray
    index: np.ndarray


def _by_id(ids: np.ndarray) -> _ById:
    order = _argsort_ids(ids)
    ordered = ids[order]
    starts = _run_starts(ordered)
    counts = _run_lengths(starts, ids.size)
    index = np.empty(ids.size, dtype=np.int32 if starts.size < 1 << 31 else np.int64)
    index[order] = np.repeat(np.arange(starts.size, dtype=index.dtype), counts)
    return _ById(ordered[starts], counts, starts, order, index)


def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """Where each run of equal consecutive entries (of all keys at once) starts."""
    new = np.zeros(keys[0].size, dtype=bool)
    new[:1] = True
    for key in keys:
        new[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(new)


def _run_lengths(starts: np.ndarray, size: int) -> np.ndarray:
    return np.diff(np.append(starts, size))


def _check_rows(num_rows: int) -> None:
    if not 1 <= num_rows <= MAX_ROWS:
        raise ValueError(f"num_rows must be in [1, 2^32], got {num_rows}")


def _frequent_count(num_rows: int, frequent_share: float, distinct: int) -> int:
    """F = round(frequent_share x num_rows), at most the distinct ids there are; ValueError unless it
    leaves at least one row to hash into."""
    if not 0 <= frequent_share < 1:
        raise ValueError(f"frequent_share must be in [0, 1), got {frequent_share}")
    wanted = round(frequent_share * num_rows)
    if wanted >= num_rows:
        raise ValueError(f"frequent_share {frequent_share} of {num_rows} rows gives {wanted} frequent rows and "
                         "leaves none to hash into")
    return min(wanted, distinct)


def _most_frequent(counts: np.ndarray, count: int) -> np.ndarray:
    """Indices of the count largest counts, largest first, equal counts in index order (counts are
    per distinct id in ascending id order, so ties go to the smaller id)."""
    most = int(counts.max()) if counts.size else 0
    return _argsort_keys(most - counts, most.bit_length())[:count]


# ---- builders ------------------------------------------------------------------------------------

def build_hash(trace: Trace, num_rows: int, seed: int = 0, progress: Progress | None = None) -> Mapping:
    """The hashing trick: no listed ids, every id hashed over all num_rows rows."""
    _check_rows(num_rows)
    (progress or _no_progress)("hashing", 1, 1)
    return Mapping(np.zeros(0, np.int64), np.zeros(0, np.int64), num_rows, 0, seed, "hash")


def build_frequency(trace: Trace, num_rows: int, frequent_share: float = 0.5, seed: int = 0,
                    progress: Progress | None = None) -> Mapping:
    """The F = round(frequent_share x num_rows) most frequent ids in rows 0..F-1 (most frequent first,
    ties by id; F is at most the distinct ids seen), every other id hashed into [F, num_rows)."""
    _check_rows(num_rows)
    report = progress or _no_progress
    report("counting ids", 0, 1)
    distinct, counts = np.unique(trace.ids, return_counts=True)
    report("counting ids", 1, 1)
    frequent = _most_frequent(counts, _frequent_count(num_rows, frequent_share, distinct.size))
    return Mapping(distinct[frequent], np.arange(frequent.size), num_rows, frequent.size, seed, "frequency")


def build_learned(trace: Trace, num_rows: int, frequent_share: float = 0.5, seed: int = 0,
                  vectors: Vectors | None = None, dim: int = 8, passes: int = 6, min_accesses: int = 1,
                  progress: Progress | None = None) -> Mapping:
    """The frequent ids as build_frequency places them; every other id seen at least min_accesses
    times embedded and clustered into the rows [F, num_rows), the rest hashed there.

    The embedding is either learned from co-access (the trace needs its bags) or given:

    * co-access (vectors None): each distinct id starts from a random +-1 vector of dim coordinates
      (seeded by seed); a pass replaces every id's vector by the mean over its accesses of the mean
      vector of the access's bag (one step of a random walk id -> bag -> id).  After one pass an id's
      vector is a random projection of its co-access profile (which ids share its bags, how often),
      so ids with similar profiles get close vectors (Johnson-Lindenstrauss); each further pass
      averages over the neighbours' profiles, which pulls the ids of a community together (an id
      seen once lands where the ids of its one bag are, not at that bag's particular draw) while
      communities that share no bags stay apart.  This is FastRP (Chen et al., 2019) with a walk of
      `passes` steps.  More passes cost proportionally more and merge more: on the benchmark's
      planted groups (1M ids, 100K rows, 8 coordinates) the share of colliding pairs of ids within
      one group is 0.34 / 0.42 / 0.56 / 0.64 / 0.68 after 1 / 2 / 4 / 6 / 8 passes, 0.77 when the ids
      are given their group's own vector; 16 coordinates instead of 8 gain less (0.66 at 6 passes)
      for the same cost as 12 passes.  On real traces, where communities overlap, a long walk would
      blur them: 6 passes is the default.  A truncated SVD of the normalised incidence matrix costs
      the same passes but keeps only the dim coarsest directions of the co-access graph, while a
      mapping into millions of rows is made of its finest clusters, whose distances a random
      projection keeps.  Each pass is two gathers and two np.add.reduceat over the accesses per
      coordinate (the accesses in bag order, then in id order), with no n x n matrix.
    * vectors: an array [distinct ids, d] aligned with the trace's distinct ids in ascending order
      (np.unique(trace.ids)), or a callable ids -> [len(ids), d] array (called with at most
      VECTOR_CHUNK_IDS ids at a time, only for the ids to embed), e.g. the rows of a previous model
      (`embtier mapping build --from-table T` reads them from a table).

    min_accesses: ids seen fewer times are hashed instead of embedded.  The default, 1, lists every
    id of the trace (the walk gives even an id seen once the place of its bag's ids); raise it to keep
    the daemon's map of the table small (every listed id is an entry), at the price of hashing the
    rare ids at random.

    Clustering: the embedded vectors are turned to their principal axes (the dim largest of them),
    then split by balanced recursive bisection: every node of rows [r, r + m) cuts its ids at the
    quantile that gives each half a share of the ids proportional to its rows (its own quantile,
    along an axis that is the same for all nodes of a level: the one with the most variance left,
    each cut along an axis taken to leave SPLIT_SHRINK of its variance), until each node has one row
    (or no more ids than rows: then one id per row).  Each level is one sort of all ids (by node,
    then coordinate), so the whole costs O(n log num_rows) and gives every row the same number of
    ids to within one.  k-means would need each id's
    nearest among up to millions of centroids per iteration (n x rows x dim) and an extra balancing
    step; bisection scales to millions of rows and is deterministic."""
    _check_rows(num_rows)
    if min(dim, passes, min_accesses) < 1:
        raise ValueError(f"dim, passes and min_accesses must be at least 1, got {dim}, {passes}, {min_accesses}")
    if vectors is None and trace.lengths is None:
        raise ValueError("the trace has no bags (FILE.bags.npy): learning from co-access needs them; give "
                         "vectors instead")
    report = progress or _no_progress
    report("sorting the trace", 0, 1)
    by_id = _by_id(trace.ids)
    report("sorting the trace", 1, 1)
    frequent = _most_frequent(by_id.counts, _frequent_count(num_rows, frequent_share, by_id.distinct.size))
    embedded = np.ones(by_id.distinct.size, dtype=bool)
    embedded[frequent] = False
    embedded &= by_id.counts >= min_accesses
    embedded = np.flatnonzero(embedded)
    if not embedded.size:
        points = np.zeros((1, 0), dtype=np.float32)
    elif vectors is None:
        points = _coaccess_vectors(trace.lengths, by_id, dim, passes, seed, report)[:, embedded]
    else:
        points = _given_vectors(vectors, by_id.distinct, embedded, report)
    points, variances = _principal_axes(points, dim)
    hash_from = frequent.size
    rows = hash_from + _balanced_rows(points, variances, num_rows - hash_from, report)
    ids = np.concatenate([by_id.distinct[frequent], by_id.distinct[embedded]])
    return Mapping(ids, np.concatenate([np.arange(hash_from), rows]), num_rows, hash_from, seed, "learned")


BUILDERS: dict[str, Callable[..., Mapping]] = {"hash": build_hash, "frequency": build_frequency,
                                                "learned": build_learned}


def _coaccess_vectors(lengths: np.ndarray, by_id: _ById, dim: int, passes: int, seed: int,
                      report: Progress) -> np.ndarray:
    """[dim, distinct ids] float32: random +-1 vectors smoothed passes times through the bags."""
    bag_lengths = lengths[lengths > 0]
    bag_starts = np.concatenate([[0], np.cumsum(bag_lengths[:-1], dtype=np.int64)])
    bag_of_access = np.repeat(np.arange(bag_lengths.size, dtype=np.int32), bag_lengths)
    bag_by_id = bag_of_access[by_id.order]          # each id's accesses, their bags
    del bag_of_access
    bag_sizes = bag_lengths.astype(np.float32)
    id_counts = by_id.counts.astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((dim, by_id.distinct.size), dtype=np.float32)
    for j in range(dim):
        vector = rng.integers(0, 2, by_id.distinct.size, dtype=np.int8).astype(np.float32) * 2 - 1
        for p in range(passes):
            bag_means = np.add.reduceat(vector[by_id.index], bag_starts) / bag_sizes
            vector = np.add.reduceat(bag_means[bag_by_id], by_id.starts) / id_counts
            report("embedding co-access", j * passes + p + 1, dim * passes)
        out[j] = vector
    return out


def _given_vectors(vectors: Vectors, distinct: np.ndarray, embedded: np.ndarray, report: Progress) -> np.ndarray:
    """[d, embedded ids] float32 from an array aligned with distinct, or from a callable of ids."""
    ids = distinct[embedded]
    if not callable(vectors):
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[0] != distinct.size:
            raise ValueError(f"vectors: expected an array [{distinct.size} distinct ids, dim], got shape "
                             f"{array.shape}")
        points = np.asarray(array[embedded], dtype=np.float32)
    else:
        parts = []
        for start in range(0, ids.size, VECTOR_CHUNK_IDS):
            chunk = ids[start:start + VECTOR_CHUNK_IDS]
            part = np.asarray(vectors(chunk), dtype=np.float32)
            if part.ndim != 2 or part.shape[0] != chunk.size or (parts and part.shape[1] != parts[0].shape[1]):
                raise ValueError(f"vectors({chunk.size} ids) returned shape {part.shape}, expected "
                                 f"[{chunk.size}, dim] with the same dim every call")
            parts.append(part)
            report("reading vectors", start + chunk.size, ids.size)
        points = np.concatenate(parts)
    bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
    if bad.size:
        raise ValueError(f"vectors: the vector of id {ids[bad[0]]} is not finite: {points[bad[0]]}")
    return np.ascontiguousarray(points.T)


def _principal_axes(points: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """points [d, n] centred and turned to their principal axes, the min(d, dim) largest kept, with
    the variance along each (largest first)."""
    d, n = points.shape
    if n == 0:
        return np.zeros((1, 0), dtype=np.float32), np.zeros(1)
    centred = points - points.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    covariance = (centred @ centred.T).astype(np.float64) / n
    variances, axes = np.linalg.eigh(covariance)
    top = np.argsort(variances)[::-1][:min(d, dim)]
    return axes[:, top].T.astype(np.float32) @ centred, np.maximum(variances[top], 0.0)


def _balanced_rows(points: np.ndarray, variances: np.ndarray, num_rows: int, report: Progress) -> np.ndarray:
    """The row in [0, num_rows) of each point (column of points), by balanced recursive bisection
    (build_learned's docstring says how)."""
    n = points.shape[1]
    rows = np.empty(n, dtype=np.int64)
    todo = np.arange(n)                                # unplaced points, node after node
    sizes = np.array([n], dtype=np.int64)              # per node: its points, its first row, its rows
    firsts = np.zeros(1, dtype=np.int64)
    spans = np.array([num_rows], dtype=np.int64)
    spread = variances.astype(np.float64).copy()
    levels = max(1, (num_rows - 1).bit_length())
    for level in range(levels + 1):
        done = (spans == 1) | (sizes <= spans)
        if done.any():
            todo, sizes, firsts, spans = _place_done(rows, todo, sizes, firsts, spans, done)
        if not todo.size:
            break
        report("clustering", level, levels)
        axis = int(spread.argmax())
        spread[axis] *= SPLIT_SHRINK
        todo = todo[_sort_within_nodes(points[axis][todo], sizes)]
        left_spans = spans // 2
        left_sizes = (2 * sizes * left_spans + spans) // (2 * spans)   # round(sizes x left_spans / spans)
        sizes = np.column_stack([left_sizes, sizes - left_sizes]).ravel()
        firsts = np.column_stack([firsts, firsts + left_spans]).ravel()
        spans = np.column_stack([left_spans, spans - left_spans]).ravel()
    report("clustering", levels, levels)
    return rows


def _place_done(rows: np.ndarray, todo: np.ndarray, sizes: np.ndarray, firsts: np.ndarray, spans: np.ndarray,
                done: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gives the points of the done nodes their rows (spread evenly over the node's rows) and returns
    the nodes left."""
    node = np.repeat(np.arange(sizes.size), sizes)
    starts = np.cumsum(sizes) - sizes
    placed = done[node]
    at, of = np.flatnonzero(placed), node[placed]
    rows[todo[at]] = firsts[of] + (at - starts[of]) * spans[of] // sizes[of]
    keep = ~done
    return todo[~placed], sizes[keep], firsts[keep], spans[keep]


def _sort_within_nodes(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The stable order that sorts values within each node (consecutive runs of sizes, none empty)."""
    node = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    node_bits = max(1, (sizes.size - 1).bit_length())
    value_bits = min(30, 63 - node_bits - max(1, (values.size - 1).bit_length()))
    if value_bits < 12:
        return np.lexsort((values, node))
    starts = np.cumsum(sizes) - sizes
    low = np.minimum.reduceat(values, starts).astype(np.float64)
    width = np.maximum.reduceat(values, starts) - low
    scale = ((1 << value_bits) - 1) / np.where(width > 0, width, 1.0)
    quantised = ((values - low[node]) * scale[node]).astype(np.int64)
    return _argsort_keys((node << value_bits) | quantised, node_bits + value_bits)


# ---- collision statistics --------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    """How a mapping's rows are shared by the ids of a trace."""

    accesses: int
    distinct_ids: int
    num_rows: int
    rows_used: int                 # rows that at least one id of the trace reads
    shared_rows: int               # rows that two or more ids of the trace read
    shared_access_share: float     # accesses to a row that another id of the trace reads too
    colliding_pairs: int           # pairs of the trace's ids that read the same row
    busiest_row: int               # the row read by the most ids of the trace (then: by the most accesses)
    busiest_row_ids: int
    busiest_row_accesses: int
    grouped_ids: int | None = None          # with groups: the trace's ids that have one
    mixed_rows: int | None = None           # rows read by grouped ids of two or more groups
    grouped_pairs: int | None = None        # colliding pairs of grouped ids
    same_group_share: float | None = None   # share of those pairs within one group
    chance_same_group_share: float | None = None   # the same for a pair of grouped ids drawn at random


Groups = tuple[np.ndarray, np.ndarray] | MappingType[int, int]


def stats(mapping: Mapping, trace: Trace, groups: Groups | None = None) -> Stats:
    """The collision statistics of mapping on trace's ids; with groups (ids, groups arrays, or a dict
    id -> group) also how the colliding pairs fall within groups, against chance."""
    distinct, counts = np.unique(trace.ids, return_counts=True)
    row_of_id = mapping.rows_of(distinct)
    used, row_index, ids_per_row = np.unique(row_of_id, return_inverse=True, return_counts=True)
    accesses_per_row = np.bincount(row_index, weights=counts, minlength=used.size).astype(np.int64)
    shared = ids_per_row >= 2
    busiest = np.lexsort((-used, accesses_per_row, ids_per_row))[-1] if used.size else None
    result = Stats(
        accesses=trace.ids.size, distinct_ids=distinct.size, num_rows=mapping.num_rows, rows_used=used.size,
        shared_rows=int(shared.sum()),
        shared_access_share=float(counts[shared[row_index]].sum() / max(trace.ids.size, 1)),
        colliding_pairs=_pairs(ids_per_row),
        busiest_row=-1 if busiest is None else int(used[busiest]),
        busiest_row_ids=0 if busiest is None else int(ids_per_row[busiest]),
        busiest_row_accesses=0 if busiest is None else int(accesses_per_row[busiest]))
    if groups is None:
        return result
    group_of = _groups_of(distinct, groups)
    grouped = group_of >= 0
    rows, labels = row_of_id[grouped], group_of[grouped]
    order = np.lexsort((labels, rows))
    rows, labels = rows[order], labels[order]
    row_starts, cell_starts = _run_starts(rows), _run_starts(rows, labels)    # cell: a row's ids of one group
    groups_per_row = np.diff(np.searchsorted(cell_starts, np.append(row_starts, rows.size)))
    pairs = _pairs(_run_lengths(row_starts, rows.size))
    all_pairs = _pairs(np.array([rows.size]))
    return replace(
        result, grouped_ids=rows.size, mixed_rows=int((groups_per_row >= 2).sum()), grouped_pairs=pairs,
        same_group_share=_pairs(_run_lengths(cell_starts, rows.size)) / pairs if pairs else float("nan"),
        chance_same_group_share=(_pairs(np.unique(labels, return_counts=True)[1]) / all_pairs if all_pairs
                                 else float("nan")))


def load_groups(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The groups of `embtier mapping stats --groups FILE`: an .npz with integer arrays ids and groups
    (the group, >= 0, of each id)."""
    try:
        arrays = _npz_arrays(path, ("ids", "groups"), "a groups file")
        return _int_array("ids", arrays["ids"]), _int_array("groups", arrays["groups"])
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: {e}") from None


def _pairs(sizes: np.ndarray) -> int:
    """Pairs within sets of these sizes: sum of s (s - 1) / 2."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def _groups_of(distinct: np.ndarray, groups: Groups) -> np.ndarray:
    """The group (>= 0) of each distinct id, -1 for ids groups does not name."""
    if isinstance(groups, MappingType):
        ids = np.fromiter(groups.keys(), dtype=np.int64, count=len(groups))
        labels = np.fromiter(groups.values(), dtype=np.int64, count=len(groups))
    else:
        ids, labels = (_int_array(name, a) for name, a in zip(("groups' ids", "groups"), groups))
    if ids.size != labels.size:
        raise ValueError(f"groups: {ids.size} ids but {labels.size} groups")
    if labels.size and labels.min() < 0:
        raise ValueError(f"groups: group {labels.min()} is negative")
    order = np.argsort(ids, kind="stable")
    keys = ids[order]
    if keys.size and (keys[1:] == keys[:-1]).any():
        raise ValueError(f"groups: id {keys[1:][keys[1:] == keys[:-1]][0]} is listed twice")
    out = np.full(distinct.size, -1, dtype=np.int64)
    if keys.size:
        at = np.minimum(np.searchsorted(keys, distinct), keys.size - 1)
        hit = keys[at] == distinct
        out[hit] = labels[order[at[hit]]]
    return out


def format_stats(s: Stats) -> str:
    """Stats as a few lines for a person."""
    lines = [
        (f"{s.accesses} accesses of {s.distinct_ids} distinct ids onto {s.num_rows} rows: {s.rows_used} rows used "
         f"({s.rows_used / s.num_rows:.1%}), {s.shared_rows} of them shared"),
        (f"accesses to a row another id of the trace shares: {s.shared_access_share:.1%}; colliding pairs of ids: "
         f"{s.colliding_pairs}"),
        f"most shared row: {s.busiest_row} ({s.busiest_row_ids} ids, {s.busiest_row_accesses} accesses)"]
    if s.grouped_ids is not None:
        lift = (s.same_group_share / s.chance_same_group_share
                if s.chance_same_group_share and s.grouped_pairs else float("nan"))
        lines.append(f"groups: {s.grouped_ids} ids with a group; {s.mixed_rows} rows shared across groups; of the "
                     f"{s.grouped_pairs} colliding pairs {s.same_group_share:.2%} are within a group (chance "
                     f"{s.chance_same_group_share:.4%}, x{lift:.1f})")
    return "\n".join(lines)
