"""The SCM tier: one file opened with O_DIRECT, rows packed into 4 KiB blocks.

The file is created (or emptied) at start and sized sparse to the tier's
capacity; table chunks are 4 KiB-aligned extents of it, each reserved on
the device (fallocate) when it is handed out: a full device fails the
creation or move that asked for the room, never a later row write.  Reads bypass the
page cache: the native kernels read only the aligned span around each row
(512 B where the device allows it, probed here, else 4 KiB) in batches.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
from pathlib import Path

from embtier.wire import TierInfo

from embtierd.errors import StorageError, storage_error
from embtierd.native import TIER_SCM
from embtierd.tiers.extents import Extent, ExtentAllocator
from embtierd.tiers.tier_base import ArenaTier

log = logging.getLogger(__name__)

BLOCK = 4096


def probe_read_align(fd: int) -> int:
    """The smallest O_DIRECT read (512 .. 4096 bytes) the file accepts."""
    buf = mmap.mmap(-1, BLOCK)
    try:
        for size in (512, 1024, 2048, BLOCK):
            try:
                os.preadv(fd, [memoryview(buf)[:size]], 0)
                return size
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return BLOCK
    finally:
        buf.close()


class ScmTier(ArenaTier):
    name = "scm"
    tier_id = TIER_SCM
    emulated = False

    def __init__(self, capacity_bytes: int, path: Path, read_align_bytes: int = 0):
        self.capacity_bytes = capacity_bytes - capacity_bytes % BLOCK
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            hint = " (the file system does not support O_DIRECT; tmpfs does not)" if e.errno == errno.EINVAL else ""
            raise StorageError(f"tiers.scm.path: cannot open {self.path} with O_DIRECT: {e.strerror}{hint}") from e
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, self.capacity_bytes)
        self.read_align_bytes = read_align_bytes or probe_read_align(self.fd)
        free = shutil.disk_usage(self.path.parent).free
        if self.capacity_bytes > free:
            log.warning("tier scm: capacity %d bytes exceeds the %d bytes free on %s", self.capacity_bytes,
                        free, self.path.parent)
        self._allocs = [ExtentAllocator(self.capacity_bytes, BLOCK)]

    def allocate(self, nbytes: int, port: int | None = None) -> Extent | None:
        """An extent of the file whose blocks the device has reserved (see the module docstring)."""
        extent = super().allocate(nbytes, port)
        if extent is not None:
            try:
                os.posix_fallocate(self.fd, extent.offset, extent.length)
            except OSError as e:
                self.release(extent)
                raise storage_error(e, self.path, f"reserving {extent.length} bytes of the SCM tier") from e
        return extent

    def info(self) -> TierInfo:
        return TierInfo(self.name, self.capacity_bytes, self.used_bytes, -1, False, str(self.path))

    def describe(self) -> str:
        return (f"scm: {self.capacity_bytes / 2**30:.2f} GiB in {self.path} (O_DIRECT, "
                f"{self.read_align_bytes}-byte reads)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
