"""One intercepted request's journey, stage by stage.

parse -> identify -> cache -> route -> limit -> forward -> settle -> telemetry

A stage is a small object with two hooks, both optional:

- ``on_request(ctx)`` runs in order before the upstream call and may answer the
  request itself by returning a response (a cache hit, a 429);
- ``on_settle(ctx)`` runs after the response has been sent, off the response
  path (reconcile tokens, store a cache entry, record telemetry).

The pipeline calls only the hooks a stage overrides, so a stage that is still
a no-op costs nothing per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from proxy.config import SidecarConfig
from proxy.upstream import Upstream, UpstreamError
from proxy.wire import errors
from proxy.wire.canonical import BadRequestBody, CanonicalRequest, Endpoint, parse_request
from proxy.wire.encoding import CorruptBody, DecodedTooLarge, UnsupportedEncoding, decode_body
from proxy.wire.headers import (
    OVERHEAD_HEADER,
    bearer_token,
    client_response_headers,
    upstream_request_headers,
)
from proxy.wire.sse import StreamTap
from proxy.wire.usage import Usage, usage_from_body

log = logging.getLogger("proxy.pipeline")

_AGENT_ID_MAX = 128


@dataclass(slots=True)
class Identity:
    """Who a request is for. The API key itself is never kept, only its hash."""

    namespace: str
    tenant: str
    agent: str | None


@dataclass(slots=True)
class RequestContext:
    """Everything the stages know about one request, passed explicitly from stage to stage."""

    request: web.Request
    canonical: CanonicalRequest
    started: float
    identity: Identity | None = None
    # Headers stages want on the response (x-sidecar-*, x-ratelimit-*).
    response_headers: dict[str, str] = field(default_factory=dict)
    upstream_s: float = 0.0
    status: int | None = None
    response_body: bytes | None = None
    stream_usage: Usage | None = None
    stream_complete: bool = False
    error_kind: str | None = None

    def overhead_ms(self, now: float | None = None) -> float:
        """Time spent in the sidecar so far, upstream time excluded."""
        end = time.perf_counter() if now is None else now
        return (end - self.started - self.upstream_s) * 1000.0

    def usage(self) -> Usage | None:
        """Real token usage, from the stream or the response body (parsed on demand)."""
        if self.stream_usage is not None:
            return self.stream_usage
        if self.response_body is not None and self.status == 200:
            return usage_from_body(self.response_body)
        return None


class Stage:
    """Base of pipeline stages: override the hooks the stage needs."""

    name = "stage"

    async def on_request(self, ctx: RequestContext) -> web.StreamResponse | None:
        """Before the upstream call; return a response to answer the request here."""
        return None

    async def on_settle(self, ctx: RequestContext) -> None:
        """After the response was sent; off the response path."""


class IdentifyStage(Stage):
    """Attributes the request: namespace, tenant (hash of the API key), agent id."""

    name = "identify"

    def __init__(self, namespace: str, agent_header: str) -> None:
        self.namespace = namespace
        self.agent_header = agent_header
        # Agents reuse a handful of keys; hashing each once is enough.
        self._tenants: dict[str, str] = {}

    def tenant_of(self, key: str | None) -> str:
        """A stable, non-reversible tenant id for an API key."""
        if key is None:
            return "anonymous"
        tenant = self._tenants.get(key)
        if tenant is None:
            if len(self._tenants) > 4096:
                self._tenants.clear()
            tenant = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
            self._tenants[key] = tenant
        return tenant

    async def on_request(self, ctx: RequestContext) -> web.StreamResponse | None:
        headers = ctx.request.headers
        agent = headers.get(self.agent_header)
        if agent is not None:
            agent = agent.strip()[:_AGENT_ID_MAX] or None
        ctx.identity = Identity(self.namespace, self.tenant_of(bearer_token(headers)), agent)
        return None


class CacheStage(Stage):
    """Response cache (exact, normalized, semantic): answers hits. No-op until issue 5."""

    name = "cache"


class RouteStage(Stage):
    """Cost-aware model routing. No-op until issue 6."""

    name = "route"


class LimitStage(Stage):
    """Distributed rate limits. No-op until issue 4."""

    name = "limit"


class TelemetryStage(Stage):
    """Spans and metrics. No-op until issue 3."""

    name = "telemetry"


def default_stages(cfg: SidecarConfig) -> list[Stage]:
    """The stages in journey order."""
    return [IdentifyStage(cfg.identity.namespace, cfg.identity.agent_header),
            CacheStage(), RouteStage(), LimitStage(), TelemetryStage()]


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


class Pipeline:
    """Runs intercepted requests through the stages and the upstream."""

    def __init__(self, cfg: SidecarConfig, upstream: Upstream, stages: list[Stage]) -> None:
        self.upstream = upstream
        self.stages = stages
        self.max_body = cfg.server.max_body_bytes
        self.inject_usage = cfg.upstream.inject_stream_usage
        self._request_hooks = [s for s in stages if _overrides(s, "on_request")]
        self._settle_hooks = [s for s in stages if _overrides(s, "on_settle")]
        self._background: set[asyncio.Task[None]] = set()
        self._urls = {ep: upstream.url(ep.value) for ep in Endpoint}

    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        """Serve one intercepted request."""
        started = time.perf_counter()
        # 1 parse
        raw = await self._read_body(request)
        if isinstance(raw, web.Response):
            raw.headers[OVERHEAD_HEADER] = f"{(time.perf_counter() - started) * 1000:.3f}"
            return raw
        try:
            canonical = parse_request(endpoint, raw)
        except BadRequestBody as exc:
            bad = errors.invalid_json(str(exc))
            bad.headers[OVERHEAD_HEADER] = f"{(time.perf_counter() - started) * 1000:.3f}"
            return bad
        ctx = RequestContext(request, canonical, started)
        # 2-5 identify, cache, route, limit
        for stage in self._request_hooks:
            reply = await stage.on_request(ctx)
            if reply is not None:
                ctx.status = reply.status
                self._finish(ctx, reply)
                return reply
        # 6 forward
        response = await self._forward(ctx)
        # 7-8 settle, telemetry
        if self._settle_hooks:
            self._spawn_settle(ctx)
        return response

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The request body, decoded if it came compressed, or the error to answer."""
        length = request.content_length
        if length is not None and length > self.max_body:
            return errors.body_too_large(self.max_body)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return errors.body_too_large(self.max_body)
        encoding = request.headers.get("Content-Encoding")
        if encoding is None:
            return raw
        try:
            return decode_body(raw, encoding, self.max_body)
        except UnsupportedEncoding as exc:
            return errors.unsupported_encoding(str(exc))
        except CorruptBody:
            return errors.invalid_json(f"the body is not valid {encoding[:40]} data")
        except DecodedTooLarge:
            return errors.body_too_large(self.max_body)

    async def _forward(self, ctx: RequestContext) -> web.StreamResponse:
        canonical = ctx.canonical
        hide_usage = False
        if (canonical.stream and not canonical.client_wants_usage and self.inject_usage
                and canonical.endpoint.has_stream_usage_option):
            options = canonical.body.get("stream_options")
            merged = dict(options) if isinstance(options, dict) else {}
            merged["include_usage"] = True
            canonical.set("stream_options", merged)
            hide_usage = True
        headers = upstream_request_headers(ctx.request.headers, self.upstream.api_key,
                                           identity_encoding=True)
        headers.popall("Content-Encoding", None)  # the body was decoded to be read
        sent = time.perf_counter()
        try:
            resp = await self.upstream.send("POST", self._urls[canonical.endpoint], headers,
                                            canonical.wire_body(), stream=canonical.stream)
        except UpstreamError as exc:
            ctx.upstream_s += time.perf_counter() - sent
            ctx.error_kind = exc.kind
            ctx.status = exc.response.status
            self._finish(ctx, exc.response)
            return exc.response
        ctx.upstream_s += time.perf_counter() - sent
        ctx.status = resp.status
        if self.upstream.is_event_stream(resp):
            tap = StreamTap(canonical.endpoint, hide_usage)
            out = await self.upstream.relay(
                ctx.request, resp, lambda h: self._add_headers(ctx, h), tap)
            ctx.stream_usage = tap.usage
            ctx.stream_complete = tap.done
            return out
        sent = time.perf_counter()
        try:
            body = await self.upstream.read_body(resp)
        except UpstreamError as exc:
            ctx.upstream_s += time.perf_counter() - sent
            ctx.error_kind = exc.kind
            ctx.status = exc.response.status
            self._finish(ctx, exc.response)
            return exc.response
        finally:
            resp.release()
        ctx.upstream_s += time.perf_counter() - sent
        ctx.response_body = body
        headers_out = client_response_headers(resp.headers)
        self._add_headers(ctx, headers_out)
        return web.Response(status=resp.status, reason=resp.reason, body=body,
                            headers=headers_out)

    @staticmethod
    def _add_headers(ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        for name, value in ctx.response_headers.items():
            headers[name] = value
        headers[OVERHEAD_HEADER] = f"{ctx.overhead_ms():.3f}"

    def _finish(self, ctx: RequestContext, reply: web.StreamResponse) -> None:
        self._add_headers(ctx, reply.headers)

    def _spawn_settle(self, ctx: RequestContext) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(ctx))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle(self, ctx: RequestContext) -> None:
        for stage in self._settle_hooks:
            try:
                await stage.on_settle(ctx)
            except Exception:
                log.exception("settle hook of stage %s failed", stage.name)

    async def drain(self, limit_s: float) -> None:
        """Wait for background settle work at shutdown (bounded by ``limit_s``)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=limit_s)
