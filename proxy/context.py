"""What the pipeline's stages share about one request, and the Stage base class.

A stage sees the request only through RequestContext; it never reaches into
another stage. Stages that want something on the span call
``ctx.annotate(...)``; stages that take measurable time record a phase, and
telemetry turns phases into child spans after the response is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.wire.canonical import CanonicalRequest, Endpoint
from proxy.wire.usage import ResponseSummary, Usage

# Span/metric attribute values the OpenTelemetry API accepts.
AttributeValue = str | bool | int | float | tuple[str, ...]
ATTRIBUTE_PREFIX = "llm_sidecar."


@dataclass(slots=True)
class Identity:
    """Who a request is for. The API key itself is never kept, only its hash."""

    namespace: str
    tenant: str
    agent: str | None


@dataclass(slots=True)
class Phase:
    """A timed piece of a request (upstream call, cache lookup), wall clock in ns."""

    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


@dataclass(slots=True)
class RequestContext:
    """Everything the stages know about one request, passed explicitly from stage to stage."""

    request: web.Request
    canonical: CanonicalRequest
    started: float  # perf_counter, for durations
    started_ns: int  # wall clock, for span timestamps
    identity: Identity | None = None
    # Headers stages want on the response (x-sidecar-*, x-ratelimit-*) and upstream.
    response_headers: dict[str, str] = field(default_factory=dict)
    upstream_headers: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    upstream_s: float = 0.0
    status: int | None = None
    response_body: bytes | None = None
    # Set from the stream as it passes; for a JSON answer, parsed on first use.
    stream_summary: ResponseSummary | None = None
    reported_overhead_ms: float | None = None
    first_chunk_ns: int | None = None
    finished_ns: int | None = None
    error_kind: str | None = None
    # Per-request state of stages: telemetry (trace and span ids), limits (charges),
    # cache (keys to store the answer under).
    trace: Any = None
    limit: Any = None
    cache: Any = None
    route: Any = None
    # Which configured upstream serves the request (None: the default one) and,
    # once forwarded, the model that really answered after retries/fallbacks.
    upstream_name: str | None = None
    answered_by: str | None = None
    attempts: int = 0
    fallbacks: int = 0  # of the attempts, those on a fallback model
    # Set by a stage that wants to see a JSON answer before its headers are sent
    # (the route stage prices it for x-sidecar-cost-usd).
    answer_hook: Callable[[RequestContext], None] | None = None
    # Set by a stage that wants each streamed event's data as it is relayed.
    stream_sink: Callable[[bytes], None] | None = None
    # Set by a stage that sent upstream a different request than the client's
    # (a batch minus its cache hits) and must turn a 200 answer back into the
    # client's; raises RewriteFailed when the answer cannot be mapped back.
    rewrite_body: Callable[[bytes], bytes] | None = None

    @property
    def endpoint(self) -> Endpoint:
        """The intercepted endpoint."""
        return self.canonical.endpoint

    def annotate(self, key: str, value: AttributeValue) -> None:
        """Add a sidecar attribute to this request's span (``llm_sidecar.<key>``)."""
        self.attributes[ATTRIBUTE_PREFIX + key] = value

    def record_phase(self, name: str, start_ns: int, end_ns: int,
                     **attributes: AttributeValue) -> None:
        """Record a timed stage (becomes a child span)."""
        self.phases.append(Phase(name, start_ns, end_ns, attributes))

    def overhead_ms(self, now: float | None = None) -> float:
        """Time spent in the sidecar so far, upstream time excluded."""
        end = time.perf_counter() if now is None else now
        return (end - self.started - self.upstream_s) * 1000.0

    def summary(self) -> ResponseSummary:
        """Id, model, finish reasons and usage of the answer (parsed once, on demand)."""
        if self.stream_summary is None:
            body = self.response_body
            self.stream_summary = (ResponseSummary.from_body(body)
                                   if body is not None and self.status == 200
                                   else ResponseSummary())
        return self.stream_summary

    def usage(self) -> Usage | None:
        """Real token usage reported by the provider, if any."""
        return self.summary().usage


class RewriteFailed(Exception):
    """An upstream answer a stage's ``rewrite_body`` could not map to the client's request."""


class Stage:
    """Base of pipeline stages: override the hooks the stage needs.

    Hooks run in stage order on the way in and in reverse order on the way
    out, like nested middleware, so the stage that opens something (a span)
    is the last to close it.
    """

    name = "stage"

    async def on_request(self, ctx: RequestContext) -> web.StreamResponse | None:
        """Before the upstream call; return a response to answer the request here."""
        return None

    async def on_settle(self, ctx: RequestContext) -> None:
        """After the response was sent to the client."""

    def on_reject(self, endpoint: Endpoint, status: int, code: str) -> None:
        """A request refused before it could be parsed (bad body, too large)."""
