"""W3C trace context: read the agent's ``traceparent``, choose ids, write ours upstream."""

from __future__ import annotations

import random
import re

from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_INVALID_TRACE = "0" * 32
_INVALID_SPAN = "0" * 16


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace_id, span_id, flags) from a ``traceparent`` header, None if absent or invalid."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == "ff":
        return None
    trace_hex, span_hex = m.group(2), m.group(3)
    if trace_hex == _INVALID_TRACE or span_hex == _INVALID_SPAN:
        return None
    return int(trace_hex, 16), int(span_hex, 16), int(m.group(4), 16)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    """A version-00 ``traceparent`` header value."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def new_span_id() -> int:
    """A random non-zero 64-bit span id."""
    return random.getrandbits(64) or 1


def new_trace_id() -> int:
    """A random non-zero 128-bit trace id."""
    return random.getrandbits(128) or 1


class PresetIdGenerator(IdGenerator):
    """Hands out ids chosen earlier, then random ones.

    The sidecar must put its span id in the upstream ``traceparent`` before
    the span exists (spans are built after the response is sent), so it picks
    the ids itself and presets them right before creating each span.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._trace_id: int | None = None
        self._span_id: int | None = None

    def preset(self, trace_id: int | None, span_id: int | None) -> None:
        """Use these ids for the next span created (synchronously, right after)."""
        self._trace_id, self._span_id = trace_id, span_id

    def generate_span_id(self) -> int:
        span_id, self._span_id = self._span_id, None
        return span_id if span_id is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        trace_id, self._trace_id = self._trace_id, None
        return trace_id if trace_id is not None else self._random.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return True
