"""Same-host shared memory for LookupPooled (server.shared_memory, off unless enabled).

A client on the same host registers a region over the side socket, the daemon's gRPC Unix socket's
path + embtier.wire.SHM_SOCKET_SUFFIX (SOCK_SEQPACKET, created with the same mode, so the same users
may reach it).  A message is one JSON object; a registration carries the region's memfd (SCM_RIGHTS):

  {"op": "register", "name": N}  + fd -> {"ok": true, "region": N, "token": T, "bytes": B}
  {"op": "status"}                     -> {"ok": true, "regions": [{"region", "bytes", "in_use"}, ...]}
  {"op": "unregister", "name": N}      -> {"ok": true}
  {"op": "credential"}                 -> {"ok": true, "token": T, "identity": "...", "role": R,
                                            "shared_memory": bool}
  refused: {"ok": false, "code": "<gRPC status name>", "message": "..."}

The side socket also hands out credentials ([auth], rpc/auth.py): gRPC does not tell a server who its
Unix socket peers are, so a client asks here, where the daemon reads SO_PEERCRED, and sends the token
with each gRPC call; it stands for the peer's uid and groups while this connection is open.  The side
socket listens whenever auth or shared memory is on; register, unregister and status need shared
memory on (FAILED_PRECONDITION otherwise).

A registration is refused unless the fd is a memfd that cannot shrink (F_SEAL_SHRINK: a region cut
short under a reader would kill the daemon with SIGBUS), owned by the peer's uid (SO_PEERCRED), of 1
byte to server.shared_memory_max_bytes, under a name the connection has not used.  The daemon maps
it shared, and LookupPooled's FeatureBags name slices of it by region and token (the token is only
ever sent back on the registering connection, so only its holder can use the region; a slice whose
token is not its region's is NOT_FOUND, as an unknown region is).  A region
lives until it is unregistered or its connection closes; while a request uses it, it is neither
unregistered (FAILED_PRECONDITION) nor unmapped (a closed connection's regions go when their last
request ends).

Every slice is checked before it is read: region and token, offset >= 0, size >= 0, offset + size
within the region, size a whole number of the field's elements.  Inputs are copied out of the region
before anything checks them, so a client that changes them meanwhile cannot make the kernels read
what they did not check.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import secrets
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from embtier.wire import SHM_MESSAGE_BYTES, SHM_SOCKET_SUFFIX

from embtierd.errors import (
    AlreadyExistsError,
    EmbtierError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
)
from embtierd.rpc.auth import Authorizer, unix_identity

log = logging.getLogger(__name__)

MAX_REGIONS_PER_CONNECTION = 64
PEERCRED = struct.Struct("3i")  # pid, uid, gid


def side_socket_path(grpc_socket: Path) -> Path:
    return Path(str(grpc_socket) + SHM_SOCKET_SUFFIX)


@dataclass(eq=False)
class Region:
    """A registered region: its mapping and who may use it."""

    name: str
    token: str
    uid: int
    size: int
    owner: int  # the registering connection's number
    mapping: mmap.mmap
    in_use: int = 0
    closing: bool = False


@dataclass
class Registry:
    """The registered regions, by (connection, name); the one place a region is mapped and unmapped."""

    max_bytes: int
    _regions: dict[tuple[int, str], Region] = field(default_factory=dict)
    _by_token: dict[str, Region] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, owner: int, uid: int, name: str, fd: int) -> Region:
        """Maps fd as region name of connection owner (peer uid); the checks of the module docstring."""
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise InvalidArgumentError(f"name must be a string of 1 to 128 characters, got {name!r}")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError(f"region {name!r}: the fd is not a memfd (not a regular file)")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise InvalidArgumentError(f"region {name!r}: the fd is not a memfd (it takes no seals)") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise InvalidArgumentError(f"region {name!r}: the memfd must be sealed against shrinking "
                                       f"(fcntl F_ADD_SEALS F_SEAL_SHRINK)")
        if st.st_uid != uid:
            raise PermissionDeniedError(f"region {name!r}: the memfd belongs to uid {st.st_uid}, not to the "
                                        f"caller's uid {uid}")
        if not 1 <= st.st_size <= self.max_bytes:
            raise InvalidArgumentError(f"region {name!r}: {st.st_size} bytes; a region has 1 to "
                                       f"{self.max_bytes} bytes (server.shared_memory_max_bytes)")
        with self._lock:
            if (owner, name) in self._regions:
                raise AlreadyExistsError(f"region {name!r} is registered already on this connection")
            if sum(1 for o, _ in self._regions if o == owner) >= MAX_REGIONS_PER_CONNECTION:
                raise RequestTooLargeError(f"a connection registers at most {MAX_REGIONS_PER_CONNECTION} "
                                             "regions; unregister one first")
            region = Region(name, secrets.token_hex(16), uid, st.st_size, owner,
                            mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            self._regions[(owner, name)] = region
            self._by_token[region.token] = region
        log.info("shared memory: region %r of %d bytes registered by uid %d", name, st.st_size, uid)
        return region

    def unregister(self, owner: int, name: str) -> None:
        with self._lock:
            region = self._regions.get((owner, name))
            if region is None:
                raise NotFoundError(f"region {name!r} is not registered on this connection")
            if region.in_use:
                raise FailedPreconditionError(f"region {name!r} is in use by {region.in_use} request(s); "
                                              "unregister it once they have answered")
            self._forget(region)

    def status(self, owner: int) -> list[dict]:
        with self._lock:
            return [{"region": r.name, "bytes": r.size, "in_use": r.in_use}
                    for (o, _), r in self._regions.items() if o == owner]

    def drop_connection(self, owner: int) -> None:
        """A connection closed: its regions go now, or when the last request using one ends."""
        with self._lock:
            for region in [r for (o, _), r in self._regions.items() if o == owner]:
                if region.in_use:
                    region.closing = True
                else:
                    self._forget(region)

    def _forget(self, region: Region) -> None:
        """(lock held) Unregisters and unmaps a region no request uses."""
        del self._regions[(region.owner, region.name)]
        del self._by_token[region.token]
        region.mapping.close()

    def close(self) -> None:
        with self._lock:
            for region in list(self._regions.values()):
                region.closing = True
                if not region.in_use:
                    self._forget(region)

    @contextmanager
    def using(self, slices: list[tuple[str, object]]) -> Iterator[dict[str, Region]]:
        """The regions of slices ((field, SharedSlice) pairs), held in use for the block:
        {field: region}.  NOT_FOUND for an unknown region or a token that is not its own."""
        held: list[Region] = []
        with self._lock:
            found = {}
            for name, ref in slices:
                region = self._by_token.get(ref.token)
                if region is None or region.name != ref.region or region.closing:  # (which regions exist is
                    # nobody else's business: a wrong token is as unknown as a wrong name)
                    raise NotFoundError(f"{name}: no shared-memory region {ref.region!r} with that token is "
                                        "registered")
                found[name] = region
            for region in found.values():
                region.in_use += 1
                held.append(region)
        try:
            yield found
        finally:
            with self._lock:
                for region in held:
                    region.in_use -= 1
                    if region.closing and not region.in_use and (region.owner, region.name) in self._regions:
                        self._forget(region)


def check_slice(name: str, ref, region: Region, itemsize: int) -> tuple[int, int]:
    """(offset, element count) of a slice, after the checks of the module docstring."""
    if ref.offset < 0 or ref.size < 0:
        raise InvalidArgumentError(f"{name}: offset {ref.offset} and size {ref.size} must be >= 0")
    if ref.offset + ref.size > region.size:
        raise InvalidArgumentError(f"{name}: bytes [{ref.offset}, {ref.offset + ref.size}) are past the end of "
                                   f"region {region.name!r} ({region.size} bytes)")
    if ref.size % itemsize:
        raise InvalidArgumentError(f"{name}: size {ref.size} is not a whole number of {itemsize}-byte values")
    return ref.offset, ref.size // itemsize


def read_slice(name: str, ref, region: Region, dtype: str) -> np.ndarray:
    """A private copy of a slice's values (little-endian dtype)."""
    dt = np.dtype(dtype)
    offset, count = check_slice(name, ref, region, dt.itemsize)
    view = np.frombuffer(region.mapping, dtype=dt, count=count, offset=offset)
    try:
        return view.copy()
    finally:
        del view


def write_slice(name: str, ref, region: Region, values: np.ndarray) -> None:
    """Stores values' bytes at the start of a slice at least their size."""
    data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    offset, count = check_slice(name, ref, region, 1)
    if count < data.size:
        raise InvalidArgumentError(f"{name}: size {ref.size} bytes; the result takes {data.size}")
    view = np.frombuffer(region.mapping, dtype=np.uint8, count=data.size, offset=offset)
    try:
        view[:] = data
    finally:
        del view


class SideServer:
    """The side socket: a thread accepting connections, a thread per connection.  registry: the shared
    memory regions (None: shared memory is off); authorizer: who may do what (None: auth is off)."""

    def __init__(self, path: Path, registry: Registry | None, mode: int, authorizer: Authorizer | None = None) -> None:
        self.path = path
        self.registry = registry
        self.authorizer = authorizer
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.bind(str(path))
        os.chmod(path, mode)
        self._sock.listen(64)
        self._connections = 0
        self._closed = False
        threading.Thread(target=self._accept, name="side-accept", daemon=True).start()
        log.info("side socket %s (%s)", path, ", ".join(
            what for what, on in (("shared memory", registry is not None), ("credentials", authorizer is not None))
            if on))

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._connections += 1
            threading.Thread(target=self._serve, args=(conn, self._connections), name="side-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, owner: int) -> None:
        tokens: list[str] = []  # the credentials this connection was given: they go with it
        try:
            pid, uid, gid = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(conn, SHM_MESSAGE_BYTES, 1)
                except OSError:
                    return
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return
                try:
                    reply = self._handle(owner, (pid, uid, gid), data, fds, tokens)
                except EmbtierError as e:
                    reply = {"ok": False, "code": e.status, "message": str(e)}
                except OSError as e:
                    reply = {"ok": False, "code": "INVALID_ARGUMENT", "message": f"the fd cannot be mapped: {e}"}
                finally:
                    for fd in fds:
                        os.close(fd)
                conn.send(json.dumps(reply).encode())
        except OSError:
            return
        finally:
            for token in tokens:
                self.authorizer.credentials.revoke(token)
            if self.registry is not None:
                self.registry.drop_connection(owner)
            conn.close()

    def _handle(self, owner: int, peer: tuple[int, int, int], data: bytes, fds: list[int], tokens: list[str]) -> dict:
        try:
            message = json.loads(data)
        except ValueError:
            raise InvalidArgumentError("a side-socket message is one JSON object") from None
        op = message.get("op") if isinstance(message, dict) else None
        if op == "credential":
            if self.authorizer is None:
                raise FailedPreconditionError("auth is off (auth.enabled = false): no credential is needed")
            who = unix_identity(*peer)
            token = self.authorizer.credentials.issue(who)
            tokens.append(token)
            return {"ok": True, "token": token, "identity": str(who), "role": self.authorizer.access(who).role,
                    "shared_memory": self.registry is not None}
        if op in ("register", "unregister", "status") and self.registry is None:
            raise FailedPreconditionError(f"{op}: shared memory is off (server.shared_memory = false)")
        uid = peer[1]
        if op == "register":
            if len(fds) != 1:
                raise InvalidArgumentError(f"register takes one fd (SCM_RIGHTS); got {len(fds)}")
            region = self.registry.register(owner, uid, message.get("name"), fds[0])
            return {"ok": True, "region": region.name, "token": region.token, "bytes": region.size}
        if op == "unregister":
            self.registry.unregister(owner, str(message.get("name")))
            return {"ok": True}
        if op == "status":
            return {"ok": True, "regions": self.registry.status(owner)}
        raise InvalidArgumentError(f"op must be credential, register, unregister or status; got {op!r}")

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self.path.unlink(missing_ok=True)
        if self.registry is not None:
            self.registry.close()
