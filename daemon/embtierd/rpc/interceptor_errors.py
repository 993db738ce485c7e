"""Error mapping, in one place: every EmbtierError becomes its gRPC status
with its message; anything else is logged and becomes INTERNAL, and the
daemon keeps serving."""

from __future__ import annotations

import logging

import grpc

from embtierd.errors import EmbtierError

log = logging.getLogger(__name__)

STATUS = {code.name: code for code in grpc.StatusCode}


def _guarded(behavior, method: str):
    def call(request, context):
        try:
            return behavior(request, context)
        except EmbtierError as e:
            context.abort(STATUS[e.status], str(e))
        except MemoryError:
            log.warning("%s: out of memory", method)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{method}: the daemon ran out of memory")
        except Exception:
            log.exception("%s failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (see the daemon's log)")

    return call


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guarded(handler.unary_unary, handler_call_details.method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
