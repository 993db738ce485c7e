"""Request metrics: every call counted by method and final status code, and
timed, around everything else the server does with it.

The method label is the method's name for the daemon's own service
("Lookup") and service/method for the others ("grpc.health.v1.Health/Check").
Streaming calls (health Watch, reflection) are not counted."""

from __future__ import annotations

import time

import grpc

from embtierd.rpc.metrics import Metrics


def method_label(full_method: str, own_service: str) -> str:
    """'/embtier.v1.EmbeddingStore/Lookup' -> 'Lookup'; '/grpc.health.v1.Health/Check' ->
    'grpc.health.v1.Health/Check' (when own_service is 'embtier.v1.EmbeddingStore')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return method if service == own_service else f"{service}/{method}"


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics, own_service: str):
        self.metrics = metrics
        self.own_service = own_service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        method = method_label(handler_call_details.method, self.own_service)
        latency = self.metrics.latency.labels(method)

        def call(request, context):
            start = time.perf_counter()
            failed = True
            try:
                reply = behavior(request, context)
                failed = False
                return reply
            finally:
                latency.observe(time.perf_counter() - start)
                # the code the call ended with: set by abort, or by a servicer that set it and returned
                code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
                self.metrics.requests.labels(method, code.name).inc()

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
