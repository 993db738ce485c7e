"""Roles ([auth]) on a real daemon: every method called by every kind of peer, allowed or refused as
its role says.

- On the Unix socket, as real uids: the test's own (root: admin) and, in child processes that take
  another uid before they connect (tests/e2e/auth_calls.py), uid 65534 (granted writer), uid 65533
  (granted nothing: the anonymous floor, reader), uid 65531 (a member of gid 4242, granted admin) and
  uid 65532 (writer as tenant "ads" only).  The daemon's Unix socket for them is in a directory they
  can reach, chowned to a group they are in (as the systemd unit's RuntimeDirectory and group do).
- Over mutual TLS, client certificates named "trainer" (granted writer), "operator" (admin) and
  "auditor" (nothing: reader).
- Without an identity: plaintext TCP (reader), a Unix peer without a credential (auth.group: writer),
  a credential sent over TCP (ignored), a credential the daemon does not know (UNAUTHENTICATED).

Each refusal must be PERMISSION_DENIED naming the method and the identity, counted in
embtier_auth_denied_total and logged; each allowed call must get past the role check (its own
answer: OK, NOT_FOUND, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from embtier import Client, EmbtierClientError, TlsOptions
from embtier.shm import SharedMemory, side_socket
from embtier.v1 import embtier_pb2 as pb
from embtier.v1 import embtier_pb2_grpc as pb_grpc
from embtier.wire import CREDENTIAL_METADATA_KEY, ROLES
from embtierd.rpc.auth import METHOD_ROLES

from tests.e2e.auth_calls import TABLE, call_each
from tests.support import OPENSSL_CNF, credentialed_channel, make_ca, make_leaf, start_daemon

REPO = Path(__file__).resolve().parents[2]
RANK = {role: rank for rank, role in enumerate(ROLES)}
SOCKET_GROUP = 4243  # the group the children's socket belongs to (every child is in it)
OPS_GROUP = 4242     # granted admin

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the children take other uids"),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")]

CONFIG = """\
[tiering]
enabled = false
[server.tls]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = "{pki}/ca.pem"
[tenants.ads]
[auth.grants.batch]
identity = "uid:65534"
role = "writer"
[auth.grants.ops]
identity = "gid:{ops}"
role = "admin"
[auth.grants.ads-writer]
identity = "uid:65532"
role = "writer"
tenants = ["ads"]
[auth.grants.trainer]
identity = "cert:trainer"
role = "writer"
[auth.grants.operator]
identity = "cert:operator"
role = "admin"
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)
    make_ca(d, "ca")
    make_leaf(d, "server", "ca", "server", "/CN=127.0.0.1")
    for name in ("trainer", "operator", "auditor"):
        make_leaf(d, name, "ca", "client", f"/CN={name}")
    return d


@pytest.fixture(scope="module")
def public_dir():
    """A directory other uids may reach (pytest's temporary directories are root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="embtier-auth-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(pki, public_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("auth")
    config = state / "embtierd.toml"
    config.write_text(CONFIG.format(pki=pki, ops=OPS_GROUP))
    sock = public_dir / "embtierd.sock"
    d = start_daemon(state / "daemon", "--listen", f"unix://{sock}", config=config)
    for path in (sock, Path(f"{sock}.shm")):  # the unit's group: the children's
        os.chown(path, 0, SOCKET_GROUP)
    with Client(d.target) as c:
        c.create_table(TABLE, 4, 4)
    d.public = f"unix://{sock}"
    yield d
    assert d.stop() == 0, d.log()


def as_uid(target: str, uid: int, groups: tuple[int, ...], tenant: str = "") -> dict[str, tuple[str, str]]:
    """Every method called by a child process that is uid (gid uid, the socket's group and groups)."""
    done = subprocess.run([sys.executable, "-m", "tests.e2e.auth_calls", target, str(uid), str(uid),
                           ",".join(str(g) for g in (SOCKET_GROUP, *groups)), tenant],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return {method: tuple(answer) for method, answer in json.loads(done.stdout).items()}


def denied_counts(daemon) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("embtier_auth_denied_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('method="')[1].split('"')[0]] = float(value)
    return out


def assert_role(answers: dict[str, tuple[str, str]], role: str, who: str) -> list[str]:
    """Each method refused (PERMISSION_DENIED naming it and who) exactly when role is below its need;
    the methods refused."""
    assert set(answers) == set(METHOD_ROLES)
    refused = []
    for method, (code, details) in answers.items():
        if RANK[role] < RANK[METHOD_ROLES[method]]:
            assert code == "PERMISSION_DENIED", (method, code, details)
            assert method in details and who in details and f"has role {role!r}" in details, details
            refused.append(method)
        else:
            assert code != "PERMISSION_DENIED", (method, details)
    return refused


@pytest.mark.parametrize("uid, groups, role", [(65534, (), "writer"), (65533, (), "reader"),
                                               (65531, (OPS_GROUP,), "admin")],
                         ids=["granted-writer", "no-grant-reader", "group-granted-admin"])
def test_unix_peers_get_their_uids_role(daemon, uid, groups, role):
    before = denied_counts(daemon)
    answers = as_uid(daemon.public, uid, groups)
    refused = assert_role(answers, role, f"uid {uid}")
    if RANK[role] >= RANK["writer"]:
        assert answers["CreateTable"][0] == "OK" and answers["WriteRows"][0] == "OK"
    after = denied_counts(daemon)
    for method in METHOD_ROLES:  # each refusal counted, and nothing else
        assert after.get(method, 0) - before.get(method, 0) == (method in refused), method
    if refused:
        assert f"PERMISSION_DENIED: {refused[0]} needs role" in daemon.log()


def test_root_on_the_unix_socket_is_admin(daemon):
    with credentialed_channel(daemon.target) as channel:
        answers = call_each(channel, "root")
    assert assert_role(answers, "admin", "uid 0") == []
    assert answers["Checkpoint"][0] == "OK" and answers["DropTable"][0] == "NOT_FOUND"


def test_a_tenant_bound_grant_holds_only_as_that_tenant(daemon):
    as_ads = as_uid(daemon.public, 65532, (), tenant="ads")
    assert_role(as_ads, "writer", "uid 65532")
    as_default = as_uid(daemon.public, 65532, ())
    for method, (code, details) in as_default.items():
        assert code == "PERMISSION_DENIED", (method, code)
        assert "may act as tenant(s) ads only" in details and "'default'" in details, details


@pytest.mark.parametrize("name, role", [("trainer", "writer"), ("operator", "admin"), ("auditor", "reader")])
def test_client_certificates_get_their_names_role(daemon, pki, name, role):
    tls = TlsOptions(ca=str(pki / "ca.pem"), cert=str(pki / f"{name}.pem"), key=str(pki / f"{name}.key"))
    with grpc.secure_channel(daemon.tcp, tls.credentials()) as channel:
        answers = call_each(channel, name)
    assert_role(answers, role, f"certificate {name!r}")


def test_peers_without_an_identity(tmp_path):
    """Plaintext TCP is anonymous (reader); a Unix peer without a credential gets auth.group's role
    (writer); a credential means nothing over TCP; one the daemon does not know is UNAUTHENTICATED."""
    d = start_daemon(tmp_path / "plain")
    try:
        with Client(d.target) as c:
            c.create_table(TABLE, 4, 4)
        with grpc.insecure_channel(d.tcp) as channel:
            assert_role(call_each(channel, "tcp"), "reader", "anonymous peer ipv4:127.0.0.1:")
        with grpc.insecure_channel(d.target) as channel:
            assert_role(call_each(channel, "socket"), "writer", "a Unix socket peer without a credential")
        side = SharedMemory(side_socket(d.target))
        try:
            token = side.credential()["token"]  # a valid credential ...
            with grpc.insecure_channel(d.target) as unix:
                pb_grpc.EmbeddingStoreStub(unix).ListTables(pb.ListTablesRequest(), timeout=10,
                                                            metadata=((CREDENTIAL_METADATA_KEY, token),))
            with grpc.insecure_channel(d.tcp) as tcp, pytest.raises(grpc.RpcError) as err:  # ... sent over TCP
                pb_grpc.EmbeddingStoreStub(tcp).DropTable(pb.DropTableRequest(name=TABLE), timeout=10,
                                                          metadata=((CREDENTIAL_METADATA_KEY, token),))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "anonymous" in err.value.details()
        finally:
            side.close()
        with grpc.insecure_channel(d.target) as channel:  # the side connection closed: the credential goes with it
            stub = pb_grpc.EmbeddingStoreStub(channel)
            for _ in range(100):  # (the daemon's side thread sees the close soon after)
                try:
                    stub.ListTables(pb.ListTablesRequest(), timeout=10, metadata=((CREDENTIAL_METADATA_KEY, token),))
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "not known" in e.details(), e
                    break
                time.sleep(0.05)
            else:
                pytest.fail("a credential outlived its side connection by 5 s")
        with Client(d.target) as c:
            assert TABLE in [t.name for t in c.tables()]  # nothing was dropped
    finally:
        assert d.stop() == 0, d.log()


def test_the_client_gets_a_new_credential_after_a_daemon_restart(tmp_path):
    state = tmp_path / "restart"
    d = start_daemon(state)
    try:
        with Client(d.target, retries=6) as c:
            c.create_table(TABLE, 4, 4)
            assert d.stop() == 0
            d = start_daemon(state)  # same socket; the client's credential is unknown to this daemon
            c.drop_table(TABLE)  # admin: the new credential says root again
            with pytest.raises(EmbtierClientError) as err:
                c.describe(TABLE)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        assert d.stop() == 0, d.log()


def test_auth_off_lets_every_peer_do_everything(tmp_path):
    config = tmp_path / "off.toml"
    config.write_text("[tiering]\nenabled = false\n[auth]\nenabled = false\n")
    d = start_daemon(tmp_path / "off", config=config)
    try:
        with grpc.insecure_channel(d.tcp) as channel:
            stub = pb_grpc.EmbeddingStoreStub(channel)
            stub.CreateTable(pb.CreateTableRequest(name=TABLE, num_rows=4, dim=4), timeout=10)
            stub.WriteRows(pb.WriteRowsRequest(table=TABLE, ids=np.array([1], "<i8").tobytes(),
                                               values=np.ones(4, "<f4").tobytes()), timeout=10)
            stub.DropTable(pb.DropTableRequest(name=TABLE), timeout=10)
        assert not Path(str(d.socket_path) + ".shm").exists()  # no credentials to hand out
    finally:
        assert d.stop() == 0, d.log()
