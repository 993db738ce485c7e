"""The in-process store: the catalog of tables by name over a set of tiers,
and the row operations (lookups, pooling, writes) on them.

A table (table.py) is a placement map (per row: tier and slot, 4 bytes) plus
a heat counter per row (1 byte), over chunks of 2^k rows allocated from the
tiers.  New tables fill the fastest tier first.  Lookups and writes go
straight to the native kernels; this module validates arguments and encodes
rows.  Where a row lives is the mover's (mover.py) alone: creation, restore,
migration, trims and port trades ask it.

Writers of one table are serialised here (ADD reads, adds and writes back
under the same lock); readers run concurrently with each other and see
every row whole, because the native write path holds the table's write lock.

Changes and the journal: each change is logged under the lock that orders it
and applied before that lock is let go (see journal.py).  Lock order: a
table's write lock, then the catalog lock (self._lock).  A table that is
dropped, or replaced by a restore, is retired under both: a write that waited
for its lock sees that and fails without a record (dropped) or goes to the
table that replaced it (restored), so no record ever lands behind the DROP
of its table or on the table a restore installed in its place.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time

import numpy as np
from embtier.wire import (
    INITIALIZERS,
    MEMORY_TIERS,
    TABLE_NAME_RE,
    TIERS,
    WRITE_MODES,
    PortInfo,
    TableInfo,
    TierInfo,
)

from embtierd import codec, fabric, native
from embtierd.config import Config
from embtierd.errors import (
    AlreadyExistsError,
    EmbtierError,
    FailedPreconditionError,
    InstallError,
    InvalidArgumentError,
    NotFoundError,
    TierFullError,
)
from embtierd.keys.space import KeySpace, rows_inside
from embtierd.native import NativeTable, require
from embtierd.store.mover import Mover
from embtierd.store.table import MAX_DIM, MAX_ROWS, Table, check_settings, chunk_shift_for
from embtierd.tiering.config import TableSettings
from embtierd.tiers import Tiers, open_tiers
from embtierd.topology import Topology, discover

log = logging.getLogger(__name__)

RECENT_MINUTES = 60         # an eviction of an id written this recently is counted apart (the alert)
INIT_BATCH_ROWS = 1 << 16   # uniform init draws one generator stream per batch: values depend on seed only
HEAT_BINS = 9  # heat 0, 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64-127, 128-255
HEAT_BIN_NAMES = ("0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128-255")


def _minute() -> int:
    """Minutes on the monotonic clock, mod 2^16 (the age of a managed table's writes)."""
    return int(time.monotonic() // 60) % (1 << 16)


def _tier_counter(tier_rows: np.ndarray | None) -> np.ndarray | None:
    if tier_rows is not None and (tier_rows.dtype != np.int64 or tier_rows.shape != (3,)):
        raise InvalidArgumentError(f"tier_rows must be an int64 array of shape (3,), got {tier_rows.dtype} "
                                   f"{tier_rows.shape}")
    return tier_rows


class Store:
    """Tables over a set of tiers; every method is safe to call from many threads."""

    def __init__(self, config: Config, topology: Topology | None = None):
        self.config = config
        self.topology = topology or discover()
        self.tiers: Tiers = open_tiers(config, self.topology)
        self.tiers_by_id = {tier.tier_id: tier for tier in self.tiers}
        native.set_kernel_threads(config.kernels.kernel_threads)
        native.set_scm_queue_depth(config.kernels.scm_queue_depth)
        self._tables: dict[str, Table] = {}
        self._serials = itertools.count(1)
        self._creating: set[str] = set()  # names reserved while their rows are initialised
        self._lock = threading.Lock()  # guards the two above and the tiers' extent allocators
        self.journal = None  # a journal.Journal once the write-ahead log is replayed: operations are logged
        # the fabric ports of the CXL tier: one per CPU-less node it uses, or the configured emulated ones
        self.cxl_ports = self.tiers.cxl.ports
        self.part_names = fabric.part_names(self.cxl_ports)
        self.mover = Mover(self.tiers, self._lock, self.cxl_ports, config.fabric.rebalance_tolerance)
        log.info("kernels: %s, %d thread(s), SCM reads %s", native.isa(), config.kernels.kernel_threads,
                 "batched with Linux AIO" if native.scm_async() else "by pread (AIO refused)")

    # ---- tables ------------------------------------------------------------

    def create_table(self, name: str, num_rows: int, dim: int, dtype: str = "float32",
                     initializer: str = "zeros", seed: int = 0, init_scale: float = 0.0,
                     policy: TableSettings | None = None, generation: int | None = None,
                     keys: KeySpace | None = None, mapping: tuple[np.ndarray, np.ndarray] | None = None,
                     receiving: bool = False) -> TableInfo:
        """A new table, its rows placed fastest tier first (within its policy's pin and limits) and initialised.

        uniform draws from [-init_scale, init_scale) (0 means 1/sqrt(num_rows), DLRM's choice),
        reproducibly from seed.  policy defaults to the configuration's for this name.  keys: its key
        space (keys/space.py; dense by default); mapping: a mapped table's (listed ids, their rows),
        int64 each.  generation: the LSN of the CREATE record being replayed (live creations get the
        LSN they are logged at).  receiving: the table receives a moved shard (write_rows' fill), so
        it remembers which rows plain writes set (in memory only: a restart forgets it)."""
        keys = keys or KeySpace()
        keys.check()
        if receiving and keys.kind != "dense":
            raise InvalidArgumentError(f"receiving applies to dense tables (the shards a move fills); this one is "
                                       f"{keys.kind}")
        self._check_new_table(name, num_rows, dim, dtype, initializer, init_scale, keys)
        if mapping is not None and not keys.mapped:
            raise InvalidArgumentError(f"mapping_ids and mapping_rows apply to mapped tables only; this one is "
                                       f"{keys.kind}")
        policy = policy or self.config.tiering.table_policy(name)
        check_settings(policy)
        self._check_fits(name, keys.rows_inside(num_rows) * native.row_stride(dim, dtype), policy.pin)
        table = self._new_table(name, num_rows, dim, dtype, policy, keys, mapping)
        if receiving:
            table.plain_written = np.zeros((num_rows + 7) // 8, dtype=np.uint8)  # a bit per row
        with self._lock:
            if name in self._tables or name in self._creating:
                raise AlreadyExistsError(f"table {name!r} already exists")
            self.mover.place(table)
            self._creating.add(name)
        # Initialised before it is published: reused extents hold a dropped table's rows.
        try:
            self._initialize(table, initializer, seed, init_scale or 1.0 / math.sqrt(num_rows))
        except BaseException:
            with self._lock:
                self._creating.discard(name)
                self.mover.release(table)
            raise
        with self._lock:
            self._creating.discard(name)
            try:
                lsn = self.journal.log_create(name, num_rows, dim, dtype, initializer, seed, init_scale, policy,
                                              keys, mapping) if self.journal else 0
            except BaseException:
                self.mover.release(table)
                raise
            table.serial = next(self._serials)
            table.generation = lsn or generation or 0
            self._tables[name] = table
        if lsn:
            self.journal.wait(lsn)
        log.info("created table %s: %d x %d %s, rows per tier %s", name, num_rows, dim, dtype,
                 dict(zip(TIERS, table.rows_by_tier)))
        return self._info(table)

    def _new_table(self, name: str, num_rows: int, dim: int, dtype: str, settings: TableSettings,
                   keys: KeySpace, mapping: tuple[np.ndarray, np.ndarray] | None = None) -> Table:
        """A table with no homes yet (see Mover.place); num_rows as the user sees it; mapping: a mapped
        table's (listed ids, their rows)."""
        num_rows = keys.rows_inside(num_rows)
        stride = native.row_stride(dim, dtype)
        shift = chunk_shift_for(stride, num_rows)
        # Chunks a tier may give the table: twice what num_rows needs, because a chunk cut short by a
        # full tier (or a full CXL port) leaves its slot range partly unusable and later growth starts a
        # new chunk, plus two per CXL port, so that even a table of one chunk can spread over the ports.
        max_chunks = min(2 * -(-num_rows >> shift) + 2 * self.cxl_ports, (1 << 30) >> shift)
        table = Table(name, num_rows, dim, dtype, stride, shift,
                      NativeTable(name, num_rows, dim, dtype, shift, max_chunks), settings=settings, keys=keys)
        if keys.mapped:
            ids, rows = mapping if mapping is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
            table.native.set_mapping(keys.seed, np.ascontiguousarray(ids, np.int64),
                                     np.ascontiguousarray(rows, np.int64), keys.hash_from)
        elif keys.keyed:
            table.native.set_keys(keys.kind, keys.seed, self.config.tiering.interval_seconds)
        if keys.managed:
            # (rows not written since this process made the table count as written long ago)
            table.written_minute = np.full(num_rows, (_minute() - RECENT_MINUTES) % (1 << 16), dtype=np.uint16)
        table.native.configure(self.config.kernels.prefetch_distance, self.config.kernels.heat_sample_shift)
        table.native.set_cxl_delay(self.tiers.cxl.injected_latency_ns)
        table.native.set_parts(len(self.part_names))  # each chunk's part is set as it gets storage (SlotSpace)
        table.port_load = np.zeros(self.cxl_ports, dtype=np.float64)
        return table

    def check_install(self, specs: list[dict]) -> None:
        """What install checks before it changes anything: TierFullError when the tiers cannot hold
        the tables, InvalidArgumentError for a bad tiering setting."""
        pinned: dict[str, int] = {}
        need = 0
        for spec in specs:
            settings = TableSettings.from_dict(spec)
            check_settings(settings)
            nbytes = rows_inside(spec) * native.row_stride(spec["dim"], spec["dtype"])
            need += nbytes
            if settings.pin:
                pinned[settings.pin] = pinned.get(settings.pin, 0) + nbytes
        capacity = sum(tier.capacity_bytes for tier in self.tiers)
        if need > capacity:
            raise TierFullError(f"the restored tables need {need} bytes; the tiers hold {capacity}")
        for tier, nbytes in pinned.items():
            capacity = self.tiers_by_id[TIERS.index(tier)].capacity_bytes
            if nbytes > capacity:
                raise TierFullError(f"the restored tables pinned to {tier} need {nbytes} bytes; it holds {capacity}")

    def install(self, tables, hold: contextlib.ExitStack | None = None, generation: int | None = None) -> list[str]:
        """Replaces every table by the given ones, each (spec as from spec(), batches of (ids,
        encoded rows) that together write every row, heat [rows inside], the keys of a managed table's
        live rows, a mapped table's mapping (listed ids, their rows), or None); returns their names.  Call
        inside frozen(); with hold, each new table's write lock is taken before it is published and
        released when hold closes (so that writes wait until the caller is done, then go to the new
        tables).  Each new table's generation is the spec's (a checkpoint's), or generation when
        given (the LSN of the RESTORE record the caller logged).  Nothing is logged here.
        TierFullError before anything changes when the tiers cannot hold them (check_install);
        InstallError if placing them still fails once the old tables are gone (then the store
        matches no durable state: the caller must stop serving)."""
        self.check_install([spec for spec, *_ in tables])
        for table in self._tables.values():
            table.retired = "restored"
            table.native.mark_dropped()
            self.mover.release(table)
        self._tables.clear()
        try:  # pinned tables first: the others, placed before them, could take the memory a pin needs
            for spec, batches, heat, keys in sorted(tables, key=lambda table: not table[0]["pin"]):
                space = KeySpace.from_dict(spec)
                table = self._new_table(spec["name"], spec["num_rows"], spec["dim"], spec["dtype"],
                                        TableSettings.from_dict(spec), space, keys if space.mapped else None)
                self.mover.place(table)
                for ids, rows in batches:
                    self._write_encoded(table, ids, rows)
                table.native.heat[:] = heat
                if keys is not None and space.managed:
                    table.native.load_keys(keys)
                table.native.take_dirty()
                table.serial = next(self._serials)
                table.generation = spec.get("generation", 0) if generation is None else generation
                if hold is not None:
                    hold.enter_context(table.write_lock)
                self._tables[table.name] = table
        except EmbtierError as e:
            raise InstallError(f"restoring the tables failed after the old ones were dropped: {e}") from e
        log.info("installed %d restored table(s): %s", len(tables), ", ".join(self._tables))
        return sorted(self._tables)

    def drop_table(self, name: str) -> None:
        """Drops a table once the writes in flight on it are done; writes that waited fail."""
        while True:
            table = self._get(name)
            with table.write_lock, self._lock:
                if self._tables.get(name) is not table:  # dropped or restored meanwhile: look again
                    continue
                lsn = self.journal.log_drop(name, table.generation) if self.journal else 0
                del self._tables[name]
                table.retired = "dropped"
                table.native.mark_dropped()  # waits for lookups in flight; later calls fail cleanly
                self.mover.release(table)
            break
        if lsn:
            self.journal.wait(lsn)

    def serial(self, name: str) -> int:
        return self._get(name).serial

    def generation(self, name: str) -> int:
        """The LSN of the record that made the table (CREATE or RESTORE); see journal.py."""
        return self._get(name).generation

    def table_policy(self, name: str) -> TableSettings:
        return self._get(name).settings

    def set_policy(self, name: str, policy: TableSettings) -> TableSettings:
        """Replaces a table's policy settings (logged: a restart keeps them); the tiering engine moves rows
        to match from its next interval."""
        check_settings(policy)
        while True:
            table = self._get(name)
            if policy.pin in MEMORY_TIERS:
                limit = policy.limit_rows(policy.pin, table.stride)
                capacity = self.tiers_by_id[TIERS.index(policy.pin)].capacity_bytes // table.stride
                fits = capacity if limit is None else min(capacity, limit)
                if fits < table.num_rows:
                    raise TierFullError(f"table {name!r} ({table.num_rows} rows of {table.stride} bytes) cannot be "
                                        f"pinned to {policy.pin}: it holds at most {fits} of its rows")
            with table.write_lock, self._lock:
                if self._tables.get(name) is not table:  # dropped or restored meanwhile: look again
                    continue
                lsn = self.journal.log_policy(name, table.generation, policy) if self.journal else 0
                table.settings = policy
                self.mover.settings_changed(table)
            break
        if lsn:
            self.journal.wait(lsn)
        return policy

    def trim(self, name: str, tier: int) -> int:
        """Mover.trim of a table by name."""
        return self.mover.trim(self._get(name), tier)

    def room_rows(self, name: str, tier: int) -> int:
        """Mover.room_rows of a table by name."""
        return self.mover.room_rows(self._get(name), tier)

    def handles(self) -> list[Table]:
        """The tables as they are now, by name (the tiering engine holds these for an interval)."""
        with self._lock:
            return sorted(self._tables.values(), key=lambda t: t.name)

    def geometry(self, name: str) -> tuple[int, str, int]:
        """(dim, dtype, bytes per stored row) of a table, without the cost of describe()."""
        table = self._get(name)
        return table.dim, table.dtype, table.stride

    def key_space(self, name: str) -> str:
        """A table's key space ("dense", "hashed", "managed" or "mapped")."""
        return self._get(name).keys.kind

    def describe(self, name: str) -> TableInfo:
        return self._info(self._get(name))

    def tables(self) -> list[TableInfo]:
        with self._lock:
            tables = sorted(self._tables.values(), key=lambda t: t.name)
        return [self._info(t) for t in tables]

    def tier_infos(self) -> list[TierInfo]:
        """Each tier's capacity and use (the CXL tier with its ports)."""
        with self._lock:
            return [tier.info() for tier in self.tiers]

    def port_infos(self) -> list[PortInfo]:
        """The CXL tier's ports: name, NUMA node (-1 emulated), capacity and used bytes."""
        with self._lock:
            return self.tiers.cxl.port_infos()

    def close(self) -> None:
        with self._lock:
            for table in self._tables.values():
                table.native.mark_dropped()
                self.mover.release(table)
            self._tables.clear()
            self.tiers.close()

    # ---- rows --------------------------------------------------------------

    def lookup(self, name: str, ids: np.ndarray, tier_rows: np.ndarray | None = None,
               part_rows: np.ndarray | None = None, unknown: np.ndarray | None = None) -> np.ndarray:
        """[len(ids), dim] float32 rows of ids (the table's keys: rows of a dense table, raw ids of a
        keyed one).  tier_rows (int64 [3]: dram, cxl, scm), when given, receives how many rows each
        tier served; part_rows (int64 [len(part_names)]) how many each fabric part served (counted by
        the kernel as it resolves the rows); unknown (int64 [1]) how many ids of a managed table had
        no row (they read the default row)."""
        table = self._get(name)
        ids = require(ids, "ids", np.int64, 1)
        out = np.empty((ids.size, table.dim), dtype=np.float32)
        table.native.gather(ids, out, _tier_counter(tier_rows), self._part_counter(part_rows),
                            by_key=table.keys.keyed, unknown=unknown)
        return out

    def lookup_pooled(self, name: str, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None = None,
                      mode: str = "sum", tier_rows: np.ndarray | None = None,
                      part_rows: np.ndarray | None = None, unknown: np.ndarray | None = None) -> np.ndarray:
        """[len(lengths), dim] float32: bag b pools the next lengths[b] rows of ids (sum, mean or max
        of weight * row; empty bags are zeros).  tier_rows, part_rows and unknown as for lookup."""
        table = self._get(name)
        ids, lengths, weights = self._check_pooling(ids, lengths, weights, mode)
        out = np.empty((lengths.size, table.dim), dtype=np.float32)
        table.native.pool(ids, lengths, weights, native.POOL_MODES[mode], out, _tier_counter(tier_rows),
                          self._part_counter(part_rows), by_key=table.keys.keyed, unknown=unknown)
        return out

    def pool_partials(self, name: str, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None = None,
                      mode: str = "sum", tier_rows: np.ndarray | None = None, part_rows: np.ndarray | None = None,
                      unknown: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each fabric part's partial of every bag (the device offload): (the parts with rows in the
        request, [len(parts), bags, dim] float32).  SUM and MEAN give partial sums (the total is
        divided by the bag's length afterwards), MAX partial maxima with -inf where a part has no row
        of the bag.  The ids are ordered by (part, bag) in C (et_partition) and pooled in one kernel
        call over parts x bags bags (et_partition hands back rows: a keyed table's ids are translated
        once).  tier_rows, part_rows and unknown as for lookup."""
        table = self._get(name)
        ids, lengths, weights = self._check_pooling(ids, lengths, weights, mode)
        nparts, bags = len(self.part_names), lengths.size
        order = np.empty_like(ids)
        part_lengths = np.empty(nparts * bags, dtype=np.int32)
        ordered_weights = None if weights is None else np.empty_like(weights)
        counts = self._part_counter(part_rows)
        counts = np.zeros(nparts, dtype=np.int64) if counts is None else counts
        table.native.partition(ids, lengths, weights, order, part_lengths, ordered_weights, counts,
                               by_key=table.keys.keyed, unknown=unknown)
        present = np.flatnonzero(counts)
        part_lengths = np.ascontiguousarray(part_lengths.reshape(nparts, bags)[present])
        out = np.empty((present.size * bags, table.dim), dtype=np.float32)
        table.native.pool(order, part_lengths.reshape(-1), ordered_weights,
                          native.POOL_MODES["max" if mode == "max" else "sum"], out, _tier_counter(tier_rows))
        partials = out.reshape(present.size, bags, table.dim)
        if mode == "max":
            partials[part_lengths == 0] = -np.inf
        return present, partials

    @staticmethod
    def _check_pooling(ids, lengths, weights, mode):
        ids = require(ids, "ids", np.int64, 1)
        lengths = require(lengths, "lengths", np.int32, 1)
        if weights is not None:
            weights = require(weights, "weights", np.float32, 1)
            if weights.size != ids.size:
                raise InvalidArgumentError(f"weights has {weights.size} entries but ids has {ids.size}")
        if mode not in native.POOL_MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(native.POOL_MODES)}; got {mode!r}")
        return ids, lengths, weights

    def _part_counter(self, part_rows: np.ndarray | None) -> np.ndarray | None:
        n = len(self.part_names)
        if part_rows is not None and (part_rows.dtype != np.int64 or part_rows.shape != (n,)):
            raise InvalidArgumentError(f"part_rows must be an int64 array of shape ({n},), got {part_rows.dtype} "
                                       f"{part_rows.shape}")
        return part_rows

    def write_rows(self, name: str, ids: np.ndarray, values: np.ndarray, mode: str = "assign",
                   scale: float = 1.0, planned: tuple[np.ndarray, np.ndarray] | None = None,
                   by_row: bool = False) -> int:
        """Stores values[i] at the row of ids[i] (assign: a later duplicate wins) or adds scale *
        values[i] (add: duplicates accumulate); values is [len(ids), dim] float32, or flat as it came
        off the wire.  ids are the table's keys: a managed table gives each new id a row (evicting its
        coldest unprotected id when full: KeyspaceFullError when every live id is protected, and
        nothing is written), a hashed one hashes them.  planned: (rows, fresh) a replayed record of a
        managed table logged, applied as they are.  by_row: the ids are rows of a dense, hashed or mapped
        table (an import of rows trained offline), in [0, num_rows).  Returns the table's new version.  A write waits
        while a restore replaces the tables and then applies to the restored table; one that waited
        for a table being dropped fails with NotFoundError and leaves no record."""
        return self._write_retrying(name, ids, values, mode, scale, planned, by_row)[0]

    def fill_rows(self, name: str, ids: np.ndarray, values: np.ndarray) -> tuple[int, int]:
        """Copies rows into a receiving table (create_table): assigns values[i] to row ids[i] only where
        no plain write has set that row, so that a copy never overwrites a newer write.  Returns (the
        table's version, the rows written)."""
        return self._write_retrying(name, ids, values, "assign", 1.0, None, False, fill=True)

    def _write_retrying(self, name: str, ids: np.ndarray, values: np.ndarray, mode: str, scale: float,
                        planned: tuple[np.ndarray, np.ndarray] | None, by_row: bool,
                        fill: bool = False) -> tuple[int, int]:
        while True:
            with self._lock:  # (a restore holds it until the restored tables are in place)
                table = self._get(name)
            done = self._write(table, ids, values, mode, scale, planned, by_row, fill)
            if done is not None:
                return done

    def _write(self, table: Table, ids: np.ndarray, values: np.ndarray, mode: str, scale: float,
               planned: tuple[np.ndarray, np.ndarray] | None, by_row: bool = False,
               fill: bool = False) -> tuple[int, int] | None:
        """write_rows (or fill_rows) on one table: (version, rows written); None when a restore replaced it
        before the write got its lock."""
        name = table.name
        ids = require(ids, "ids", np.int64, 1)
        if isinstance(values, np.ndarray) and values.ndim == 1:  # as it came off the wire
            if values.size != ids.size * table.dim:
                raise InvalidArgumentError(f"values has {values.size} floats; expected {ids.size} ids x dim "
                                           f"{table.dim} = {ids.size * table.dim} for table {name!r}")
            values = values.reshape(ids.size, table.dim)
        values = require(values, "values", np.float32, 2)
        if values.shape != (ids.size, table.dim):
            raise InvalidArgumentError(
                f"values has shape {values.shape}; expected ({ids.size}, {table.dim}) for {ids.size} ids")
        if mode not in WRITE_MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(WRITE_MODES)}; got {mode!r}")
        if not math.isfinite(scale):
            raise InvalidArgumentError(f"scale must be finite, got {scale}")
        if by_row and table.keys.managed:
            raise InvalidArgumentError(f"by_row applies to dense, hashed and mapped tables; table {name!r} is managed: "
                                       f"its rows belong to its ids (write by id)")
        if fill and (mode != "assign" or table.keys.keyed):
            raise InvalidArgumentError(f"fill copies rows into a dense table with mode assign; table {name!r} is "
                                       f"{table.keys.kind} and the mode {mode}")
        if by_row or not table.keys.keyed:
            self._check_ids(table, ids)
        # what an assignment stores must fit the table's dtype; an addition's increments must be finite
        codec.check_storable(values, table.dtype if mode == "assign" else "float32")
        with table.write_lock:
            if table.retired == "restored":
                return None
            table.check_live()
            if fill:
                if table.plain_written is None:
                    raise FailedPreconditionError(f"table {name!r} is not receiving a move (fill needs a table "
                                                  f"created with receiving, in this run of the daemon)")
                keep = (table.plain_written[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1 == 0
                ids, values = ids[keep], values[keep]
                if not ids.size:
                    return table.version, 0
            rows, fresh = planned if planned is not None else (ids, None) if by_row else self._plan(table, ids)
            if mode == "add":  # ... and so must the sums
                targets, data = self._added_rows(table, rows, fresh, values, scale)
                codec.check_storable(data, table.dtype, f"the sum of scale x values and table {name!r}", targets)
            else:
                targets, data = rows, values
            encoded = codec.encode(data, table.dtype, table.stride)
            # logged once nothing but the store itself can fail (an SCM write: a device error), with the
            # rows a managed table's ids take: a replay cannot choose them again (eviction follows heat)
            # One C call writes the record and the rows, unless a managed table's ids take their rows
            # in between, or the table has rows on SCM (the log's lock would be held for the device).
            fused = self.journal is not None and not table.keys.managed and not table.rows_by_tier[native.TIER_SCM]
            lsn = self.journal.log_write(name, table.generation, ids, values, mode, scale,
                                         (rows, fresh) if table.keys.managed else None, by_row,
                                         (table.native, targets, encoded) if fused else None) if self.journal else 0
            if table.keys.managed:
                self._take_rows(table, ids, rows, fresh)
            if not fused:
                table.native.write_rows(targets, encoded)
            self.mover.written(table, targets)
            if table.plain_written is not None and not fill:
                np.bitwise_or.at(table.plain_written, targets >> 3, (1 << (targets & 7)).astype(np.uint8))
            table.version += 1
            version = table.version
        if lsn:
            self.journal.wait(lsn)  # acknowledged once durable (group commit with concurrent writers)
        return version, ids.size

    def move_rows(self, name: str, ids: np.ndarray, tier: str) -> int:
        """Moves rows to a new home in tier (rows already there stay); returns how many moved.
        When the tier has room for only some, the first ones in the order given move.  Lookups
        running meanwhile see each row whole, in its old home or its new one; writes wait until
        the move is done."""
        table = self._get(name)
        ids = require(ids, "ids", np.int64, 1)
        ids = ids[np.sort(np.unique(ids, return_index=True)[1])]  # without duplicates, in the given order
        tier_ids = {t.name: t.tier_id for t in self.tiers}
        if tier not in tier_ids:
            raise InvalidArgumentError(f"tier must be one of {', '.join(tier_ids)}; got {tier!r}")
        if ids.size and (ids.min() < 0 or ids.max() >= table.num_rows):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise InvalidArgumentError(f"ids: {bad} is out of range [0, {table.num_rows}) for table {name!r}")
        return self.mover.move(table, ids, tier_ids[tier])

    def read_encoded(self, name: str, ids: np.ndarray) -> np.ndarray:
        """[len(ids), stride] uint8: the rows exactly as stored."""
        table = self._get(name)
        ids = require(ids, "ids", np.int64, 1)
        out = np.empty((ids.size, table.stride), dtype=np.uint8)
        table.native.read_rows(ids, out)
        return out

    @contextlib.contextmanager
    def frozen(self):
        """Holds off creations, drops, writes and moves of every table (a consistent snapshot);
        lookups go on.  Yields the table names."""
        while True:
            with self._lock:
                tables = sorted(self._tables.values(), key=lambda t: t.name)
            with contextlib.ExitStack() as stack:
                for table in tables:
                    stack.enter_context(table.write_lock)
                stack.enter_context(self._lock)
                if sorted(self._tables) == [t.name for t in tables]:  # none created or dropped meanwhile
                    yield [t.name for t in tables]
                    return

    def spec(self, name: str) -> dict:
        """What re-creates the table empty: its shape and tiering settings."""
        table = self._get(name)
        return {"name": name, "num_rows": table.user_rows, "dim": table.dim, "dtype": table.dtype,
                "generation": table.generation, **table.settings.to_dict(), **table.keys.to_dict()}

    def take_dirty(self, name: str) -> np.ndarray:
        """The table's rows written since the last call, as a bitmap (see NativeTable.take_dirty)."""
        return self._get(name).native.take_dirty()

    @staticmethod
    def _write_encoded(table: Table, ids: np.ndarray, rows: np.ndarray, batch_rows: int = 1 << 16) -> None:
        for first in range(0, ids.size, batch_rows):
            table.native.write_rows(np.ascontiguousarray(ids[first:first + batch_rows]),
                                    np.ascontiguousarray(rows[first:first + batch_rows]))

    def spread_ports(self, name: str, max_rows: int = 1 << 62, batch_rows: int = 8192) -> int:
        """Mover.spread_ports of a table by name."""
        return self.mover.spread_ports(self._get(name), max_rows, batch_rows)

    def port_balance(self, name: str) -> float:
        return self._get(name).port_balance()

    def parts_of(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The fabric part of each id's row (an index into part_names: dram, cxl ports, scm), int64."""
        table = self._get(name)
        ids = require(ids, "ids", np.int64, 1)
        self._check_ids(table, ids)
        return table.native.parts_of_locs(table.native.loc[ids])

    def keys_of(self, name: str) -> tuple[int, np.ndarray | None]:
        """(live rows, the id of each: a read-only view) of a managed table; (0, None) of another."""
        table = self._get(name)
        if not table.keys.managed:
            return 0, None
        keys = table.native.keys_of_rows
        return keys.size, keys

    def mapping_of(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A mapped table's mapping, (listed ids int64, their rows uint32) as read-only views in the
        order given; None for another table."""
        table = self._get(name)
        return table.native.mapping if table.keys.mapped else None

    def heat(self, name: str, writable: bool = False) -> np.ndarray:
        """The table's live access counters (a read-only view unless writable: the tiering policy ages them)."""
        view = self._get(name).native.heat.view()
        view.flags.writeable = writable
        return view

    def heat_histogram(self, name: str) -> dict[str, np.ndarray]:
        """Rows per heat bin (0, 1, 2-3, 4-7, ..., 128-255) for each home tier of a table."""
        table = self._get(name).native
        heat, tiers = table.heat, table.loc >> table.tier_shift
        bins = np.zeros(heat.size, dtype=np.int64)
        nonzero = heat > 0
        bins[nonzero] = np.floor(np.log2(heat[nonzero])).astype(np.int64) + 1
        counts = np.bincount(tiers.astype(np.int64) * HEAT_BINS + bins, minlength=3 * HEAT_BINS)
        return {t.name: counts[t.tier_id * HEAT_BINS:(t.tier_id + 1) * HEAT_BINS] for t in self.tiers}

    def decay_heat(self, name: str) -> None:
        """Ages a table's access counters: halves them (the tracker's epoch)."""
        heat = self._get(name).native.heat
        np.right_shift(heat, 1, out=heat)

    def placement(self, name: str) -> np.ndarray:
        """Home tier of every row (0 dram, 1 cxl, 2 scm)."""
        return self._get(name).placement()

    # ---- internals ---------------------------------------------------------

    def _get(self, name: str) -> Table:
        table = self._tables.get(name)
        if table is None:
            raise NotFoundError(f"table {name!r} does not exist")
        return table

    def _check_fits(self, name: str, need: int, pin: str) -> None:
        """TierFullError before anything is allocated for a table of need bytes the tiers (the
        pinned one) cannot hold even when empty."""
        tiers = [t for t in self.tiers if pin in ("", t.name)]
        capacity = sum(t.capacity_bytes for t in tiers)
        if need > capacity:
            where = f"tier {pin} (the table is pinned there)" if pin else "the tiers"
            raise TierFullError(f"table {name!r} needs about {need} bytes and {where} cannot hold it ({capacity} "
                                f"bytes in all)")

    @staticmethod
    def _check_new_table(name, num_rows, dim, dtype, initializer, init_scale, keys: KeySpace) -> None:
        if not isinstance(name, str) or not TABLE_NAME_RE.fullmatch(name):
            raise InvalidArgumentError(f"name must be 1-128 characters of [A-Za-z0-9_.-], got {name!r}")
        most = MAX_ROWS - 1 if keys.managed else MAX_ROWS  # (a managed table's default row is one more)
        if not isinstance(num_rows, int) or not 1 <= num_rows <= most:
            raise InvalidArgumentError(f"num_rows must be in [1, {most}], got {num_rows!r}")
        if not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
            raise InvalidArgumentError(f"dim must be in [1, {MAX_DIM}], got {dim!r}")
        if dtype not in native.DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {', '.join(native.DTYPES)}; got {dtype!r}")
        if initializer not in INITIALIZERS:
            raise InvalidArgumentError(f"initializer must be one of {', '.join(INITIALIZERS)}; got {initializer!r}")
        if keys.managed and initializer != "zeros":
            raise InvalidArgumentError(f"initializer = {initializer} applies to dense and hashed tables: a managed "
                                       f"table's rows start as its default row (default_value)")
        if not math.isfinite(init_scale) or init_scale < 0:
            raise InvalidArgumentError(f"init_scale must be finite and >= 0, got {init_scale}")

    def _initialize(self, table: Table, initializer: str, seed: int, scale: float) -> None:
        for start in range(0, table.num_rows, INIT_BATCH_ROWS):
            n = min(INIT_BATCH_ROWS, table.num_rows - start)
            if initializer == "zeros":  # (a managed table's rows start as its default row, what unknown ids read)
                values = np.full((n, table.dim), table.keys.default_value, dtype=np.float32)
            else:
                rng = np.random.default_rng([seed, start // INIT_BATCH_ROWS])
                values = rng.random((n, table.dim), dtype=np.float32)
                values *= np.float32(2 * scale)
                values -= np.float32(scale)
            ids = np.arange(start, start + n, dtype=np.int64)
            table.native.write_rows(ids, codec.encode(values, table.dtype, table.stride))

    @staticmethod
    def _check_ids(table: Table, ids: np.ndarray) -> None:
        bad = np.flatnonzero((ids < 0) | (ids >= table.num_rows))
        if bad.size:
            raise InvalidArgumentError(f"ids[{bad[0]}] = {ids[bad[0]]} is out of range [0, {table.num_rows}) "
                                       f"for table {table.name!r}")

    @staticmethod
    def _plan(table: Table, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(the row of each id, and for a managed table whether the id takes it now; None otherwise)."""
        if not table.keys.keyed:
            return ids, None
        rows, fresh = table.native.plan_keys(ids)
        return rows, fresh if table.keys.managed else None

    def _take_rows(self, table: Table, ids: np.ndarray, rows: np.ndarray, fresh: np.ndarray) -> None:
        """Makes rows[i] the row of ids[i] in a managed table's map (the ids that held rows a new
        id takes are evicted), counting evictions of ids written within the last hour.  The rows
        taken from evicted ids are first reset to the default row, so that no lookup running
        meanwhile reads an evicted id's values as the new id's (rows never used hold it already); the
        caller then writes the new values."""
        taken = np.sort(rows[fresh & (rows < table.native.keys_stats()["live"])])  # (np.unique: 10x slower)
        taken = taken[np.r_[True, taken[1:] != taken[:-1]]] if taken.size else taken
        if taken.size:
            default = np.full((taken.size, table.dim), table.keys.default_value, dtype=np.float32)
            table.native.write_rows(taken, codec.encode(default, table.dtype, table.stride))
        table.native.apply_keys(ids, rows)
        now = _minute()
        if taken.size:
            age = (now - table.written_minute[taken].astype(np.int64)) % (1 << 16)
            table.recent_evictions += int(np.count_nonzero(age < RECENT_MINUTES))
        table.written_minute[rows] = now

    def _added_rows(self, table: Table, rows: np.ndarray, fresh: np.ndarray | None, values: np.ndarray, scale: float):
        """(unique rows, current rows + scale * the sum of their values); a row an id takes now
        (fresh) starts from the default row, not from what the id it evicts left there."""
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]) if rows.size else np.array([], int)
        unique = np.ascontiguousarray(sorted_rows[starts])
        delta = np.add.reduceat(values[order], starts, axis=0) if rows.size else values
        stored = np.empty((unique.size, table.stride), dtype=np.uint8)
        table.native.read_rows(unique, stored)
        current = codec.decode(stored, table.dtype, table.dim)
        if fresh is not None:
            current[fresh[order][starts]] = np.float32(table.keys.default_value)
        current += np.float32(scale) * delta
        return unique, current

    def _info(self, table: Table) -> TableInfo:
        names = [t.name for t in self.tiers]
        bytes_by = {t.name: table.slots[t.tier_id].nbytes if t.tier_id in table.slots else 0 for t in self.tiers}
        nt = table.native
        chunk_table_entries = nt.chunk_parts.size  # one per chunk of each tier
        copies = table.scm_copy.nbytes + table.scm_dirty.nbytes if table.scm_copy is not None else 0
        metadata = nt.loc.nbytes + nt.heat.nbytes + 8 * (chunk_table_entries + nt.max_chunks) + copies
        keyed = nt.keys_stats() if table.keys.managed or table.keys.mapped else {}
        managed = keyed if table.keys.managed else {}
        return TableInfo(
            name=table.name, num_rows=table.user_rows, dim=table.dim, dtype=table.dtype,
            rows_by_tier=dict(zip(names, table.rows_by_tier)), bytes_by_tier=bytes_by,
            emulated_by_tier={t.name: t.emulated for t in self.tiers},
            metadata_bytes=metadata + nt.chunk_parts.nbytes, version=table.version,
            rows_by_port=dict(table.rows_by_port), key_space=table.keys.kind, key_seed=table.keys.seed,
            default_value=table.keys.default_value, live_ids=managed.get("live", 0),
            key_evictions=managed.get("evictions", 0), map_bytes=keyed.get("map_bytes", 0),
            unknown_ids=managed.get("unknown", 0), recent_key_evictions=table.recent_evictions,
            mapped_ids=keyed.get("live", 0) if table.keys.mapped else 0, mapping_hash_from=table.keys.hash_from)
