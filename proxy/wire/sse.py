"""Server-sent events: split a byte stream into events and watch them for usage.

The relay forwards events exactly as received. The only rewrite is hiding the
usage the sidecar asked for on a client's behalf (``include_usage`` injected):
that client must see the stream it would have seen without the sidecar.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy.wire.canonical import Endpoint
from proxy.wire.usage import ResponseSummary, Usage

_LF2 = b"\n\n"
_CRLF2 = b"\r\n\r\n"
_DONE = b"[DONE]"
# OpenAI serializes chunks compactly with usage as the last key: the common
# case is then a byte-level removal, with a JSON round trip as the fallback.
_USAGE_NULL_TAIL = b',"usage":null}\n\n'
# Telemetry reads ids and finish reasons off the raw events, without decoding them.
_ID = re.compile(rb'"id":\s*"([^"\\]{1,200})"')
_MODEL = re.compile(rb'"model":\s*"([^"\\]{1,200})"')
_FINISH = re.compile(rb'"finish_reason":\s*"([a-z_]{1,40})"')


class SSESplitter:
    """Incremental splitter: feed it reads, get back whole events (separator included)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data`` and return the events it completes, in order."""
        buf = self._buf + data if self._buf else data
        events: list[bytes] = []
        start = 0
        crlf = b"\r" in buf
        while True:
            end = buf.find(_LF2, start)
            sep = 2
            if crlf:
                alt = buf.find(_CRLF2, start)
                if alt != -1 and (end == -1 or alt < end):
                    end, sep = alt, 4
            if end == -1:
                break
            events.append(buf[start:end + sep])
            start = end + sep
        self._buf = buf[start:] if start < len(buf) else b""
        return events

    def remainder(self) -> bytes:
        """Bytes received after the last complete event (a stream cut short)."""
        return self._buf


def event_data(event: bytes) -> bytes:
    """The joined ``data:`` lines of one event ("" if none)."""
    if event.startswith(b"data: ") and event.count(b"\n") <= 2 and b"\r" not in event:
        return event[6:].rstrip(b"\n")
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


class StreamTap:
    """Watches a streamed response: records usage and completion, hides injected usage.

    ``hide_usage`` is set when the sidecar added ``include_usage`` itself: the
    usage-only chunk is dropped and the ``"usage": null`` fields it caused are
    removed from every other chunk.
    """

    __slots__ = ("_splitter", "done", "endpoint", "events", "failure", "finish_reasons",
                 "first_ns", "hide_usage", "response_id", "response_model", "sink", "usage")

    def __init__(self, endpoint: Endpoint, hide_usage: bool,
                 sink: Callable[[bytes], None] | None = None) -> None:
        self.endpoint = endpoint
        self.hide_usage = hide_usage
        # Gets each event's data as received (the cache rebuilds the answer from it).
        self.sink = sink
        self.usage: Usage | None = None
        self.done = False
        self.events = 0
        self.first_ns = 0  # wall clock of the first event relayed (time to first chunk)
        self.failure: str | None = None  # set by the relay if the stream broke
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []
        self._splitter = SSESplitter()

    def feed(self, data: bytes) -> bytes:
        """Take bytes as read from upstream; return the complete events to relay now."""
        events = self._splitter.feed(data)
        if len(events) == 1:
            out = self.process(events[0]) or b""
        else:
            out = b"".join([e for e in map(self.process, events) if e is not None])
        if out and not self.first_ns:
            self.first_ns = time.time_ns()
        return out

    def remainder(self) -> bytes:
        """Bytes after the last complete event, once the stream has ended."""
        return self._splitter.remainder()

    def summary(self) -> ResponseSummary:
        """What the stream said about itself: id, model, finish reasons, usage."""
        return ResponseSummary(self.response_id, self.response_model,
                               tuple(self.finish_reasons), self.usage)

    def process(self, event: bytes) -> bytes | None:
        """Return the event to relay (possibly rewritten), or None to drop it."""
        self.events += 1
        if self.endpoint is Endpoint.RESPONSES:
            if b'"response.completed"' in event or b'"response.incomplete"' in event:
                self.done = True
                if self.sink is not None:  # the terminal event carries the whole answer
                    self.sink(event_data(event))
                doc = _loads(event_data(event))
                if doc is not None:
                    s = ResponseSummary.from_document(doc.get("response"))
                    self.usage, self.response_id, self.response_model = s.usage, s.id, s.model
                    self.finish_reasons = list(s.finish_reasons)
            return event
        if self.sink is not None:
            self.sink(event_data(event))
        if self.events == 1:
            if m := _ID.search(event):
                self.response_id = m.group(1).decode()
            if m := _MODEL.search(event):
                self.response_model = m.group(1).decode()
        if b'"finish_reason":' in event:
            for reason in _FINISH.findall(event):
                if (r := reason.decode()) not in self.finish_reasons:
                    self.finish_reasons.append(r)
        if b'"usage"' not in event:
            if _DONE in event and event_data(event) == _DONE:
                self.done = True
            return event
        if not self.hide_usage:
            if b'"usage":null' not in event:
                doc = _loads(event_data(event))
                if doc is not None:
                    self.usage = Usage.from_openai(doc.get("usage")) or self.usage
            return event
        if event.endswith(_USAGE_NULL_TAIL):
            return event[:-len(_USAGE_NULL_TAIL)] + b"}\n\n"
        return self._rewrite(event)

    def _rewrite(self, event: bytes) -> bytes | None:
        doc = _loads(event_data(event))
        if doc is None or "usage" not in doc:
            return event
        usage = doc.pop("usage")
        if usage is None:
            return b"data: " + orjson.dumps(doc) + b"\n\n"
        self.usage = Usage.from_openai(usage)
        if doc.get("choices") == []:
            return None  # the usage-only chunk the client never asked for
        return b"data: " + orjson.dumps(doc) + b"\n\n"


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
