"""TLS for the TCP listeners: the [server.tls] PEM files, checked, as gRPC server credentials.

gRPC's own checks of these files happen deep in its core and say little; the
files are therefore read once here and checked with the standard library's
OpenSSL first (the chain and the key parse, the key is the certificate's,
the key is not encrypted, the client CA bundle holds certificates), so a bad
file stops the daemon at start with an error naming the key and the path.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from embtierd.config import TlsConfig
from embtierd.errors import ConfigError


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from e


def _encrypted_key() -> bytes:
    raise ConfigError("the private key is encrypted; gRPC needs it unencrypted "
                      "(protect it with file permissions)")


def check(tls: TlsConfig) -> tuple[bytes, bytes, bytes | None]:
    """(cert chain, key, client CA bundle or None) as PEM bytes, after checking they fit together."""
    if tls.cert is None or tls.key is None:
        raise ValueError("TLS is not configured")
    cert = _read(tls.cert, "server.tls.cert")
    key = _read(tls.key, "server.tls.key")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ConfigError(f"server.tls.cert: {tls.cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"server.tls.key: {tls.key} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_encrypted_key)
    except ConfigError as e:
        raise ConfigError(f"server.tls.key: {tls.key}: {e}") from None
    except ssl.SSLError as e:
        reason = ("the key does not belong to the certificate" if e.reason == "KEY_VALUES_MISMATCH"
                  else f"OpenSSL cannot use them: {e}")
        raise ConfigError(f"server.tls.cert {tls.cert} and server.tls.key {tls.key}: {reason}") from None
    ca = None
    if tls.client_ca is not None:
        ca = _read(tls.client_ca, "server.tls.client_ca")
        try:
            ssl.create_default_context(cafile=str(tls.client_ca))
        except ssl.SSLError as e:
            raise ConfigError(f"server.tls.client_ca: {tls.client_ca} holds no usable CA certificate: "
                              f"{e}") from None
    return cert, key, ca


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS credentials; with a client CA, clients must present a certificate it signed (mutual TLS)."""
    cert, key, ca = check(tls)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=ca is not None)
