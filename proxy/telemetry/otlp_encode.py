"""A small, fast protobuf encoder for OTLP trace export requests.

The SDK's exporter builds protobuf objects for a whole batch at export time,
in pure Python, on a thread that holds the GIL for tens of milliseconds per
512 spans; at a few hundred requests a second that sets the sidecar's p99
(see loadtest/REPORT-telemetry.md). Here each span is encoded to bytes once,
when it is settled (a few microseconds: constant keys and resource are
pre-encoded), and an export request is only a concatenation.

Field numbers follow opentelemetry-proto (trace/v1/trace.proto,
common/v1/common.proto, collector/trace/v1/trace_service.proto); the tests
decode the output with the official generated classes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

AttributeValue = str | bool | int | float | tuple[str, ...]

SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2

_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_SMALL = [bytes([i]) for i in range(128)]


def varint(value: int) -> bytes:
    """Base-128 varint; negative int64 values as their 64-bit two's complement."""
    if 0 <= value < 128:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def field_bytes(field: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, nested messages)."""
    return _tag(field, 2) + varint(len(payload)) + payload


def _field_str(field: int, text: str) -> bytes:
    return field_bytes(field, text.encode())


_KEY_CACHE: dict[str, bytes] = {}


def _key(name: str) -> bytes:
    # Attribute keys repeat on every span: encode each once.
    encoded = _KEY_CACHE.get(name)
    if encoded is None:
        encoded = _field_str(1, name)
        if len(_KEY_CACHE) < 4096:
            _KEY_CACHE[name] = encoded
    return encoded


def any_value(value: AttributeValue) -> bytes:
    """An AnyValue message body."""
    if isinstance(value, str):
        return _field_str(1, value)
    if isinstance(value, bool):  # before int: bool is an int subclass
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    # tuple of strings -> ArrayValue { repeated AnyValue values = 1 }
    inner = b"".join(field_bytes(1, _field_str(1, str(v))) for v in value)
    return field_bytes(5, inner)


# Attributes whose values come from a small set (operation, model, tenant, ...):
# their encoded KeyValue is reused instead of rebuilt on every span.
REPEATING_KEYS = frozenset({
    "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
    "gen_ai.response.model", "gen_ai.response.finish_reasons", "server.address",
    "server.port", "http.response.status_code", "error.type", "llm_sidecar.namespace",
    "llm_sidecar.tenant", "llm_sidecar.agent_id", "llm_sidecar.stream",
    "llm_sidecar.status"})
_KV_CACHE: dict[tuple[str, AttributeValue], bytes] = {}


def key_value(key: str, value: AttributeValue) -> bytes:
    """A KeyValue message body."""
    if key in REPEATING_KEYS:
        cached = _KV_CACHE.get((key, value))
        if cached is None:
            cached = _key(key) + field_bytes(2, any_value(value))
            if len(_KV_CACHE) < 8192:
                _KV_CACHE[(key, value)] = cached
        return cached
    return _key(key) + field_bytes(2, any_value(value))


def attributes(field: int, attrs: Mapping[str, AttributeValue]) -> bytes:
    """``attrs`` as repeated KeyValue field ``field``."""
    return b"".join(field_bytes(field, key_value(k, v)) for k, v in attrs.items())


def encode_span(*, trace_id: int, span_id: int, parent_span_id: int | None, name: str,
                kind: int, start_ns: int, end_ns: int,
                attrs: Mapping[str, AttributeValue], error: bool = False,
                trace_state: str = "", flags: int = 0x101) -> bytes:
    """One ``Span`` message body.

    ``flags`` carries the W3C trace flags (sampled) and the has-is-remote bit
    (0x100) as OTLP defines them.
    """
    parts = [
        field_bytes(1, trace_id.to_bytes(16, "big")),
        field_bytes(2, span_id.to_bytes(8, "big")),
    ]
    if trace_state:
        parts.append(_field_str(3, trace_state))
    if parent_span_id:
        parts.append(field_bytes(4, parent_span_id.to_bytes(8, "big")))
    parts.append(_field_str(5, name))
    parts.append(b"\x30" + varint(kind))
    parts.append(b"\x39" + _FIXED64.pack(start_ns))
    parts.append(b"\x41" + _FIXED64.pack(end_ns))
    parts.append(attributes(9, attrs))
    if error:
        parts.append(field_bytes(15, b"\x18" + varint(STATUS_ERROR)))
    parts.append(b"\x85\x01" + _FIXED32.pack(flags))  # field 16, fixed32
    return b"".join(parts)


class RequestEncoder:
    """Builds ExportTraceServiceRequest bodies for one resource and scope."""

    def __init__(self, resource: Mapping[str, AttributeValue], scope_name: str,
                 scope_version: str) -> None:
        self._resource = field_bytes(1, attributes(1, resource))
        self._scope = field_bytes(1, _field_str(1, scope_name) + _field_str(2, scope_version))

    def request(self, spans: Iterable[bytes]) -> bytes:
        """An export request holding ``spans`` (each an encoded Span body)."""
        scope_spans = self._scope + b"".join(field_bytes(2, s) for s in spans)
        resource_spans = self._resource + field_bytes(2, scope_spans)
        return field_bytes(1, resource_spans)
