"""The telemetry stage: trace context in, spans and metrics out.

On the way in it only reads the agent's ``traceparent``, picks the ids of the
spans it will create and the sampling decision, and sets the ``traceparent``
the upstream will see (the sidecar's upstream span as parent). Everything
else happens in ``on_settle``, on the settle worker after the client has its
answer: the request span (``{operation} {model}``, GenAI attributes), one
child span per recorded phase (the upstream call, later cache and rate-limit
phases) and the metrics. With OTLP/HTTP the spans are encoded straight to
protobuf bytes for the loop-native shipper; otherwise SDK spans are created
with the preset ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from proxy.context import ATTRIBUTE_PREFIX, AttributeValue, Phase, RequestContext, Stage
from proxy.telemetry.instruments import PROVIDER, Instruments, RequestMeasurements
from proxy.telemetry.otlp_encode import (
    SPAN_KIND_CLIENT,
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    encode_span,
)
from proxy.telemetry.providers import Providers
from proxy.telemetry.span_shipper import SpanShipper
from proxy.telemetry.tracecontext import (
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse_traceparent,
)
from proxy.wire.canonical import Endpoint

_CACHE_RESULT = ATTRIBUTE_PREFIX + "cache.result"
_COST = ATTRIBUTE_PREFIX + "cost_usd"
_SAVED = ATTRIBUTE_PREFIX + "cost.saved_usd"
_SAVED_BY = ATTRIBUTE_PREFIX + "cost.saved_by"
_ROUTE_REASON = ATTRIBUTE_PREFIX + "route.reason"
_ROUTE_TIER = ATTRIBUTE_PREFIX + "route.tier"


def _float(value: AttributeValue | None) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None
_REQUEST_PARAMS = (("max_tokens", "gen_ai.request.max_tokens"),
                   ("max_completion_tokens", "gen_ai.request.max_tokens"),
                   ("max_output_tokens", "gen_ai.request.max_tokens"),
                   ("temperature", "gen_ai.request.temperature"),
                   ("top_p", "gen_ai.request.top_p"))
_TRACER = "llm-sidecar"


def _last_upstream(phases: list[Phase]) -> Phase | None:
    """The upstream attempt whose answer the client got: its span id is the one propagated.

    Earlier attempts (retries, fallbacks) get span ids of their own.
    """
    for phase in reversed(phases):
        if phase.name == "upstream":
            return phase
    return None


@dataclass(slots=True)
class _Trace:
    trace_id: int
    span_id: int
    upstream_span_id: int
    parent: Context | None  # for the SDK path
    parent_span_id: int | None
    trace_state: str


class TelemetryStage(Stage):
    """Spans and metrics for intercepted requests (see the module docstring)."""

    name = "telemetry"

    def __init__(self, providers: Providers, upstream_host: str, upstream_port: int | None,
                 *, record_content: bool = False) -> None:
        self.providers = providers
        self.server_address = upstream_host
        self.server_port = upstream_port
        self.record_content = record_content
        tp: TracerProvider | None = providers.tracer_provider
        self.tracer = tp.get_tracer(_TRACER) if tp is not None else None
        self.shipper = providers.shipper
        self.sampler = providers.sampler if providers.tracing else None
        self.instruments = providers.instruments

    # ------------------------------------------------------------ request path

    async def on_request(self, ctx: RequestContext) -> None:
        if self.sampler is None:
            return None
        headers = ctx.request.headers
        incoming = parse_traceparent(headers.get("traceparent"))
        parent = None
        parent_span: int | None = None
        state = ""
        if incoming is not None:
            trace_id, parent_span, flags = incoming
            state = headers.get("tracestate", "")[:512]
            parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                trace_id, parent_span, is_remote=True, trace_flags=TraceFlags(flags),
                trace_state=TraceState.from_header([state]) if state else None)))
        else:
            trace_id = new_trace_id()
        decision = self.sampler.should_sample(
            parent, trace_id, self._span_name(ctx), SpanKind.SERVER).decision
        sampled = decision is Decision.RECORD_AND_SAMPLE
        upstream_span_id = new_span_id()
        ctx.upstream_headers["traceparent"] = format_traceparent(
            trace_id, upstream_span_id, sampled)
        if sampled:
            ctx.trace = _Trace(trace_id, new_span_id(), upstream_span_id, parent, parent_span,
                               state)
        return None

    @staticmethod
    def _span_name(ctx: RequestContext) -> str:
        op = ctx.endpoint.operation
        return f"{op} {ctx.canonical.model}" if ctx.canonical.model else op

    # ------------------------------------------------------------ after the answer

    def on_reject(self, endpoint: Endpoint, status: int, code: str) -> None:
        if self.instruments is not None:
            self.instruments.rejected(endpoint.operation, status)

    async def on_settle(self, ctx: RequestContext) -> None:
        error = self._error_type(ctx)
        if self.instruments is not None:
            self._record_metrics(ctx, self.instruments, error)
        if ctx.trace is not None:
            if self.shipper is not None:
                self._ship_spans(ctx, ctx.trace, self.shipper, error)
            elif self.tracer is not None:
                self._emit_spans(ctx, ctx.trace, self.tracer, error)

    @staticmethod
    def _error_type(ctx: RequestContext) -> str | None:
        if ctx.error_kind is not None:
            return ctx.error_kind
        if ctx.status is not None and ctx.status >= 400:
            return str(ctx.status)
        return None

    @staticmethod
    def _record_metrics(ctx: RequestContext, ins: Instruments, error: str | None) -> None:
        started = ctx.started_ns
        for phase in ctx.phases:
            if phase.name == "ratelimit":
                attrs = phase.attributes
                ins.ratelimit_done(str(attrs.get("ratelimit.outcome", "")),
                                   str(attrs.get("ratelimit.rule", "")),
                                   str(attrs.get("ratelimit.backend", "")),
                                   (phase.end_ns - phase.start_ns) / 1e9)
            elif phase.name == "cache":
                attrs = phase.attributes
                ins.cache_looked_up(str(attrs.get("cache.result", "")),
                                    str(attrs.get("cache.tier", "")),
                                    (phase.end_ns - phase.start_ns) / 1e9)
                similarity = attrs.get("cache.similarity")
                if isinstance(similarity, float):
                    ins.cache_similarity_seen(str(attrs.get("cache.semantic.outcome", "")),
                                              str(attrs.get("cache.semantic.reason", "")),
                                              similarity)
        attrs = ctx.attributes
        ins.request_done(RequestMeasurements(
            operation=ctx.endpoint.operation, model=ctx.canonical.model,
            status=ctx.status or 0, error=error, upstream_error=ctx.error_kind,
            duration_s=((ctx.finished_ns or started) - started) / 1e9,
            first_chunk_s=(None if ctx.first_chunk_ns is None
                           else (ctx.first_chunk_ns - started) / 1e9),
            usage=ctx.usage(),
            overhead_s=(None if ctx.reported_overhead_ms is None
                        else ctx.reported_overhead_ms / 1000),
            from_cache=attrs.get(_CACHE_RESULT) == "hit",
            agent=ctx.identity.agent if ctx.identity is not None else None,
            cost_usd=_float(attrs.get(_COST)),
            saved_usd=_float(attrs.get(_SAVED)),
            saved_by=str(attrs.get(_SAVED_BY, "")),
            route_reason=str(attrs.get(_ROUTE_REASON, "")),
            route_tier=str(attrs.get(_ROUTE_TIER, "")),
            attempts=ctx.attempts,
            fallbacks=ctx.fallbacks))

    def _ship_spans(self, ctx: RequestContext, tr: _Trace, shipper: SpanShipper,
                    error: str | None) -> None:
        # OTLP span flags: W3C sampled bit, "is-remote known" (0x100) and, for a
        # span whose parent came from the agent, "parent is remote" (0x200).
        flags = 0x301 if tr.parent_span_id is not None else 0x101
        shipper.add(encode_span(
            trace_id=tr.trace_id, span_id=tr.span_id, parent_span_id=tr.parent_span_id,
            name=self._span_name(ctx), kind=SPAN_KIND_SERVER, start_ns=ctx.started_ns,
            end_ns=ctx.finished_ns or ctx.started_ns, attrs=self._attributes(ctx, error),
            error=error is not None, trace_state=tr.trace_state, flags=flags))
        last_upstream = _last_upstream(ctx.phases)
        for phase in ctx.phases:
            is_upstream = phase.name == "upstream"
            shipper.add(encode_span(
                trace_id=tr.trace_id,
                span_id=tr.upstream_span_id if phase is last_upstream else new_span_id(),
                parent_span_id=tr.span_id, name=f"{ATTRIBUTE_PREFIX}{phase.name}",
                kind=SPAN_KIND_CLIENT if is_upstream else SPAN_KIND_INTERNAL,
                start_ns=phase.start_ns, end_ns=phase.end_ns,
                attrs=self._phase_attributes(phase, is_upstream), trace_state=tr.trace_state))

    def _phase_attributes(self, phase: Phase, is_upstream: bool) -> dict[str, AttributeValue]:
        attrs: dict[str, AttributeValue] = {ATTRIBUTE_PREFIX + k: v
                                            for k, v in phase.attributes.items()}
        if is_upstream:
            attrs["server.address"] = self.server_address
            if self.server_port is not None:
                attrs["server.port"] = self.server_port
        return attrs

    def _emit_spans(self, ctx: RequestContext, tr: _Trace, tracer: trace.Tracer,
                    error: str | None) -> None:
        ids = self.providers.id_generator
        ids.preset(None if tr.parent is not None else tr.trace_id, tr.span_id)
        span = tracer.start_span(self._span_name(ctx), context=tr.parent, kind=SpanKind.SERVER,
                                 attributes=self._attributes(ctx, error),
                                 start_time=ctx.started_ns)
        inner = trace.set_span_in_context(span)
        last_upstream = _last_upstream(ctx.phases)
        for phase in ctx.phases:
            is_upstream = phase.name == "upstream"
            ids.preset(None, tr.upstream_span_id if phase is last_upstream else None)
            child = tracer.start_span(
                f"{ATTRIBUTE_PREFIX}{phase.name}", context=inner,
                kind=SpanKind.CLIENT if is_upstream else SpanKind.INTERNAL,
                attributes=self._phase_attributes(phase, is_upstream),
                start_time=phase.start_ns)
            child.end(end_time=phase.end_ns)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=ctx.finished_ns)

    def _attributes(self, ctx: RequestContext, error: str | None) -> dict[str, AttributeValue]:
        canonical = ctx.canonical
        body = canonical.body
        attrs: dict[str, AttributeValue] = {
            "gen_ai.operation.name": ctx.endpoint.operation,
            "gen_ai.provider.name": PROVIDER,
            "server.address": self.server_address,
            f"{ATTRIBUTE_PREFIX}stream": canonical.stream,
        }
        if self.server_port is not None:
            attrs["server.port"] = self.server_port
        if canonical.model:
            attrs["gen_ai.request.model"] = canonical.model
        for key, attr in _REQUEST_PARAMS:
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attrs[attr] = value
        summary = ctx.summary()
        if summary.model:
            attrs["gen_ai.response.model"] = summary.model
        if summary.id:
            attrs["gen_ai.response.id"] = summary.id
        if summary.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = summary.finish_reasons
        if summary.usage is not None:
            attrs["gen_ai.usage.input_tokens"] = summary.usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = summary.usage.output_tokens
        if ctx.status is not None:
            attrs["http.response.status_code"] = ctx.status
        if error is not None:
            attrs["error.type"] = error
        ident = ctx.identity
        if ident is not None:
            attrs[f"{ATTRIBUTE_PREFIX}tenant"] = ident.tenant
            attrs[f"{ATTRIBUTE_PREFIX}namespace"] = ident.namespace
            if ident.agent:
                attrs[f"{ATTRIBUTE_PREFIX}agent_id"] = ident.agent
        if ctx.first_chunk_ns is not None:
            attrs[f"{ATTRIBUTE_PREFIX}time_to_first_chunk_ms"] = round(
                (ctx.first_chunk_ns - ctx.started_ns) / 1e6, 3)
        if ctx.reported_overhead_ms is not None:
            attrs[f"{ATTRIBUTE_PREFIX}overhead_ms"] = round(ctx.reported_overhead_ms, 3)
        attrs.update(ctx.attributes)
        if self.record_content:
            attrs.update(_content(ctx))
        return attrs


def _content(ctx: RequestContext) -> dict[str, AttributeValue]:
    # Only with telemetry.record_content: prompts and answers are sensitive.
    out: dict[str, AttributeValue] = {}
    payload: Any = ctx.canonical.payload
    if payload is not None:
        out["gen_ai.input.messages"] = orjson.dumps(payload).decode()[:65536]
    if ctx.response_body is not None and ctx.status == 200:
        out["gen_ai.output.messages"] = ctx.response_body[:65536].decode(errors="replace")
    return out
