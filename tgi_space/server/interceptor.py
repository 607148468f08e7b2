"""Every exception leaving an RPC becomes a gRPC status with a useful message; the server keeps serving."""

from __future__ import annotations

import logging

import grpc

from tgi_space.server.batch import CapacityError, InvalidRequest
from tgi_space.server.shard import BatchNotFound

log = logging.getLogger(__name__)


def status_code(err: BaseException) -> grpc.StatusCode:
    """Bad requests are INVALID_ARGUMENT, unknown batches NOT_FOUND, a full cache RESOURCE_EXHAUSTED."""
    if isinstance(err, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, BatchNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL


class ExceptionInterceptor(grpc.ServerInterceptor):
    """Wraps each unary RPC: log the failure, abort with the mapped status code."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def guarded(request, context):
            try:
                return inner(request, context)
            except Exception as err:  # noqa: BLE001 - the boundary: nothing may escape unmapped
                code = status_code(err)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                else:
                    log.warning("%s refused: %s", method, err)
                context.abort(code, f"{method}: {err}")

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
