"""Who may do what ([auth]): each call's peer identified, its role found, the method's role required.

Roles, each allowing what the one before it does and more (embtier.wire.ROLES):

  none    health checks and reflection only
  reader  lookups, describe, list, tiers, heat, policy and checkpoint listings (METHOD_ROLES)
  writer  also WriteRows and CreateTable
  admin   also DropTable, SetPolicy, Checkpoint, RestoreCheckpoint, RecordTrace

Identities:

- On TCP with mutual TLS, the client certificate: its subject's common name and its subject
  alternative names (gRPC has verified the chain against server.tls.client_ca).
- On the Unix socket, the peer's uid, gid and groups, as the kernel tells them (SO_PEERCRED).  gRPC
  does not hand a server its Unix peers' credentials, so a client gets a credential over the side
  socket (rpc/shm.py: {"op": "credential"}), where the daemon reads SO_PEERCRED and the peer's groups,
  and sends it with each call as the metadata embtier.wire.CREDENTIAL_METADATA_KEY.  A credential is
  honoured only on calls that arrive on a Unix socket, and only while the side connection that got it
  is open (a client that exits takes its credential with it; after a daemon restart an old one is
  UNAUTHENTICATED and the client library gets a new one).
- A Unix socket peer that sent no credential (grpcurl, a client without the side socket) is known
  only to be allowed through the socket's mode 0660, which the daemon sets: the daemon's user, root
  or a member of the daemon's group.  It gets the group's role.
- Anyone else (plaintext TCP, TLS without a client certificate) is anonymous.

A peer's role is the highest of: auth.anonymous (everyone's floor, "reader" by default); "admin" for
root and the daemon's own user on the Unix socket; auth.group ("writer" by default) for members of the
daemon's group (the group of its Unix socket, which mode 0660 lets connect) and for Unix peers without
a credential; and each [auth.grants.NAME]
whose identity matches.  A grant with tenants gives its role only to requests made as one of them, and
an identity whose grants all name tenants may act as those tenants only.  With auth.enabled = false
every peer is admin.

A refused call is PERMISSION_DENIED naming the method, the identity and the role it has and needs; it
is logged and counted (embtier_auth_denied_total by method).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import threading
from dataclasses import dataclass, field

from embtier.wire import CREDENTIAL_METADATA_KEY, ROLES, TENANT_METADATA_KEY

from embtierd.config import DEFAULT_TENANT, AuthConfig
from embtierd.errors import ConfigError, EmbtierError, PermissionDeniedError

log = logging.getLogger(__name__)

RANK = {role: rank for rank, role in enumerate(ROLES)}

METHOD_ROLES = {
    "ListTables": "reader",
    "DescribeTable": "reader",
    "Lookup": "reader",
    "LookupPooled": "reader",
    "GetTiers": "reader",
    "GetHeat": "reader",
    "GetPolicy": "reader",
    "ListCheckpoints": "reader",
    "ExportMapping": "reader",
    "WriteRows": "writer",
    "CreateTable": "writer",
    "DropTable": "admin",
    "SetPolicy": "admin",
    "Checkpoint": "admin",
    "RestoreCheckpoint": "admin",
    "RecordTrace": "admin",
}
"""The role each method of the EmbeddingStore service needs (a method missing here needs admin)."""

OPEN_SERVICES = ("grpc.health.v1.Health/", "grpc.reflection.v1.ServerReflection/",
                 "grpc.reflection.v1alpha.ServerReflection/")
"""Services any peer may call: health checks, and reflection (which describes the API, no data)."""

IDENTITY_KINDS = ("uid", "user", "gid", "group", "cert")
"""What a grant's identity may name: "uid:1000", "user:alice", "gid:100", "group:ml" (Unix socket
peers) or "cert:NAME" (a client certificate whose common name or a subject alternative name is NAME)."""


class UnauthenticatedError(EmbtierError):
    """A credential the daemon does not know (its side connection closed, or the daemon restarted)."""

    status = "UNAUTHENTICATED"


def required_role(method: str) -> str | None:
    """The role a call of method (its label: "Lookup", "grpc.health.v1.Health/Check") needs; None: any peer."""
    if method.startswith(OPEN_SERVICES):
        return None
    return METHOD_ROLES.get(method, "admin")


@dataclass(frozen=True)
class Identity:
    """Who a call comes from: a Unix peer (uid, gid, groups), a certificate (names) or anonymous."""

    kind: str  # "unix", "socket" (a Unix peer without a credential), "cert" or "anonymous"
    uid: int = -1
    gid: int = -1
    groups: frozenset[int] = frozenset()
    names: tuple[str, ...] = ()  # a certificate's common name, then its subject alternative names
    peer: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            try:
                user = pwd.getpwuid(self.uid).pw_name
            except KeyError:
                return f"uid {self.uid}"
            return f"uid {self.uid} ({user})"
        if self.kind == "socket":
            return "a Unix socket peer without a credential"
        if self.kind == "cert":
            return f"certificate {self.names[0]!r}" if self.names else "a certificate without names"
        return f"anonymous peer {self.peer}" if self.peer else "anonymous peer"


SOCKET_PEER = Identity("socket")


def unix_identity(pid: int, uid: int, gid: int) -> Identity:
    """A Unix socket peer's identity from SO_PEERCRED, with the supplementary groups of its process."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except OSError:  # the process is gone already: its primary group is all we know
        pass
    return Identity("unix", uid, gid, frozenset(groups))


@dataclass(frozen=True)
class Grant:
    name: str
    kind: str  # one of IDENTITY_KINDS (user and group resolved to uid and gid)
    value: str | int
    role: str
    tenants: frozenset[str] = field(default_factory=frozenset)  # empty: every tenant

    def matches(self, who: Identity) -> bool:
        if self.kind == "uid":
            return who.kind == "unix" and who.uid == self.value
        if self.kind == "gid":
            return who.kind == "unix" and self.value in who.groups
        return who.kind == "cert" and self.value in who.names


def parse_grant(name: str, identity: str, role: str, tenants: tuple[str, ...]) -> Grant:
    """A [auth.grants.NAME] table as a Grant: user and group names are looked up now (ConfigError when
    the host has none of that name)."""
    where = f"auth.grants.{name}.identity"
    kind, sep, value = identity.partition(":")
    if not sep or kind not in IDENTITY_KINDS or not value:
        raise ConfigError(f"{where}: expected one of {', '.join(k + ':...' for k in IDENTITY_KINDS)}; got {identity!r}")
    if kind in ("uid", "gid"):
        if not value.isdigit():
            raise ConfigError(f"{where}: {kind} must be a number; got {value!r}")
        return Grant(name, kind, int(value), role, frozenset(tenants))
    if kind == "user":
        try:
            return Grant(name, "uid", pwd.getpwnam(value).pw_uid, role, frozenset(tenants))
        except KeyError:
            raise ConfigError(f"{where}: this host has no user {value!r}") from None
    if kind == "group":
        try:
            return Grant(name, "gid", grp.getgrnam(value).gr_gid, role, frozenset(tenants))
        except KeyError:
            raise ConfigError(f"{where}: this host has no group {value!r}") from None
    return Grant(name, "cert", value, role, frozenset(tenants))


@dataclass(frozen=True)
class Access:
    """What one identity may do: its role for any tenant, the roles it has only as certain tenants,
    and the tenants it may act as (None: any)."""

    role: str
    tenant_roles: dict[str, str]
    tenants: frozenset[str] | None

    def role_as(self, tenant: str) -> str:
        own = self.tenant_roles.get(tenant)
        return own if own is not None and RANK[own] > RANK[self.role] else self.role


class Credentials:
    """The credentials handed out over the side socket: token -> the Unix identity it stands for."""

    def __init__(self) -> None:
        self._tokens: dict[str, Identity] = {}
        self._lock = threading.Lock()

    def issue(self, who: Identity) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = who
        return token

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def get(self, token: str) -> Identity | None:
        return self._tokens.get(token)


class Authorizer:
    """The daemon's [auth]: identifies each call's peer and checks its role against the method's."""

    def __init__(self, config: AuthConfig) -> None:
        self.anonymous = config.anonymous
        self.group_role = config.group
        self.grants = tuple(parse_grant(name, g["identity"], g["role"], g["tenants"])
                            for name, g in config.grants.items())
        self.admins = frozenset({0, os.geteuid()})
        self.group = os.getegid()
        self.credentials = Credentials()
        self._denied = None
        self._access: dict[Identity, Access] = {}  # identities seen, with what they may do (bounded below)

    def count_denied(self, denied) -> None:
        """denied(method) is called for each refusal (the metrics' counter)."""
        self._denied = denied

    def access(self, who: Identity) -> Access:
        """What who may do (remembered: a peer's identity is the same on each of its calls)."""
        found = self._access.get(who)
        if found is None:
            found = self._resolve(who)
            if len(self._access) > 4096:  # many distinct peers: forget them all rather than grow
                self._access.clear()
            self._access[who] = found
        return found

    def _resolve(self, who: Identity) -> Access:
        role = self.anonymous
        if who.kind == "unix":
            if who.uid in self.admins:
                role = "admin"
            elif self.group in who.groups and RANK[self.group_role] > RANK[role]:
                role = self.group_role
        elif who.kind == "socket" and RANK[self.group_role] > RANK[role]:
            role = self.group_role
        tenant_roles: dict[str, str] = {}
        restricted: set[str] = set()
        unrestricted = role != self.anonymous
        for grant in self.grants:
            if not grant.matches(who):
                continue
            if not grant.tenants:
                unrestricted = True
                if RANK[grant.role] > RANK[role]:
                    role = grant.role
                continue
            restricted |= grant.tenants
            for tenant in grant.tenants:
                if RANK[grant.role] > RANK[tenant_roles.get(tenant, "none")]:
                    tenant_roles[tenant] = grant.role
        tenants = frozenset(restricted) if restricted and not unrestricted else None
        return Access(role, tenant_roles, tenants)

    def identify(self, context) -> Identity:
        """The identity of the call in context (UnauthenticatedError for a credential not known)."""
        peer = context.peer()
        if peer.startswith("unix:"):
            token = None
            for key, value in context.invocation_metadata():
                if key == CREDENTIAL_METADATA_KEY:
                    token = value
                    break
            if token is None:
                return SOCKET_PEER
            who = self.credentials.get(token)
            if who is None:
                raise UnauthenticatedError(
                    f"the {CREDENTIAL_METADATA_KEY} credential is not known to this daemon (its side connection "
                    f"closed, or the daemon restarted): get a new one over the side socket")
            return who
        auth = context.auth_context()
        names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
        if names:
            return Identity("cert", names=tuple(dict.fromkeys(n.decode(errors="replace") for n in names)), peer=peer)
        return Identity("anonymous", peer=peer)

    def check(self, method: str, need: str, context) -> None:
        """Raises PermissionDeniedError (counted and logged) unless the call's peer may call method."""
        who = self.identify(context)
        access = self.access(who)
        tenant = DEFAULT_TENANT
        for key, value in context.invocation_metadata():
            if key == TENANT_METADATA_KEY:
                tenant = value
                break
        if access.tenants is not None and tenant not in access.tenants:
            self._refuse(method, f"{method}: {who} may act as tenant(s) {', '.join(sorted(access.tenants))} only, "
                                 f"not as tenant {tenant!r}")
        has = access.role_as(tenant)
        if RANK[has] < RANK[need]:
            self._refuse(method, f"{method} needs role {need!r}; {who} has role {has!r}"
                                 + (f" as tenant {tenant!r}" if access.tenant_roles else ""))

    def _refuse(self, method: str, message: str) -> None:
        log.warning("PERMISSION_DENIED: %s", message)
        if self._denied is not None:
            self._denied(method)
        raise PermissionDeniedError(message)
