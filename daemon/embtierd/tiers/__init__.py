"""The set of tiers a store runs on, fastest first: new tables fill DRAM, then CXL, then SCM.

A CXL tier emulated in DRAM can be given an injected latency per row
(tiers.cxl.emulated_latency_ns), kept on the tier as injected_latency_ns
for the tables placed on it; real tiers get 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from embtierd.config import Config
from embtierd.tiers.tier_memory import MemoryTier, PortSpec
from embtierd.tiers.tier_scm import ScmTier
from embtierd.topology import Topology, pick_cxl_nodes

log = logging.getLogger(__name__)


@dataclass
class Tiers:
    dram: MemoryTier
    cxl: MemoryTier
    scm: ScmTier

    def __iter__(self):
        return iter((self.dram, self.cxl, self.scm))

    def close(self) -> None:
        for tier in self:
            tier.close()


def open_tiers(config: Config, topology: Topology) -> Tiers:
    """Maps DRAM on the nodes with CPUs, CXL with one port per CPU-less node (or emulated ports in
    DRAM), opens the SCM file."""
    cpu_nodes = list(topology.cpu_nodes)
    cxl_nodes = pick_cxl_nodes(topology, config.cxl.nodes)
    dram = MemoryTier("dram", config.dram.capacity_bytes, [PortSpec(cpu_nodes)], config.dram.huge_pages,
                      emulated=False)
    if not cxl_nodes:
        cxl = MemoryTier("cxl", config.cxl.capacity_bytes, [PortSpec(cpu_nodes)] * config.fabric.cxl_ports,
                         config.cxl.huge_pages, emulated=True)
    else:
        # each node a port, its share of the capacity in proportion to its memory (equal shares when
        # a configured node does not report its size)
        sizes = [topology.node(n).mem_total_bytes for n in cxl_nodes]
        ports = [PortSpec([n], size if min(sizes) > 0 else 1, n) for n, size in zip(cxl_nodes, sizes)]
        cxl = MemoryTier("cxl", config.cxl.capacity_bytes, ports, config.cxl.huge_pages, emulated=False)
    dram.injected_latency_ns = 0
    cxl.injected_latency_ns = injected_latency_ns(config, cxl)
    scm = ScmTier(config.scm.capacity_bytes, config.scm.path, config.scm.read_align_bytes)
    tiers = Tiers(dram, cxl, scm)
    log.info("topology: %s", topology.describe())
    for tier in tiers:
        log.info("tier %s", tier.describe())
    if cxl.injected_latency_ns:
        log.info("tier cxl: injected latency %d ns per row served by a lookup (serialised per row: an upper "
                 "bound of the latency effect)", cxl.injected_latency_ns)
    return tiers


def injected_latency_ns(config: Config, cxl: MemoryTier) -> int:
    """tiers.cxl.emulated_latency_ns when the CXL tier is emulated in DRAM, else 0 (real CXL has its own)."""
    latency_ns = config.cxl.emulated_latency_ns
    if latency_ns and not cxl.emulated:
        log.warning("tiers.cxl.emulated_latency_ns = %d ignored: the CXL tier is real memory on NUMA node(s) %s",
                    latency_ns, ",".join(map(str, cxl.nodes)))
        return 0
    return latency_ns
