"""The daemon process: store + gRPC server + health + reflection + metrics
endpoint, systemd notification, and an orderly shutdown.

Shutdown (SIGTERM / SIGINT): STOPPING=1 to systemd, health NOT_SERVING and
new calls answered UNAVAILABLE for a short drain window (so clients stop
sending before the listener closes), then the server stops accepting and
finishes calls in flight within the grace period, then the store closes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from embtier.v1 import embtier_pb2, embtier_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import checkpoint
from . import tls as tls_mod
from .config import Config, interface_addresses, tcp_address
from .interceptor_drain import DrainInterceptor
from .interceptor_errors import ErrorInterceptor
from .interceptor_metrics import MetricsInterceptor
from .journal import Journal, replay
from .metrics import Metrics
from .service import EmbeddingStoreServicer
from .store import Store
from .tiering import TieringEngine
from .wal import WriteAheadLog

log = logging.getLogger(__name__)

SERVICE_NAME = embtier_pb2.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
DEFAULT_TCP = "127.0.0.1:50051"
DRAIN_SECONDS = 0.5


def default_socket(state_dir: Path) -> Path:
    """$RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), else /run/embtier as root, else
    $XDG_RUNTIME_DIR/embtier, else the state directory."""
    service = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if service:
        return Path(service) / "embtierd.sock"
    if os.geteuid() == 0:
        return Path("/run/embtier/embtierd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "embtier" / "embtierd.sock" if runtime else state_dir / "embtierd.sock"


def listen_addresses(config: Config) -> list[str]:
    """server.listen (or the defaults), then each address of server.listen_interface at server.listen_port."""
    addresses = list(config.server.listen) or [f"unix://{default_socket(config.state_dir)}", DEFAULT_TCP]
    if config.server.listen_interface:
        for host in interface_addresses(config.server.listen_interface):
            address = tcp_address(host, config.server.listen_port)
            if address not in addresses:
                addresses.append(address)
    return addresses


def is_unix(address: str) -> bool:
    """Unix socket listeners stay plaintext (file permissions guard them); every other one is TCP."""
    return address.startswith(("unix:", "unix-abstract:"))


def sd_notify(message: str) -> None:
    """Sends message to systemd when it started us with Type=notify (NOTIFY_SOCKET set)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", target, e)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        # listeners and TLS files first: a mistake there stops the daemon before the tiers are allocated
        self.addresses = listen_addresses(config)
        tls = config.server.tls
        self.credentials = tls_mod.server_credentials(tls) if tls.enabled else None
        self.security = "mTLS" if tls.mutual else "TLS" if tls.enabled else "plaintext"
        self.store = Store(config)
        self.draining = threading.Event()
        self.metrics = Metrics(self.store)
        self.tiering = TieringEngine(self.store, config.tiering, self.metrics)
        self.checkpoints: checkpoint.Checkpointer | None = None
        self.wal = self._recover() if config.durability.wal else None
        limit = config.server.max_message_bytes
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.server.worker_threads, thread_name_prefix="rpc"),
            interceptors=[MetricsInterceptor(self.metrics), DrainInterceptor(self.draining), ErrorInterceptor()],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
        servicer = EmbeddingStoreServicer(self.store, config.server, self.metrics, self.tiering)
        servicer.checkpoints = self.checkpoints
        embtier_pb2_grpc.add_EmbeddingStoreServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self._stop = threading.Event()
        self._exit_code = 0
        if self.checkpoints is not None:
            self.checkpoints.on_fatal = self._fatal

    def _recover(self) -> WriteAheadLog:
        """Opens the write-ahead log, replays it into the (empty) store, then logs from here on."""
        d = self.config.durability
        wal = WriteAheadLog(self.config.state_dir / "wal", d.fsync, d.fsync_interval_seconds,
                            on_fsync=self.metrics.wal_fsync)
        start = time.perf_counter()
        self.checkpoints = checkpoint.Checkpointer(self.store, wal, self.config.state_dir / "checkpoints",
                                                   d.checkpoints, self.metrics)
        covered = self.checkpoints.recover()
        counts = replay(self.store, (record for record in wal.replay() if record.lsn > covered))
        seconds = time.perf_counter() - start
        self.metrics.restored(seconds)
        log.info("write-ahead log %s (fsync %s): replayed %d creations, %d drops, %d writes up to LSN %d in %.2f s",
                 self.config.state_dir / "wal", d.fsync, counts["create"], counts["drop"], counts["write"],
                 wal.last_lsn, seconds)
        self.store.journal = Journal(wal)
        self.metrics.watch_wal(wal)
        if wal.last_lsn < covered:  # a log younger than the checkpoint (its directory was replaced):
            self.checkpoints.take("full", 0)  # renumber, or later records would be skipped
        if self.config.tiering.enabled:  # the saved heat puts the hot rows back in the fast tiers now
            self.tiering.settle()
        return wal

    def _bind(self) -> None:
        for address in self.addresses:
            if address.startswith("unix://"):
                path = Path(address[len("unix://"):])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)  # a stale socket from a previous run
            security = "plaintext" if is_unix(address) or self.credentials is None else self.security
            try:
                port = (self.server.add_insecure_port(address) if security == "plaintext"
                        else self.server.add_secure_port(address, self.credentials))
            except RuntimeError as e:  # what grpc raises when the bind fails
                raise OSError(f"cannot listen on {address}: {e}") from None
            if port == 0 and not address.startswith("unix://"):
                raise OSError(f"cannot listen on {address}")
            log.info("listening on %s (%s)", address, security)

    def _start_metrics(self) -> None:
        address = self.config.server.metrics_listen
        if not address:
            return
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.metrics.registry)
        log.info("metrics on http://%s/metrics", address)

    def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0:
            return

        def ping():
            while not self._stop.wait(usec / 2e6):
                sd_notify("WATCHDOG=1")

        threading.Thread(target=ping, name="watchdog", daemon=True).start()

    def serve(self) -> int:
        self._bind()
        self.server.start()
        self._start_metrics()
        self.tiering.start()
        if self.checkpoints is not None:
            self.checkpoints.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", SERVICE_NAME, ", ".join(self.addresses))
        sd_notify("READY=1")
        self._watchdog()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self._stop.set())
        # Woken now and then: a signal that lands on another thread only sets Python's flag, and the
        # handler runs once the main thread executes bytecode again.
        while not self._stop.wait(0.5):
            pass
        self.shutdown()
        return self._exit_code

    def _fatal(self) -> None:
        """Stops serving with a failure status (the service manager restarts the daemon)."""
        self._exit_code = 70  # EX_SOFTWARE
        self._stop.set()

    def shutdown(self) -> None:
        log.info("shutting down: finishing calls in flight (grace %.1f s)", self.config.server.grace_seconds)
        sd_notify("STOPPING=1")
        self.health.enter_graceful_shutdown()
        self.draining.set()
        time.sleep(min(DRAIN_SECONDS, self.config.server.grace_seconds))
        self.server.stop(self.config.server.grace_seconds).wait()
        self.tiering.stop()
        if self.checkpoints is not None:
            self.checkpoints.stop()
        if self.wal is not None:
            self.wal.close()
        self.store.close()
        log.info("stopped")
