"""Prometheus metrics of the daemon.

Counters on the request path are bumped once per request (never per row);
state owned by the store (tier capacity and use, rows per table and tier)
and process figures (psutil) are read by a collector at scrape time.
Names: `embtier_` prefix, base units, `_total` on counters, low-cardinality
labels (method, code, table, tier).

The series of a table (label table=) live as long as the table: those
counted here are forgotten once the store no longer has it (after DropTable,
after RestoreCheckpoint replaced the tables, and at each tiering interval),
and a count that arrives for a table already gone makes no new series.
"""

from __future__ import annotations

import contextlib
import os
import threading

import psutil
from embtier.v1 import embtier_pb2 as pb
from embtier.wire import CHECKPOINT_KINDS, TIERS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from embtierd import __version__, native
from embtierd.errors import NotFoundError

MODELLED_BUCKETS = (1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class StoreCollector:
    """Tier and table state, read from the store when Prometheus scrapes."""

    def __init__(self, store):
        self.store = store
        self.process = psutil.Process(os.getpid())

    def collect(self):
        capacity = GaugeMetricFamily("embtier_tier_capacity_bytes", "Capacity of each tier.", labels=["tier"])
        used = GaugeMetricFamily("embtier_tier_used_bytes", "Bytes of each tier holding table rows.",
                                 labels=["tier"])
        emulated = GaugeMetricFamily("embtier_tier_emulated", "1 when the tier is emulated (CXL in DRAM).",
                                     labels=["tier"])
        for t in self.store.tier_infos():
            capacity.add_metric([t.name], t.capacity_bytes)
            used.add_metric([t.name], t.used_bytes)
            emulated.add_metric([t.name], int(t.emulated))
        port_capacity = GaugeMetricFamily("embtier_fabric_port_capacity_bytes", "Capacity of each CXL port (a "
                                          "CPU-less NUMA node, or an emulated segment: numa_node -1).",
                                          labels=["port", "numa_node"])
        port_used = GaugeMetricFamily("embtier_fabric_port_used_bytes", "Bytes of each CXL port holding rows.",
                                      labels=["port"])
        for p in self.store.port_infos():
            port_capacity.add_metric([p.name, str(p.numa_node)], p.capacity_bytes)
            port_used.add_metric([p.name], p.used_bytes)
        rows = GaugeMetricFamily("embtier_table_rows", "Rows of each table whose home is each tier.",
                                 labels=["table", "tier"])
        metadata = GaugeMetricFamily("embtier_table_metadata_bytes", "Placement map, counters and chunk tables.",
                                     labels=["table"])
        ports = GaugeMetricFamily("embtier_table_port_rows", "CXL rows of each table on each fabric port "
                                  "(spread by heat each tiering interval).", labels=["table", "port"])
        keys = GaugeMetricFamily("embtier_table_keys", "Ids with a row in each managed table.", labels=["table"])
        map_bytes = GaugeMetricFamily("embtier_table_key_map_bytes", "Bytes of each managed table's id -> row map.",
                                      labels=["table"])
        evictions = CounterMetricFamily("embtier_key_evictions", "Ids each managed table evicted to give their row "
                                        "to a new id.", labels=["table"])
        recent = CounterMetricFamily("embtier_key_recent_evictions", "Evictions of ids written within the hour "
                                     "before, by managed table (a table too small for its live ids).",
                                     labels=["table"])
        unknown = CounterMetricFamily("embtier_unknown_ids", "Ids lookups found no row for (each read the default "
                                      "row), by managed table.", labels=["table"])
        for info in self.store.tables():
            for tier, count in info.rows_by_tier.items():
                rows.add_metric([info.name, tier], count)
            for port, count in info.rows_by_port.items():
                ports.add_metric([info.name, port], count)
            metadata.add_metric([info.name], info.metadata_bytes)
            if info.key_space == "managed":
                keys.add_metric([info.name], info.live_ids)
                map_bytes.add_metric([info.name], info.map_bytes)
                evictions.add_metric([info.name], info.key_evictions)
                recent.add_metric([info.name], info.recent_key_evictions)
                unknown.add_metric([info.name], info.unknown_ids)
        scm_read_errors = CounterMetricFamily("embtier_scm_read_errors", "Reads of rows from the SCM file that "
                                              "failed (device errors: each failed the request that needed the "
                                              "row), by table.", labels=["table"])
        for table in self.store.handles():
            scm_read_errors.add_metric([table.name], table.native.scm_read_errors()[0])
        rss = GaugeMetricFamily("embtier_process_resident_memory_bytes", "Resident memory of the daemon.")
        rss.add_metric([], self.process.memory_info().rss)
        available = GaugeMetricFamily("embtier_system_memory_available_bytes", "Memory available on the host.")
        available.add_metric([], psutil.virtual_memory().available)
        info = InfoMetricFamily("embtier_build", "Build of the daemon.")
        info.add_metric([], {"version": __version__, "isa": native.isa(),
                             "scm_io": "aio" if native.scm_async() else "pread"})
        yield from (capacity, used, emulated, port_capacity, port_used, rows, ports, metadata, keys, map_bytes,
                    evictions, recent, unknown, scm_read_errors, rss, available, info)


class WalCollector:
    def __init__(self, wal):
        self.wal = wal

    def collect(self):
        yield CounterMetricFamily("embtier_wal_bytes", "Bytes appended to the write-ahead log since start.",
                                  value=self.wal.bytes_written)
        yield GaugeMetricFamily("embtier_wal_durable_lsn", "The last log sequence number known durable.",
                                value=self.wal.durable_lsn)


TENANT_OUTCOMES = ("met", "missed", "refused_deadline", "shed", "refused_in_flight", "refused_queue_full",
                   "cancelled", "failed")


class Metrics:
    def __init__(self, store, registry: CollectorRegistry | None = None):
        self.store = store
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("embtier_requests", "Requests by method and status code.", ["method", "code"],
                                registry=r)
        self.latency = Histogram("embtier_request_duration_seconds", "Time to serve a request, by method.",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.auth_denied = Counter("embtier_auth_denied", "Calls refused for their role ([auth]), by method.",
                                   ["method"], registry=r)
        self.rows_served = Counter("embtier_rows_served", "Rows gathered for lookups, by table and tier.",
                                   ["table", "tier"], registry=r)
        self.gathered_bytes = Counter("embtier_gathered_bytes", "Row bytes gathered from the tiers, by method.",
                                      ["method"], registry=r)
        self.wire_bytes = Counter("embtier_wire_bytes", "Bytes of values returned on the wire, by method.",
                                  ["method"], registry=r)
        self.migrations = Counter("embtier_migrations", "Rows moved between tiers, by direction.", ["from", "to"],
                                  registry=r)
        self.migrated_bytes = Counter("embtier_migrated_bytes", "Row bytes copied by the tiering engine (moves "
                                      "between tiers and between CXL ports).", registry=r)
        self.port_moves = Counter("embtier_fabric_port_moved_rows", "Rows copied to level the heat of a table's "
                                  "CXL rows over the fabric ports (three copies per trade), by table.", ["table"],
                                  registry=r)
        self.port_balance = Gauge("embtier_fabric_port_balance_ratio", "Heat of the busiest CXL port / the mean "
                                  "port's, by table, after the last tiering interval (1 = even).", ["table"],
                                  registry=r)
        self.tiering_seconds = Histogram("embtier_tiering_interval_duration_seconds",
                                         "Time one tiering interval (plan and moves) took.", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.backlog = Gauge("embtier_migration_backlog_rows",
                             "Moves the tiering plan wanted in its last interval but the bandwidth budget deferred, "
                             "by table.", ["table"], registry=r)
        self.wal_fsync_seconds = Histogram("embtier_wal_fsync_duration_seconds",
                                           "Time one fsync of the write-ahead log took.", buckets=LATENCY_BUCKETS,
                                           registry=r)
        self.checkpoint_bytes = Counter("embtier_checkpoint_bytes", "Bytes written by checkpoints.", registry=r)
        self.checkpoint_rows = Counter("embtier_checkpoint_rows", "Rows written by checkpoints.", registry=r)
        self.checkpoint_seconds = Histogram("embtier_checkpoint_duration_seconds", "Time one checkpoint took.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.checkpoint_last = Gauge("embtier_checkpoint_last_success_timestamp_seconds",
                                     "When the last checkpoint was published (Unix time).", registry=r)
        self.checkpoints = Counter("embtier_checkpoints", "Checkpoints published, by kind (FULL, INCREMENTAL, "
                                   "DIFFERENTIAL) and quantization bits (0 = exact).", ["kind", "quant_bits"],
                                   registry=r)
        self.checkpoint_failures = Counter("embtier_checkpoint_failures", "Scheduled checkpoints that failed.",
                                           registry=r)
        self.fabric_bytes = Counter("embtier_fabric_bytes", "Bytes LookupPooled moved across the emulated fabric, "
                                    "by offload mode and link (a port's link to the switch, or \"host\").",
                                    ["offload", "link"], registry=r)
        self.fabric_modelled = Histogram("embtier_fabric_modelled_transfer_seconds",
                                         "MODELLED (not measured) fabric transfer time of one LookupPooled, from "
                                         "the configured link bandwidths and hop latencies.", ["offload"],
                                         buckets=MODELLED_BUCKETS, registry=r)
        self.restore_seconds = Gauge("embtier_restore_duration_seconds",
                                     "Time the last start took to replay the write-ahead log.", registry=r)
        self.tenant_requests = Counter(
            "embtier_tenant_requests", "Lookups (Lookup, LookupPooled) by tenant and how they ended: met (answered "
            "by their deadline), missed (answered after it), refused_deadline (predicted to miss it: refused before "
            "running), shed (could no longer end in time when their turn came), refused_in_flight (the tenant's "
            "max_in_flight), refused_queue_full, cancelled (the call ended while queued), failed (an error).",
            ["tenant", "outcome"], registry=r)
        self.tenant_queue_seconds = Histogram("embtier_tenant_queue_seconds", "Time lookups that ran waited in "
                                              "the scheduler's queue, by tenant.", ["tenant"],
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.tenant_service_seconds = Histogram("embtier_tenant_service_seconds", "Time lookups took to run once "
                                                "taken from the queue, by tenant.", ["tenant"],
                                                buckets=LATENCY_BUCKETS, registry=r)
        self.scheduler_queued = Gauge("embtier_scheduler_queued", "Lookups waiting in the scheduler's queue.",
                                      registry=r)
        r.register(StoreCollector(store))
        self._tables_lock = threading.Lock()  # a table's series are counted, or forgotten, one at a time
        self._counted_tables: set[str] = set()  # the tables that have series here

    def _live(self, table: str) -> bool:
        """Whether the store still has table, which then has series here.  Called holding
        _tables_lock, and nothing is counted for a table gone: forget_gone_tables, which runs after
        the store dropped it, has the last word."""
        try:
            self.store.geometry(table)
        except NotFoundError:
            return False
        self._counted_tables.add(table)
        return True

    def forget_gone_tables(self) -> None:
        """Removes every series of each table the store no longer has."""
        with self._tables_lock:
            live = {t.name for t in self.store.handles()}
            for table in self._counted_tables - live:
                for tier in TIERS:
                    with contextlib.suppress(KeyError):
                        self.rows_served.remove(table, tier)
                for metric in (self.port_moves, self.port_balance, self.backlog):
                    with contextlib.suppress(KeyError):
                        metric.remove(table)
            self._counted_tables &= live

    def tenants(self, names) -> None:
        """Starts every outcome series of each configured tenant at 0 (so that rates exist from the start)."""
        for name in names:
            for outcome in TENANT_OUTCOMES:
                self.tenant_requests.labels(name, outcome)

    def tenant_outcome(self, tenant: str, outcome: str, queue_seconds: float, service_seconds: float) -> None:
        """How one lookup ended (a TENANT_OUTCOMES name); the times of one that ran."""
        self.tenant_requests.labels(tenant, outcome).inc()
        if outcome in ("met", "missed", "failed"):
            self.tenant_queue_seconds.labels(tenant).observe(queue_seconds)
            self.tenant_service_seconds.labels(tenant).observe(service_seconds)

    def migrated(self, moved: dict[tuple[str, str], int], moved_bytes: int) -> None:
        """Counts the moves of one table's interval, by (from, to) tier."""
        for (src, dst), n in moved.items():
            self.migrations.labels(src, dst).inc(n)
        self.migrated_bytes.inc(moved_bytes)

    def ports_balanced(self, table: str, rows_copied: int, balance: float) -> None:
        """One table's port levelling in an interval: rows copied, busiest port / mean after."""
        with self._tables_lock:
            if self._live(table):
                self.port_moves.labels(table).inc(rows_copied)
                self.port_balance.labels(table).set(balance)

    def tiering_interval(self, seconds: float, backlog_rows: dict[str, int]) -> None:
        self.tiering_seconds.observe(seconds)
        with self._tables_lock:
            for table, rows in backlog_rows.items():
                if self._live(table):
                    self.backlog.labels(table).set(rows)
        self.forget_gone_tables()

    def wal_fsync(self, seconds: float) -> None:
        self.wal_fsync_seconds.observe(seconds)

    def checkpointed(self, info) -> None:
        self.checkpoint_bytes.inc(info.bytes_written)
        self.checkpoint_rows.inc(info.rows_written)
        self.checkpoint_seconds.observe(info.duration_seconds)
        self.checkpoint_last.set_to_current_time()
        self.checkpoints.labels(pb.CheckpointKind.Name(CHECKPOINT_KINDS[info.kind]), str(info.quant_bits)).inc()

    def checkpoint_failed(self) -> None:
        self.checkpoint_failures.inc()

    def fabric(self, traffic, modelled_seconds: float) -> None:
        """Counts one LookupPooled's fabric traffic (fabric.Traffic) and its modelled time."""
        for link, n in traffic.device_link_bytes.items():
            self.fabric_bytes.labels(traffic.offload, link).inc(n)
        self.fabric_bytes.labels(traffic.offload, "host").inc(traffic.host_link_bytes)
        self.fabric_modelled.labels(traffic.offload).observe(modelled_seconds)

    def restored(self, seconds: float) -> None:
        self.restore_seconds.set(seconds)

    def watch_wal(self, wal) -> None:
        """Exports the log's size at scrape time."""
        self.registry.register(WalCollector(wal))

    def served(self, method: str, table: str, tier_rows, row_bytes: int, wire_bytes: int) -> None:
        """Counts one lookup: tier_rows[i] rows from tier i, row_bytes each; wire_bytes sent back."""
        total = int(sum(tier_rows))
        with self._tables_lock:
            if self._live(table):
                for tier, count in zip(TIERS, tier_rows):
                    if count:
                        self.rows_served.labels(table, tier).inc(int(count))
        self.gathered_bytes.labels(method).inc(total * row_bytes)
        self.wire_bytes.labels(method).inc(wire_bytes)
