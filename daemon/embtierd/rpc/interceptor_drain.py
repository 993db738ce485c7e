"""Draining on shutdown: once the daemon is stopping, new calls get
UNAVAILABLE ("shutting down", so clients retry elsewhere or later) while
the calls already running finish.  Health checks still answer (NOT_SERVING)."""

from __future__ import annotations

import threading

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class DrainInterceptor(grpc.ServerInterceptor):
    def __init__(self, draining: threading.Event):
        self.draining = draining

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        behavior = handler.unary_unary

        def call(request, context):
            if self.draining.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, "embtierd is shutting down")
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
