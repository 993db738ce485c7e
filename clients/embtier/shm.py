"""The client's side of the daemon's side socket: same-host shared memory (server.shared_memory) and
the credential of this process ([auth]).

A SharedMemory is one connection to the daemon's side socket (its gRPC Unix socket's path +
wire.SHM_SOCKET_SUFFIX) and the regions registered over it: sealed memfds mapped here and in the
daemon.  Client.lookup_pooled puts a request's ids, lengths and weights in a region and lets the
daemon write the pooled values there, so only a small message travels over gRPC.  Regions are
leased one request at a time and kept for the next; they go when the connection closes.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from embtier.wire import SHM_MESSAGE_BYTES, SHM_SOCKET_SUFFIX

MIN_REGION_BYTES = 1 << 20
ALIGN = 64


class SharedMemoryError(Exception):
    """The daemon refused a side-socket request: code (a gRPC status name) and its message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def side_socket(target: str) -> Path | None:
    """The side socket of a gRPC target on a Unix socket ("unix:///path" or "unix:/path"), else None."""
    for prefix in ("unix://", "unix:"):
        if target.startswith(prefix):
            return Path(target[len(prefix):] + SHM_SOCKET_SUFFIX)
    return None


@dataclass(eq=False)
class Region:
    """A registered region: its name and token (what a SharedSlice names) and its mapping here."""

    name: str
    token: str
    size: int
    mapping: mmap.mmap


def aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


class SharedMemory:
    """A connection to a daemon's side socket and the regions registered over it (thread-safe)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._lock = threading.Lock()  # one side-socket exchange at a time; guards the pool too
        self._free: list[Region] = []
        self._regions: list[Region] = []
        self._serial = 0

    def _ask(self, message: dict, fds: list[int] = ()) -> dict:
        """(lock held) One request and its answer; SharedMemoryError when refused."""
        socket.send_fds(self._sock, [json.dumps(message).encode()], list(fds))
        reply = json.loads(self._sock.recv(SHM_MESSAGE_BYTES))
        if not reply.get("ok"):
            raise SharedMemoryError(reply.get("code", "UNKNOWN"), reply.get("message", ""))
        return reply

    def _register(self, nbytes: int) -> Region:
        """(lock held) A new region of nbytes: a memfd sealed against shrinking, mapped and registered."""
        self._serial += 1
        name = f"pid{os.getpid()}-{self._serial}"
        fd = os.memfd_create(f"embtier-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                reply = self._ask({"op": "register", "name": name}, [fd])
            except BaseException:
                mapping.close()
                raise
        finally:
            os.close(fd)
        region = Region(reply["region"], reply["token"], nbytes, mapping)
        self._regions.append(region)
        return region

    def lease(self, nbytes: int) -> Region:
        """A region of at least nbytes no other request holds (give it back with release)."""
        with self._lock:
            fits = [r for r in self._free if r.size >= nbytes]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
            size = max(MIN_REGION_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())
            return self._register(size)

    def release(self, region: Region) -> None:
        with self._lock:
            self._free.append(region)

    def credential(self) -> dict | None:
        """The daemon's credential for this process ({"token", "identity", "role", "shared_memory"}), or
        None when the daemon checks no roles (auth off; a daemon older than [auth] does not know the op)."""
        with self._lock:
            try:
                return self._ask({"op": "credential"})
            except SharedMemoryError:
                return None

    def status(self) -> list[dict]:
        with self._lock:
            return self._ask({"op": "status"})["regions"]

    def unregister(self, region: Region) -> None:
        """Unregisters a region this connection holds no lease on (SharedMemoryError while a request uses it)."""
        with self._lock:
            self._ask({"op": "unregister", "name": region.name})
            self._regions.remove(region)
            if region in self._free:
                self._free.remove(region)
        region.mapping.close()

    def close(self) -> None:
        """Closes the connection: the daemon drops its regions."""
        with self._lock:
            self._sock.close()
            for region in self._regions:
                try:
                    region.mapping.close()
                except BufferError:  # a view of it is still alive somewhere: the GC unmaps it later
                    pass
            self._regions.clear()
            self._free.clear()
