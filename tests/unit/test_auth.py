"""The role rules of rpc/auth.py against what the module docstring and README promise: every method
of the service has its role, a peer's role is the highest it is given, tenant-bound grants hold only
as their tenants, and grants that name nothing on this host stop the daemon at start."""

from __future__ import annotations

import grp
import os
import pwd

import pytest
from embtier.v1 import embtier_pb2 as pb
from embtierd.config import AuthConfig, load
from embtierd.errors import ConfigError
from embtierd.rpc.auth import METHOD_ROLES, Authorizer, Identity, required_role


def authorizer(anonymous="reader", group="writer", **grants) -> Authorizer:
    return Authorizer(AuthConfig(anonymous=anonymous, group=group, grants={
        name: {"identity": identity, "role": role, "tenants": tuple(tenants)}
        for name, (identity, role, *rest) in grants.items() for tenants in [rest[0] if rest else ()]}))


def unix(uid: int, *groups: int) -> Identity:
    return Identity("unix", uid, groups[0] if groups else uid, frozenset(groups or (uid,)))


def test_every_method_of_the_service_has_its_role():
    methods = set(pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods_by_name)
    assert set(METHOD_ROLES) == methods
    assert required_role("grpc.health.v1.Health/Check") is None
    assert required_role("SomeFutureMethod") == "admin"  # a method the map misses is closed, not open


def test_defaults_root_and_own_user_admin_group_writer_everyone_else_reader():
    a = authorizer()
    assert a.access(unix(0)).role == "admin"
    assert a.access(unix(os.geteuid())).role == "admin"
    assert a.access(unix(64000, 64000, os.getegid())).role == "writer"  # a member of the daemon's group
    assert a.access(unix(64000)).role == "reader"
    assert a.access(Identity("socket")).role == "writer"
    assert a.access(Identity("anonymous")).role == "reader"
    assert a.access(Identity("cert", names=("anyone",))).role == "reader"


def test_grants_raise_never_lower_and_the_floor_holds():
    a = authorizer(anonymous="none", group="reader", one=("uid:64000", "admin"), low=("uid:0", "reader"),
                   ops=("gid:5000", "writer"), bot=("cert:bot.example", "writer"))
    assert a.access(unix(64000)).role == "admin"
    assert a.access(unix(0)).role == "admin"  # a lower grant takes nothing away
    assert a.access(unix(64001, 64001, 5000)).role == "writer"
    assert a.access(unix(64002)).role == "none"
    assert a.access(Identity("cert", names=("cn", "bot.example"))).role == "writer"  # a SAN matches too
    assert a.access(Identity("anonymous")).role == "none"
    assert a.access(Identity("socket")).role == "reader"


def test_tenant_bound_grants():
    a = authorizer(ads=("uid:64000", "writer", ["ads"]), ads_admin=("uid:64000", "admin", ["ads-canary"]),
                   both=("uid:64001", "writer", ["ads"]), any=("uid:64001", "reader"))
    bound = a.access(unix(64000))
    assert bound.tenants == {"ads", "ads-canary"}
    assert bound.role_as("ads") == "writer" and bound.role_as("ads-canary") == "admin"
    free = a.access(unix(64001))  # an unbound grant: any tenant, writer only as ads
    assert free.tenants is None and free.role_as("ads") == "writer" and free.role_as("default") == "reader"


@pytest.mark.parametrize("identity, message", [
    ("uid:alice", "uid must be a number"), ("host:x", "expected one of"), ("uid:", "expected one of"),
    ("user:no-such-user-embtier", "no user 'no-such-user-embtier'"),
    ("group:no-such-group-embtier", "no group 'no-such-group-embtier'")])
def test_a_grant_that_names_nothing_stops_the_daemon(identity, message):
    with pytest.raises(ConfigError, match=message) as err:
        authorizer(x=(identity, "writer"))
    assert "auth.grants.x.identity" in str(err.value)


def test_user_and_group_names_are_resolved():
    root_user, root_group = pwd.getpwuid(0).pw_name, grp.getgrgid(0).gr_name
    a = authorizer(anonymous="none", u=(f"user:{root_user}", "reader"), g=(f"group:{root_group}", "writer"))
    assert a.access(unix(64000, 64000, 0)).role == "writer"


def test_configuration_checks():
    with pytest.raises(ConfigError, match="auth.grants.x.identity: every grant names an identity"):
        load(overrides={"auth": {"grants": {"x": {"role": "admin"}}}})
    with pytest.raises(ConfigError, match="auth.grants.x.role"):
        load(overrides={"auth": {"grants": {"x": {"identity": "uid:1", "role": "root"}}}})
    with pytest.raises(ConfigError, match="auth.anonymous"):
        load(overrides={"auth": {"anonymous": "owner"}})
    cfg = load(overrides={"auth": {"grants": {"x": {"identity": "uid:1", "role": "admin", "tenants": ["a", "a"]}}}})
    assert cfg.auth.grants["x"] == {"identity": "uid:1", "role": "admin", "tenants": ("a",)}
