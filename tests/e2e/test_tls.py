"""TLS and mutual TLS on the TCP listeners of a real daemon; the Unix socket stays plaintext.

The certificates are made per module with the openssl command line: a test
CA, a server certificate for 127.0.0.1 and ::1 and a client certificate it
signs, and an untrusted client certificate signed by another CA.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from embtier import Client, EmbtierClientError, TlsOptions
from embtierd.config import TlsConfig, interface_addresses
from embtierd.errors import ConfigError
from embtierd.rpc import tls

from tests.support import OPENSSL_CNF, daemon_args, free_port, make_ca, make_leaf, openssl, start_daemon

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")



@dataclass(frozen=True)
class Pki:
    ca: Path  # the trusted CA certificate
    server_cert: Path
    server_key: Path
    client_cert: Path  # signed by ca
    client_key: Path
    rogue_cert: Path  # signed by another CA, with the same subject
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)
    make_ca(d, "ca")
    make_ca(d, "rogue_ca")
    make_leaf(d, "server", "ca", "server", "/CN=127.0.0.1")
    make_leaf(d, "client", "ca", "client", "/CN=trainer")
    make_leaf(d, "rogue", "rogue_ca", "client", "/CN=trainer")
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue.pem", d / "rogue.key")


def write_config(path: Path, **server: str | int | dict) -> Path:
    lines = ["[server]"]
    tables = []
    for key, value in server.items():
        if isinstance(value, dict):
            tables.append(f"[server.{key}]")
            tables += [f'{k} = "{v}"' for k, v in value.items()]
        else:
            lines.append(f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"')
    path.write_text("\n".join(lines + tables) + "\n")
    return path


@pytest.fixture(scope="module")
def mtls_daemon(pki, tmp_path_factory):
    state = tmp_path_factory.mktemp("mtls")
    cfg = write_config(state / "embtierd.toml", tls={"cert": pki.server_cert, "key": pki.server_key,
                                                      "client_ca": pki.ca})
    with cfg.open("a") as f:  # the client certificate may write (roles: tests/e2e/test_auth.py)
        f.write('[auth.grants.trainer]\nidentity = "cert:trainer"\nrole = "writer"\n')
    d = start_daemon(state / "daemon", config=cfg)
    yield d
    assert d.stop() == 0, d.log()


def client(target: str, tls: TlsOptions | None) -> Client:
    """No retries and a short deadline: a refused handshake fails at once."""
    return Client(target, timeout=5, tls=tls, retries=0)


def assert_refused(target: str, tls: TlsOptions | None) -> None:
    with client(target, tls) as c, pytest.raises(EmbtierClientError) as failed:
        c.tiers()
    assert failed.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), failed.value


def test_mtls_client_with_trusted_certificate(mtls_daemon, pki):
    tls = TlsOptions(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    with client(mtls_daemon.tcp, tls) as c:  # (its certificate, "trainer", is granted writer)
        assert {t.name for t in c.tiers()} >= {"dram", "cxl", "scm"}
        c.create_table("tls_t", num_rows=10, dim=4)
        assert "tls_t" in {t.name for t in c.tables()}
    log = mtls_daemon.log()
    assert f"listening on {mtls_daemon.tcp} (mTLS)" in log
    assert f"listening on {mtls_daemon.target} (plaintext)" in log


def test_mtls_refuses_client_without_certificate(mtls_daemon, pki):
    assert_refused(mtls_daemon.tcp, TlsOptions(str(pki.ca)))


def test_mtls_refuses_untrusted_client_certificate(mtls_daemon, pki):
    assert_refused(mtls_daemon.tcp, TlsOptions(str(pki.ca), str(pki.rogue_cert), str(pki.rogue_key)))


def test_mtls_refuses_plaintext_client(mtls_daemon):
    assert_refused(mtls_daemon.tcp, None)


def test_client_refuses_server_it_does_not_trust(mtls_daemon, pki):
    # the rogue CA did not sign the server certificate
    assert_refused(mtls_daemon.tcp, TlsOptions(str(pki.rogue_cert.parent / "rogue_ca.pem"),
                                               str(pki.client_cert), str(pki.client_key)))


def test_unix_socket_stays_plaintext(mtls_daemon):
    with client(mtls_daemon.target, None) as c:
        assert {t.name for t in c.tiers()} >= {"dram", "cxl", "scm"}
        c.tables()


def test_tls_without_client_ca_and_listen_interface(pki, tmp_path):
    """TLS only: the CA alone is enough; the daemon also listens on lo's addresses at listen_port."""
    port = free_port()
    cfg = write_config(tmp_path / "embtierd.toml", listen_interface="lo", listen_port=port,
                       tls={"cert": pki.server_cert, "key": pki.server_key})
    d = start_daemon(tmp_path / "daemon", config=cfg)
    try:
        for target in (d.tcp, f"127.0.0.1:{port}"):
            with client(target, TlsOptions(str(pki.ca))) as c:
                assert [t.name for t in c.tables()] == []
                assert c.tiers()
        if "::1" in interface_addresses("lo"):  # unless IPv6 is off
            assert f"listening on [::1]:{port} (TLS)" in d.log()
            mtls_client = TlsOptions(str(pki.ca), str(pki.client_cert), str(pki.client_key))
            with client(f"[::1]:{port}", mtls_client) as c:
                assert c.tiers()  # a client certificate the server does not ask for is fine too
        assert_refused(f"127.0.0.1:{port}", None)
        assert f"listening on 127.0.0.1:{port} (TLS)" in d.log()
    finally:
        assert d.stop() == 0, d.log()


def run_daemon_expecting_failure(state_dir: Path, config: Path) -> str:
    state_dir.mkdir()
    args, *_ = daemon_args(state_dir, config=config)
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_key_of_another_certificate_stops_the_daemon(pki, tmp_path):
    cfg = write_config(tmp_path / "embtierd.toml", tls={"cert": pki.server_cert, "key": pki.client_key})
    err = run_daemon_expecting_failure(tmp_path / "daemon", cfg)
    assert "server.tls.key" in err and "does not belong to the certificate" in err


def test_unknown_interface_stops_the_daemon(tmp_path):
    cfg = write_config(tmp_path / "embtierd.toml", listen_interface="nosuch0")
    err = run_daemon_expecting_failure(tmp_path / "daemon", cfg)
    assert "no network interface 'nosuch0'" in err and "lo" in err


def test_credentials_checks(pki, tmp_path):
    """embtierd.tls.check: what gRPC would reject late and vaguely is refused at start, naming the key
    and the path."""
    ok = TlsConfig(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca)
    cert, key, ca = tls.check(ok)
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" in key
    assert ca == pki.ca.read_bytes()
    assert tls.server_credentials(ok) is not None
    encrypted = tmp_path / "encrypted.key"
    openssl(tmp_path, "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
            "-out", str(encrypted))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for bad, message in [
        (TlsConfig(cert=pki.server_cert, key=encrypted),
         f"server.tls.key: {encrypted}: the private key is encrypted"),
        (TlsConfig(cert=junk, key=pki.server_key), f"server.tls.cert: {junk} holds no PEM certificate"),
        (TlsConfig(cert=pki.server_cert, key=pki.server_cert),
         f"server.tls.key: {pki.server_cert} holds no PEM"),
        (TlsConfig(cert=pki.server_cert, key=pki.server_key, client_ca=pki.server_key),
         f"server.tls.client_ca: {pki.server_key} holds no usable CA certificate"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            tls.check(bad)


def test_print_config_shows_tls(pki, tmp_path):
    cfg = write_config(tmp_path / "embtierd.toml", listen_interface="lo",
                       tls={"cert": pki.server_cert, "key": pki.server_key, "client_ca": pki.ca})
    args = [*daemon_args(tmp_path, config=cfg)[0], "--print-config"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    server = json.loads(done.stdout)["server"]
    assert server["tls"] == {"cert": str(pki.server_cert), "key": str(pki.server_key),
                             "client_ca": str(pki.ca)}
    assert server["listen_interface"] == "lo" and server["listen_port"] == 50051
