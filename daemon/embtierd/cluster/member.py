"""A daemon's membership of a cluster (coordination in etcd: embtier.cluster.coord).

At start the daemon measures how fast it gathers and pools rows from each tier, takes a lease
and registers under /embtier/<cluster>/nodes/<node id>: its address, a new incarnation, its
tiers' capacities and rates.  A thread renews the lease every third of its period and follows
the current plan: a newer version is taken up by the fence (which waits for requests routed by
older plans to finish) and then reported in the registration, which is how a move knows every
daemon has taken up the plan that dual-writes a shard.

etcd unreachable: the daemon keeps serving by the last plan it took up, and keeps trying.  A
lease that expired meanwhile is replaced by a new one; the daemon keeps its incarnation unless a
client recorded a write that skipped it (coord.py: the node was out of the live set and writes
went on without it), and then takes a NEW incarnation: the plan's replicas name the incarnation
they were filled in, so its copies count again only after a later plan fills them anew.  An orderly shutdown revokes the lease: the daemon leaves the live set at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
from embtier.cluster.coord import Coordination, CoordinationUnavailable, NodeInfo

from embtierd.cluster.fence import PlanFence
from embtierd.config import ClusterConfig

log = logging.getLogger(__name__)

PROBE_ROW_BYTES = 256      # the rows the rate probe gathers (64 float32 columns)
PROBE_BLOCK = 4096         # an SCM read


def memory_pool_rate(seconds: float = 0.05, nbytes: int = 64 << 20) -> float:
    """Bytes per second of 256-byte rows gathered at random from nbytes of memory and summed."""
    table = np.ones((nbytes // PROBE_ROW_BYTES, PROBE_ROW_BYTES // 4), dtype=np.float32)
    rng = np.random.default_rng(0)
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ids = rng.integers(0, table.shape[0], 32768)
        table[ids].sum(axis=0)
        rows += ids.size
    return rows * PROBE_ROW_BYTES / (time.perf_counter() - start)


def scm_pool_rate(directory: Path, seconds: float = 0.05, nbytes: int = 16 << 20) -> float:
    """Bytes per second of 256-byte rows read one per 4 KiB O_DIRECT block at random from a scratch file
    in directory (written first, so that the reads reach the device), 0 when O_DIRECT is refused."""
    path = directory / f".rate-probe-{os.getpid()}"
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(nbytes))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        path.unlink(missing_ok=True)
        return 0.0
    try:
        import mmap
        buf = mmap.mmap(-1, PROBE_BLOCK)
        rng = np.random.default_rng(0)
        reads, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for block in rng.integers(0, nbytes // PROBE_BLOCK, 64):
                os.preadv(fd, [buf], int(block) * PROBE_BLOCK)
            reads += 64
        return reads * PROBE_ROW_BYTES / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


class Membership:
    """The daemon's registration and its following of the plan (see the module's doc)."""

    def __init__(self, config: ClusterConfig, address: str, capacity: dict[str, int], used, rates: dict[str, float],
                 fence: PlanFence):
        self.config = config
        self.coord = Coordination(config.name, config.endpoints)
        self.fence = fence
        self._used = used  # () -> bytes used per tier
        self.info = NodeInfo(id=config.node_id or socket.gethostname(), address=address, incarnation="",
                             capacity_bytes=capacity, pool_bytes_per_second=rates,
                             lease_seconds=float(config.lease_seconds))
        self._lease = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _register(self) -> None:
        """A new lease; the same incarnation when no write skipped this node meanwhile, else a new one."""
        self._lease = self.coord.grant(self.config.lease_seconds)
        self.info = replace(self.info, used_bytes=self._used())
        if not self.info.incarnation or not self.coord.register_unless_missed(self.info, self._lease):
            if self.info.incarnation:
                log.warning("cluster %s: writes went on without this node while it was out: registering a new "
                            "incarnation (its copies count again once a plan refills them)", self.config.name)
            self.info = replace(self.info, incarnation=uuid.uuid4().hex[:12])
            self.coord.register(self.info, self._lease)
        log.info("cluster %s: registered as node %s (incarnation %s) at %s, lease %d s", self.config.name,
                 self.info.id, self.info.incarnation, self.info.address, self.config.lease_seconds)

    def _follow_plan(self) -> None:
        version = self.coord.current_version()
        if version > self.fence.version:
            self.fence.advance(version)
            log.info("cluster %s: plan version %d taken up", self.config.name, version)
        if self.info.plan_version != self.fence.version:
            self._update(plan_version=self.fence.version)

    def _update(self, **changes) -> None:
        """Re-puts the registration (the same lease) with changes and the tiers' use now."""
        self.info = replace(self.info, used_bytes=self._used(), **changes)
        self.coord.register(self.info, self._lease)

    def _step(self) -> None:
        if self._lease is None or self.coord.refresh(self._lease) <= 0:
            if self._lease is not None:
                log.warning("cluster %s: the lease expired; registering anew", self.config.name)
            self._register()
        elif self._used() != self.info.used_bytes:
            self._update()  # the planner reads what each daemon has free
        self._follow_plan()

    def start(self) -> None:
        try:
            self._step()
        except CoordinationUnavailable as e:
            log.warning("cluster %s: %s; serving without a plan until it answers", self.config.name, e)
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = max(0.2, self.config.lease_seconds / 3)
        poll = min(period, 0.25)
        renewed = time.monotonic()
        unreachable = False
        while not self._stop.wait(poll):
            try:
                if time.monotonic() - renewed >= period or self._lease is None:
                    self._step()
                    renewed = time.monotonic()
                else:
                    self._follow_plan()
                if unreachable:
                    log.info("cluster %s: etcd answers again", self.config.name)
                unreachable = False
            except CoordinationUnavailable as e:
                if not unreachable:
                    log.warning("cluster %s: %s; serving by plan version %d", self.config.name, e, self.fence.version)
                unreachable = True
            except Exception:
                log.exception("cluster %s: membership step failed", self.config.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lease is not None:
            try:
                self.coord.revoke(self._lease)
            except CoordinationUnavailable:
                pass
