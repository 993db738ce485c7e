"""Request metrics: every call counted by method and final status code, and
timed, around everything else the server does with it."""

from __future__ import annotations

import time

import grpc

from embtierd.rpc.metrics import Metrics


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        method = handler_call_details.method.rsplit("/", 1)[-1]
        latency = self.metrics.latency.labels(method)

        def call(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return behavior(request, context)
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                latency.observe(time.perf_counter() - start)
                self.metrics.requests.labels(method, code.name).inc()

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
