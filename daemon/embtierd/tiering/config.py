"""Settings of the tiering engine and of each table (its own module so that config and tiering
import it without a cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TableSettings:
    """How the engine treats one table.

    policy: "lfu" (LFU with aging) or "lru" (promote on access, evict the least recently used);
    pin: "" or a tier name: every row of the table lives there and the policy does not run;
    capacity_bytes: per memory tier, at most this many bytes of the table's rows (None = no
    limit of its own; the tier's capacity still holds).
    """

    policy: str = "lfu"
    pin: str = ""
    capacity_bytes: dict[str, int | None] = field(default_factory=lambda: {"dram": None, "cxl": None})

    def to_dict(self) -> dict:
        """The settings as JSON-ready fields (the write-ahead log and checkpoint manifests keep them so)."""
        return {"policy": self.policy, "pin": self.pin, "capacity_bytes": dict(self.capacity_bytes)}

    @classmethod
    def from_dict(cls, fields: dict) -> TableSettings:
        return cls(policy=fields["policy"], pin=fields["pin"], capacity_bytes=dict(fields["capacity_bytes"]))

    def limit_rows(self, tier: str, row_bytes: int) -> int | None:
        """The table's own row limit in a memory tier, None = none."""
        limit = self.capacity_bytes.get(tier)
        return None if limit is None else limit // row_bytes


@dataclass(frozen=True)
class TableGroup:
    """Tables that share memory (a tenant's): at most capacity_bytes of their rows, together, in each
    memory tier (None = no share there), given each interval to the group's hottest rows across its
    tables (tiering/groups.py)."""

    name: str
    tables: tuple[str, ...]
    capacity_bytes: dict[str, int | None] = field(default_factory=lambda: {"dram": None, "cxl": None})


@dataclass(frozen=True)
class TieringConfig:
    enabled: bool
    interval_seconds: float
    bandwidth_bytes_per_second: int  # migration budget: rows moved per interval x row bytes stays under it
    hysteresis: float                # LFU: a hot row replaces a cold one only when hotter by this factor
    aging_intervals: int = 4         # LFU: heat is halved every this many intervals
    policy: str = "lfu"              # the policy of tables that tables does not name
    tables: dict[str, TableSettings] = field(default_factory=dict)  # per-table settings by table name
    groups: tuple[TableGroup, ...] = ()  # tables sharing memory (the tenants with shares)

    def table_policy(self, name: str) -> TableSettings:
        return self.tables.get(name) or TableSettings(policy=self.policy)
