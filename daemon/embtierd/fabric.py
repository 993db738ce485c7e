"""The emulated CXL fabric of LookupPooled (PIFS-Rec, MICRO'24): ports, where
pooling happens, and what crosses each link.

Ports.  The CXL tier is one or more ports (devices): one per CPU-less NUMA
node on a host that has them, else fabric.cxl_ports emulated ones; each
port is a segment of the tier's memory (bound to its node), so a row's port
is where its bytes are.  Rows are spread over the ports by heat so that hot
rows do not pile onto one device ("embedding spreading"): rows arriving in
the CXL tier are dealt to the ports by water-filling their heat over the
ports' loads (deal), and after each tiering interval, when the busiest
port's load (the heat of its rows) is more than fabric.rebalance_tolerance
above the mean, hot rows of busy ports trade places with cold rows of idle
ones (rebalance; the rows really move, within the migration budget).  DRAM
and SCM rows count as two more parts of the fabric: parts are dram,
cxl0 .. cxl<P-1>, scm.

Offload modes (the `offload` of a request, else fabric.offload):
  host    every row of the request crosses the port links and the host link;
          the client pools (Pond: the host pulls the rows);
  device  each port pools its own rows; one partial per port with rows in
          the request crosses its link and the host link; the client adds
          them (BEACON-like: processing in each device);
  switch  ports pool, the switch adds the partials: one pooled vector per
          bag crosses the host link (PIFS).

Accounting (per request, and in metrics): bytes on each port's link to the
switch and on the switch's link to the host, from the request's own row
counts per port: host mode moves rows x row bytes (stored encoding) on the
port links and rows x dim x wire bytes on the host link; device and switch
modes move bags x dim x 4 (a float32 partial) per port with rows, and on
the host link parts x bags x dim x wire bytes (device) or bags x dim x wire
bytes (switch).  The time is modelled from the configured link bandwidths
and hop latencies: hop + the slowest port link + hop + the host link
(store and forward).  Modelled figures are labelled so everywhere; they are
never mixed with measured ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from embtierd.config import FabricConfig


def part_names(ports: int) -> list[str]:
    """Names of the fabric's parts: dram, cxl0 .. cxl<ports-1>, scm."""
    return ["dram", *(f"cxl{p}" for p in range(ports)), "scm"]


def _water_fill(load: np.ndarray, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ports from the least loaded up, the cumulative heat each can take before all are level):
    how heat (sorted hottest first) is poured into ports with the given loads."""
    order = np.argsort(load, kind="stable")
    level_load = load[order]
    total = float(heat.sum())
    k = np.arange(1, load.size + 1)
    levels = (total + np.cumsum(level_load)) / k  # the common level if the k least loaded ports take it all
    filled = int(np.flatnonzero((levels >= level_load) & np.r_[levels[:-1] <= level_load[1:], True])[0]) + 1
    share = np.maximum(0.0, levels[filled - 1] - level_load)
    return order, np.cumsum(share)


def deal(heat: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Ports for rows arriving in the CXL tier, given their heat and the ports' loads: rows with
    heat are poured hottest first into the least loaded ports until the loads are as level as they
    can get; rows without heat go round robin, in their order.  Returns the port of each row (int64)."""
    ports = np.empty(heat.size, dtype=np.int64)
    order = np.argsort(heat, kind="stable")[::-1]
    warm = int(np.count_nonzero(heat))
    if warm:
        h = heat[order[:warm]].astype(np.float64)
        by_load, bounds = _water_fill(load.astype(np.float64), h)
        middle = np.cumsum(h) - h / 2
        ports[order[:warm]] = by_load[np.minimum(np.searchsorted(bounds, middle, side="right"), load.size - 1)]
    ports[np.sort(order[warm:])] = np.arange(heat.size - warm) % load.size
    return ports


def port_loads(heat: np.ndarray, port: np.ndarray, ports: int) -> np.ndarray:
    """Heat on each port (float64), from the heat and port of its rows."""
    return np.bincount(port, weights=heat, minlength=ports)[:ports].astype(np.float64)


def rebalance(heat: np.ndarray, port: np.ndarray, ports: int, tolerance: float,
              max_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Trades that level the ports' loads: (hot, cold) index arrays into heat/port, as many of each;
    hot[i] (on a port loaded above the mean) moves to port[cold[i]] and cold[i] (the coldest rows of
    a port below the mean) to port[hot[i]], so that every port keeps its row count.  Nothing when
    the busiest port is within tolerance of the mean.  The hot rows chosen on a busy port are its
    hottest that still fit in its excess over the mean; the most useful trades come first."""
    none = np.empty(0, dtype=np.int64)
    load = port_loads(heat, port, ports)
    mean = load.mean()
    if max_pairs <= 0 or mean <= 0 or load.max() <= (1 + tolerance) * mean:
        return none, none
    excess = load - mean
    by_port = np.lexsort((-heat.astype(np.int64), port))  # rows grouped by port, hottest first
    starts = np.searchsorted(port[by_port], np.arange(ports + 1))
    hot = []
    for p in np.flatnonzero(excess > 0):
        rows = by_port[starts[p]:starts[p + 1]]
        h = heat[rows].astype(np.float64)
        fits = rows[(h > 0) & (h <= excess[p])]
        hot.append(fits[np.cumsum(heat[fits].astype(np.float64)) <= excess[p]])
    hot = np.concatenate(hot) if hot else none
    hot = hot[np.argsort(heat[hot], kind="stable")[::-1]][:max_pairs]
    deficit = np.maximum(0.0, mean - load)
    light = np.flatnonzero(deficit > 0)
    h = heat[hot].astype(np.float64)
    slot = np.searchsorted(np.cumsum(deficit[light]), np.cumsum(h) - h / 2, side="right")
    keep = slot < light.size
    hot, target = hot[keep], light[slot[keep]]
    pairs_hot, pairs_cold = [], []
    for q in np.unique(target):
        going = hot[target == q]
        coldest = by_port[starts[q]:starts[q + 1]][::-1][:going.size]  # (grouped hottest first)
        pairs_hot.append(going[:coldest.size])
        pairs_cold.append(coldest)
    if not pairs_hot:
        return none, none
    return np.concatenate(pairs_hot).astype(np.int64), np.concatenate(pairs_cold).astype(np.int64)


@dataclass
class Traffic:
    """Bytes one request (or a sum of them) moved on each link, by offload mode."""

    offload: str
    device_link_bytes: dict[str, int] = field(default_factory=dict)
    host_link_bytes: int = 0

    def add_table(self, names: list[str], rows_per_part: np.ndarray, bags: int, dim: int, row_bytes: int,
                  wire_item_bytes: int) -> None:
        """Adds one table's share: rows_per_part[i] rows of the request live on part names[i]."""
        used = rows_per_part > 0
        if self.offload == "host":
            port = rows_per_part * row_bytes
            self.host_link_bytes += int(rows_per_part.sum()) * dim * wire_item_bytes
        else:
            port = used * (bags * dim * 4)
            parts = int(used.sum()) if self.offload == "device" else 1
            self.host_link_bytes += parts * bags * dim * wire_item_bytes
        for name, n in zip(names, port):
            if n:
                self.device_link_bytes[name] = self.device_link_bytes.get(name, 0) + int(n)

    def modelled_seconds(self, config: FabricConfig) -> float:
        """Transfer time on the modelled links: hop, the slowest port link, hop, the host link."""
        slowest = max(self.device_link_bytes.values(), default=0) / config.device_link_bytes_per_second
        hops = 2 * config.hop_latency_ns * 1e-9
        return hops + slowest + self.host_link_bytes / config.host_link_bytes_per_second
