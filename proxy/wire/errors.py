"""Error responses the sidecar itself produces, in OpenAI's JSON shape.

Upstream errors are relayed untouched; these are only for what the sidecar
decides on its own (bad input, upstream unreachable, ...). Messages never echo
request content or credentials.
"""

from __future__ import annotations

import orjson
from aiohttp import web

JSON_CONTENT_TYPE = "application/json"


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> bytes:
    """Serialize ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": {"message": message, "type": type_,
                                   "param": param, "code": code}})


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-style error response produced by the sidecar (marked ``x-sidecar-error``)."""
    hdrs = {"x-sidecar-error": code or type_}
    if headers:
        hdrs.update(headers)
    return web.Response(status=status, body=error_body(message, type_, code, param),
                        content_type=JSON_CONTENT_TYPE, headers=hdrs)


def invalid_json(detail: str) -> web.Response:
    """400 for an intercepted endpoint whose body is not a JSON object."""
    return error_response(
        400,
        "We could not parse the JSON body of your request. The OpenAI API expects a "
        f"JSON object as the request body ({detail}).",
        "invalid_request_error", "invalid_json")


def body_too_large(limit: int) -> web.Response:
    """413 for a body above the configured limit."""
    return error_response(
        413, f"Request body exceeds the sidecar's limit of {limit} bytes.",
        "invalid_request_error", "request_too_large")


def unsupported_encoding(coding: str) -> web.Response:
    """415 for a request body in a Content-Encoding the sidecar cannot decode."""
    return error_response(
        415, f"Unsupported Content-Encoding {coding[:40]!r}: send gzip, deflate or identity.",
        "invalid_request_error", "unsupported_content_encoding")


def not_found(method: str, path: str) -> web.Response:
    """404 for a route outside the OpenAI API surface, worded like OpenAI's own."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    return error_response(404, f"Invalid URL ({method} {shown})",
                          "invalid_request_error", "unknown_url")


def upstream_unreachable() -> web.Response:
    """502 when no connection to the upstream could be made."""
    return error_response(502, "The sidecar could not connect to the upstream API.",
                          "upstream_error", "upstream_unreachable")


def upstream_failed(reason: str) -> web.Response:
    """502 when the upstream connection broke before a response arrived."""
    return error_response(502, f"The upstream API connection failed: {reason}.",
                          "upstream_error", "upstream_connection_error")


def upstream_timeout(what: str) -> web.Response:
    """504 when the upstream did not answer within the configured timeout."""
    return error_response(504, f"The upstream API timed out ({what}).",
                          "upstream_error", "upstream_timeout")


def internal_error() -> web.Response:
    """500 for a sidecar bug: the only path to a 500, logged with a traceback."""
    return error_response(500, "The sidecar hit an internal error; it has been logged.",
                          "server_error", "sidecar_internal_error")
