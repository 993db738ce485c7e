"""The daemon process: store + gRPC server + health + reflection + metrics
endpoint, systemd notification, and an orderly shutdown.

Server reflection answers as grpc.reflection.v1 (what grpcurl and Postman ask
for first) and as grpc.reflection.v1alpha.  grpcio-reflection (up to 1.85,
the newest) ships only v1alpha; the two protocols are the same messages with
the same field numbers under another package, so one servicer answers both:
v1 is v1alpha's descriptor renamed (so that reflection describes it too) and
its method is routed to the v1alpha servicer.

Shutdown (SIGTERM / SIGINT): STOPPING=1 to systemd, health NOT_SERVING and
new calls answered UNAVAILABLE for a short drain window (so clients stop
sending before the listener closes), then the server stops accepting and
finishes calls in flight within the grace period, then the store closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import stat
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from embtier.v1 import embtier_pb2, embtier_pb2_grpc
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from embtierd.cluster.fence import PlanFence
from embtierd.cluster.member import Membership, memory_pool_rate, scm_pool_rate
from embtierd.config import Config, ServerConfig, interface_addresses, tcp_address
from embtierd.durability import checkpoint, recovery
from embtierd.durability.wal import WriteAheadLog
from embtierd.rpc import shm
from embtierd.rpc import tls as tls_mod
from embtierd.rpc.auth import Authorizer
from embtierd.rpc.interceptor import CallInterceptor
from embtierd.rpc.metrics import Metrics
from embtierd.rpc.service import EmbeddingStoreServicer
from embtierd.store.catalog import Store
from embtierd.tenancy.scheduler import Scheduler
from embtierd.tenancy.tenants import Tenants
from embtierd.tiering.engine import TieringEngine

log = logging.getLogger(__name__)

SERVICE_NAME = embtier_pb2.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEFAULT_TCP = "127.0.0.1:50051"
DRAIN_SECONDS = 0.5
KEEPALIVE_TIMEOUT_MS = 20_000
SOCKET_MODE = 0o660


def reflection_v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc_reflection/v1/reflection.proto, made from v1alpha's: every "v1alpha" in names, types and
    options becomes "v1", and the file is no longer deprecated."""
    v1alpha = descriptor_pb2.FileDescriptorProto.FromString(reflection_pb2.DESCRIPTOR.serialized_pb)
    v1 = text_format.Parse(text_format.MessageToString(v1alpha).replace("v1alpha", "v1"),
                           descriptor_pb2.FileDescriptorProto())
    v1.options.ClearField("deprecated")
    return v1


REFLECTION_V1 = descriptor_pool.Default().AddSerializedFile(reflection_v1_file().SerializeToString())
REFLECTION_V1_SERVICE_NAME = REFLECTION_V1.services_by_name["ServerReflection"].full_name


def enable_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Server reflection of services (and of itself) as grpc.reflection.v1 and v1alpha."""
    servicer = reflection.ReflectionServicer((*services, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE_NAME, {"ServerReflectionInfo": info}),))


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


def grpc_options(server: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message limits, and when connections are closed."""
    limit = server.max_message_bytes
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
               ("grpc.keepalive_time_ms", int(server.keepalive_seconds * 1000)),
               ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
               ("grpc.http2.max_pings_without_data", 0),
               ("grpc.server_handshake_timeout_ms", int(server.handshake_timeout_seconds * 1000))]
    if server.idle_timeout_seconds > 0:
        options.append(("grpc.max_connection_idle_ms", int(server.idle_timeout_seconds * 1000)))
    return options


def raise_open_file_limit() -> None:
    """Raises the soft limit on open files to the hard one: every connection costs a descriptor,
    and the metrics endpoint must still accept when many clients are connected."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open file limit raised from %d to %d", soft, target)
    except (OSError, ValueError) as e:
        log.warning("open file limit stays %d: raising it to %d failed: %s", soft, target, e)


def private_state(state_dir: Path) -> None:
    """The state directory made (or kept) 0700, and what earlier versions left readable by others
    in it made private: the log and checkpoints hold every row.  (Files are made 0600 anyway: the
    daemon runs with umask 077.)"""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if state_dir.stat().st_uid != os.geteuid():
        log.warning("state directory %s belongs to another user: its permissions are left as they are", state_dir)
        return
    for path in [state_dir, *(p for sub in ("wal", "checkpoints") for p in (state_dir / sub).rglob("*")),
                 *(state_dir / sub for sub in ("wal", "checkpoints"))]:
        with contextlib.suppress(FileNotFoundError):
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not mode & 0o077:
                continue
            os.chmod(path, stat.S_IMODE(mode) & 0o700)
            log.info("made %s private (was %o)", path, stat.S_IMODE(mode))


class Daemon:
    def __init__(self, config: Config, salvage: bool = False):
        """salvage: start with every table that is intact when the checkpoints and the log cannot
        rebuild them all (see recovery.py), instead of refusing to start."""
        self.config = config
        # listeners and TLS files first: a mistake there stops the daemon before the tiers are allocated
        self.addresses = listen_addresses(config)
        tls = config.server.tls
        self.credentials = tls_mod.server_credentials(tls) if tls.enabled else None
        self.security = "mTLS" if tls.mutual else "TLS" if tls.enabled else "plaintext"
        self.authorizer = Authorizer(config.auth) if config.auth.enabled else None  # (its grants checked here)
        raise_open_file_limit()
        private_state(config.state_dir)
        self.store = Store(config)
        self.draining = threading.Event()
        self.metrics = Metrics(self.store)
        if self.authorizer is not None:
            self.authorizer.count_denied(lambda method: self.metrics.auth_denied.labels(method).inc())
        self.tiering = TieringEngine(self.store, config.tiering, self.metrics)
        self.checkpoints: checkpoint.Checkpointer | None = None
        self.wal = self._recover(salvage) if config.durability.wal else None
        self.scheduler = Scheduler(config.scheduler, self.metrics.tenant_outcome)
        self.metrics.tenants(config.tenants)
        self.metrics.scheduler_queued.set_function(lambda: self.scheduler.queued)
        # With the scheduler, a lookup's gRPC thread waits while it is queued: the pool has a thread for
        # each lookup the queue may hold, so that a call never waits for a thread in arrival order.
        self.fence = PlanFence() if config.cluster.name else None
        self.membership: Membership | None = None
        self.advertise = config.cluster.advertise or next((a for a in self.addresses if not is_unix(a)), "")
        if config.cluster.name and not self.advertise:
            raise OSError("cluster.advertise: the daemon has no TCP listen address to advertise; give one "
                          "(--advertise HOST:PORT)")
        threads = config.server.worker_threads + (config.scheduler.max_queued if config.scheduler.enabled else 0)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
            interceptors=[CallInterceptor(self.metrics, SERVICE_NAME, self.draining, self.fence, self.authorizer)],
            options=grpc_options(config.server))
        servicer = EmbeddingStoreServicer(self.store, config.server, self.metrics, self.tiering,
                                          Tenants(config.tenants), self.scheduler)
        servicer.checkpoints = self.checkpoints
        self.side_servers: list[shm.SideServer] = []
        self.shm = shm.Registry(config.server.shared_memory_max_bytes) if config.server.shared_memory else None
        servicer.shm = self.shm
        embtier_pb2_grpc.add_EmbeddingStoreServicer_to_server(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, (SERVICE_NAME, HEALTH_SERVICE_NAME))
        self._stop = threading.Event()
        self._exit_code = 0
        if self.checkpoints is not None:
            self.checkpoints.on_fatal = self._fatal
        if self.wal is not None:
            self.wal.on_failed = self._fatal

    def _recover(self, salvage: bool) -> WriteAheadLog:
        """Rebuilds the (empty) store from the checkpoints and the log, which logs from here on."""
        d = self.config.durability
        durable = recovery.open_durable(self.store, self.config.state_dir, d, self.metrics, salvage)
        self.checkpoints = durable.checkpoints
        counts = durable.replayed.counts
        log.info("write-ahead log %s (fsync %s): replayed %d creations, %d drops, %d writes, %d policy changes, "
                 "%d restores after LSN %d, up to LSN %d, in %.2f s", self.config.state_dir / "wal", d.fsync,
                 counts["create"], counts["drop"], counts["write"], counts["policy"], counts["restore"],
                 durable.covered_lsn, durable.wal.last_lsn, durable.seconds)
        if self.config.tiering.enabled:  # the saved heat puts the hot rows back in the fast tiers now
            self.tiering.settle()
        return durable.wal

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
            if address.startswith("unix://"):  # members of the daemon's group may connect (umask 077 made it 0700)
                os.chmod(address[len("unix://"):], SOCKET_MODE)
            log.info("listening on %s (%s)", address, security)
            if (self.shm is not None or self.authorizer is not None) and address.startswith("unix://"):
                self.side_servers.append(shm.SideServer(shm.side_socket_path(Path(address[len("unix://"):])),
                                                        self.shm, SOCKET_MODE, self.authorizer))
        if self.shm is not None and not self.side_servers:
            log.warning("server.shared_memory is on, but the daemon listens on no Unix socket (unix://PATH): "
                        "no client can register a region")

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
        self._join_cluster()
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

    def _join_cluster(self) -> None:
        cluster = self.config.cluster
        if not cluster.name:
            return
        capacity = {t.name: t.capacity_bytes for t in self.store.tier_infos()}
        rates = {"dram": memory_pool_rate(), "scm": scm_pool_rate(self.config.state_dir)}
        rates["cxl"] = rates["dram"]  # (an emulated tier is DRAM; a real one would be probed on its node)
        self.membership = Membership(cluster, self.advertise, capacity,
                                     lambda: {t.name: t.used_bytes for t in self.store.tier_infos()}, rates,
                                     self.fence)
        self.membership.start()

    def _fatal(self) -> None:
        """Stops serving with a failure status (the service manager restarts the daemon)."""
        self._exit_code = 70  # EX_SOFTWARE
        self._stop.set()

    def shutdown(self) -> None:
        log.info("shutting down: finishing calls in flight (grace %.1f s)", self.config.server.grace_seconds)
        sd_notify("STOPPING=1")
        if self.membership is not None:  # out of the live set first: clients go to the other replicas
            self.membership.stop()
        self.health.enter_graceful_shutdown()
        self.draining.set()
        time.sleep(min(DRAIN_SECONDS, self.config.server.grace_seconds))
        self.server.stop(self.config.server.grace_seconds).wait()
        for side in self.side_servers:
            side.close()
        self.scheduler.stop()
        self.tiering.stop()
        if self.checkpoints is not None:
            self.checkpoints.stop()
        if self.wal is not None:
            self.wal.close()
        self.store.close()
        log.info("stopped")
