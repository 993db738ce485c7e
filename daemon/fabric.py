"""The emulated CXL fabric of LookupPooled (PIFS-Rec, MICRO'24): ports, where
pooling happens, and what crosses each link.

Ports.  The CXL tier is one or more ports (devices): one per CPU-less NUMA
node on a host that has them, else fabric.cxl_ports emulated ones.  Which
port a CXL row is on is decided by heat ("embedding spreading"): after each
tiering interval the table's CXL rows, hottest first, are dealt to the ports
in snake order (0, 1, ..., P-1, P-1, ..., 0, 0, 1, ...), so that no port
gets the hot rows and the load stays even.  On an emulated tier a port is a
label (no bytes move); DRAM and SCM rows count as two more ports ("dram",
"scm") of the fabric: parts are dram, cxl0 .. cxl<P-1>, scm.

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

from .config import FabricConfig


def part_names(ports: int) -> list[str]:
    """Names of the fabric's parts: dram, cxl0 .. cxl<ports-1>, scm."""
    return ["dram", *(f"cxl{p}" for p in range(ports)), "scm"]


def spread(heat: np.ndarray, in_cxl: np.ndarray, ports: int, out: np.ndarray, first: int = 0) -> None:
    """Assigns the CXL rows (in_cxl) to ports by heat, hottest first, in snake order; writes
    out[row] = first + port for those rows (uint8), leaves the others."""
    rows = np.flatnonzero(in_cxl)
    if not rows.size:
        return
    order = rows[np.argsort(heat[rows], kind="stable")[::-1]]
    cycle, position = np.divmod(np.arange(order.size), ports)
    out[order] = (first + np.where(cycle % 2 == 0, position, ports - 1 - position)).astype(np.uint8)


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


def bags_of(lengths: np.ndarray) -> np.ndarray:
    """The bag of each id position (int64)."""
    return np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)


def partial_pools(pool, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, mode: str,
                  parts: np.ndarray, nparts: int) -> tuple[list[int], np.ndarray]:
    """Device mode: per part with rows in the request, its partial over each bag (pool(ids, lengths,
    weights, mode) -> [bags, dim], called once per part).  SUM and MEAN give partial sums (the total
    is divided by the bag's length afterwards), MAX partial maxima with -inf where the part has no row
    of the bag.  Returns (the parts, [len(parts), bags, dim] float32)."""
    bag = bags_of(lengths)
    present = np.flatnonzero(np.bincount(parts, minlength=nparts))
    out = []
    for part in present:
        mine = parts == part
        sub_lengths = np.bincount(bag[mine], minlength=lengths.size).astype(np.int32)
        partial = pool(np.ascontiguousarray(ids[mine]), sub_lengths,
                       None if weights is None else np.ascontiguousarray(weights[mine]),
                       "max" if mode == "max" else "sum")
        if mode == "max":
            partial[sub_lengths == 0] = -np.inf
        out.append(partial)
    dim_shape = out[0].shape if out else (lengths.size, 0)
    return present.tolist(), np.stack(out) if out else np.zeros((0, *dim_shape), dtype=np.float32)
