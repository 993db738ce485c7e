"""What the server does around every unary call, in one wrapper built once per method:

- metrics: every call counted by method and final status code, and timed, around everything
  else.  The method label is the method's name for the daemon's own service ("Lookup") and
  service/method for the others ("grpc.health.v1.Health/Check"); streaming calls (health
  Watch, reflection) are not counted.
- draining on shutdown: once the daemon is stopping, new calls get UNAVAILABLE ("shutting
  down", so clients retry elsewhere or later) while the calls already running finish; health
  checks still answer (NOT_SERVING).
- the plan fence of a cluster host (cluster/fence.py): a request routed by an older shard plan
  than the daemon's is refused (FAILED_PRECONDITION, the daemon's version in the trailing
  metadata); the others are counted while they run.
- who may call it ([auth], rpc/auth.py): a call beyond its peer's role is PERMISSION_DENIED, counted
  and logged; health checks and reflection are open to every peer.
- error mapping, in one place: every EmbtierError becomes its gRPC status with its message;
  anything else is logged and becomes INTERNAL, and the daemon keeps serving.

One wrapper rather than an interceptor for each: gRPC runs an interceptor chain on every call
and each link builds a new handler; this one builds a method's wrapped handler on its first
call and reuses it (a call then costs one dict lookup and one Python frame around the servicer).
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
from embtier.wire import PLAN_METADATA_KEY

from embtierd.cluster.fence import PlanFence, StalePlanError
from embtierd.errors import EmbtierError
from embtierd.rpc.auth import Authorizer, required_role
from embtierd.rpc.metrics import Metrics

log = logging.getLogger(__name__)

STATUS = {code.name: code for code in grpc.StatusCode}
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def method_label(full_method: str, own_service: str) -> str:
    """'/embtier.v1.EmbeddingStore/Lookup' -> 'Lookup'; '/grpc.health.v1.Health/Check' ->
    'grpc.health.v1.Health/Check' (when own_service is 'embtier.v1.EmbeddingStore')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return method if service == own_service else f"{service}/{method}"


class CallInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics, own_service: str, draining: threading.Event,
                 fence: PlanFence | None = None, authorizer: Authorizer | None = None):
        self.metrics = metrics
        self.authorizer = authorizer
        self.fence = fence
        self.own_service = own_service
        self.draining = draining
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # full method -> its wrapped handler

    def intercept_service(self, continuation, handler_call_details):
        wrapped = self._wrapped.get(handler_call_details.method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = self._wrap(handler, handler_call_details.method)
        self._wrapped[handler_call_details.method] = wrapped  # (the same for every call of the method)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        method = method_label(full_method, self.own_service)
        latency = self.metrics.latency.labels(method)
        requests = self.metrics.requests
        draining = None if full_method.startswith(HEALTH_PREFIX) else self.draining
        fence = None if full_method.startswith(HEALTH_PREFIX) else self.fence
        authorizer = self.authorizer
        need = required_role(method) if authorizer is not None else None

        def call(request, context):
            start = time.perf_counter()
            failed = True
            token = None
            try:
                if draining is not None and draining.is_set():
                    context.abort(grpc.StatusCode.UNAVAILABLE, "embtierd is shutting down")
                try:
                    if need is not None:
                        authorizer.check(method, need, context)
                    if fence is not None:
                        version = fence.requested(context.invocation_metadata())
                        if version is not None:
                            token = fence.enter(version)
                    reply = behavior(request, context)
                except StalePlanError as e:
                    context.set_trailing_metadata(((PLAN_METADATA_KEY, str(e.current)),))
                    context.abort(STATUS[e.status], str(e))
                except EmbtierError as e:
                    context.abort(STATUS[e.status], str(e))
                except MemoryError:
                    log.warning("%s: out of memory", full_method)
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{full_method}: the daemon ran out of memory")
                except Exception:
                    log.exception("%s failed", full_method)
                    context.abort(grpc.StatusCode.INTERNAL, f"{full_method}: internal error (see the daemon's log)")
                failed = False
                return reply
            finally:
                if token is not None:
                    fence.exit(token)
                latency.observe(time.perf_counter() - start)
                code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
                requests.labels(method, code.name).inc()

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
