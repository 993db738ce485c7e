"""The set of tiers a store runs on, fastest first: new tables fill DRAM, then CXL, then SCM."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import Config
from .tier_memory import MemoryTier
from .tier_scm import ScmTier
from .topology import Topology, pick_cxl_node

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
    """Maps DRAM on the nodes with CPUs, CXL on a CPU-less node (or emulated), opens the SCM file."""
    cpu_nodes = list(topology.cpu_nodes)
    cxl_node = pick_cxl_node(topology, config.cxl.node)
    dram = MemoryTier("dram", config.dram.capacity_bytes, cpu_nodes, config.dram.huge_pages, emulated=False)
    if cxl_node is None:
        cxl = MemoryTier("cxl", config.cxl.capacity_bytes, cpu_nodes, config.cxl.huge_pages, emulated=True)
    else:
        cxl = MemoryTier("cxl", config.cxl.capacity_bytes, [cxl_node], config.cxl.huge_pages, emulated=False)
    scm = ScmTier(config.scm.capacity_bytes, config.scm.path, config.scm.read_align_bytes)
    tiers = Tiers(dram, cxl, scm)
    log.info("topology: %s", topology.describe())
    for tier in tiers:
        log.info("tier %s", tier.describe())
    return tiers
