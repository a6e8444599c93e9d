"""One intercepted request's journey, stage by stage.

telemetry( parse -> identify -> cache -> route -> limit -> forward -> settle )

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
import contextlib
import hashlib
import logging
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import SidecarConfig
from proxy.context import AttributeValue, Identity, RequestContext, RewriteFailed, Stage
from proxy.retry import RETRYABLE_KINDS, RetryPolicy, retry_after_s, retryable_status
from proxy.settle import Settler
from proxy.upstream import Upstream, UpstreamError, Upstreams
from proxy.wire import errors
from proxy.wire.canonical import BadRequestBody, Endpoint, parse_request
from proxy.wire.encoding import CorruptBody, DecodedTooLarge, UnsupportedEncoding, decode_body
from proxy.wire.headers import (
    ATTEMPTS_HEADER,
    MODEL_ROUTED_HEADER,
    OVERHEAD_HEADER,
    bearer_token,
    client_response_headers,
    header_value,
    upstream_request_headers,
)
from proxy.wire.sse import StreamTap

log = logging.getLogger("proxy.pipeline")

_AGENT_ID_MAX = 128
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away
# OpenAI account headers, meaningless (and revealing) to another provider.
_FIRST_PARTY_HEADERS = ("OpenAI-Organization", "OpenAI-Project")


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


class NoCacheStage(Stage):
    """Stands in for the cache stage when the cache is off."""

    name = "cache"


class NoRouteStage(Stage):
    """Stands in for the route stage when nothing is priced, routed or budgeted."""

    name = "route"


class NoLimitStage(Stage):
    """Stands in for the limit stage when no rule is configured."""

    name = "limit"


def default_stages(cfg: SidecarConfig, limit: Stage | None = None,
                   cache: Stage | None = None, route: Stage | None = None) -> list[Stage]:
    """The request stages in journey order (telemetry, when on, wraps them all).

    A cache hit answers before the limit stage, so it takes no quota; with
    ``ratelimit.count_cache_hits`` the limit stage goes first and charges hits
    too (reconciled with the cached answer's usage).
    """
    identify = IdentifyStage(cfg.identity.namespace, cfg.identity.agent_header)
    limit = limit or NoLimitStage()
    cache = cache or NoCacheStage()
    route = route or NoRouteStage()
    if cfg.ratelimit.count_cache_hits:
        return [identify, limit, cache, route]
    return [identify, cache, route, limit]


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


class Pipeline:
    """Runs intercepted requests through the stages and the upstream."""

    def __init__(self, cfg: SidecarConfig, upstreams: Upstream | Upstreams, stages: list[Stage],
                 retry: RetryPolicy | None = None) -> None:
        if isinstance(upstreams, Upstream):
            upstreams = Upstreams(upstreams)
        self.upstreams = upstreams
        self.upstream = upstreams.default
        self.retry = retry if retry is not None and retry.active else None
        self.stages = stages
        self.max_body = cfg.server.max_body_bytes
        self.inject_usage = cfg.upstream.inject_stream_usage
        self._request_hooks = [s for s in stages if _overrides(s, "on_request")]
        # Reverse order on the way out: the first stage in is the last out.
        self._settle_hooks = [s for s in reversed(stages) if _overrides(s, "on_settle")]
        self.settler = Settler(self._settle_hooks)
        self._reject_hooks = [s for s in stages if _overrides(s, "on_reject")]
        self._urls = {up: {ep: up.url(ep.value) for ep in Endpoint}
                      for _, up in upstreams.all()}

    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        """Serve one intercepted request."""
        started = time.perf_counter()
        started_ns = time.time_ns()
        # 1 parse
        raw = await self._read_body(request)
        if isinstance(raw, web.Response):
            return self._reject(endpoint, started, raw)
        try:
            canonical = parse_request(endpoint, raw)
        except BadRequestBody as exc:
            return self._reject(endpoint, started, errors.invalid_json(str(exc)))
        ctx = RequestContext(request, canonical, started, started_ns)
        try:
            # 2-5 identify, cache, route, limit: any stage may answer by itself
            response: web.StreamResponse | None = None
            for stage in self._request_hooks:
                response = await stage.on_request(ctx)
                if response is not None:
                    ctx.status = response.status
                    self._add_headers(ctx, response.headers)
                    break
            # 6 forward
            if response is None:
                response = await self._forward(ctx)
        except asyncio.CancelledError:
            # The client left (aiohttp cancels the handler). The request still
            # settles: its in-flight slot is released, telemetry records it.
            if self._settle_hooks:
                ctx.error_kind = ctx.error_kind or "client_disconnected"
                ctx.status = ctx.status or CLIENT_CLOSED
                ctx.finished_ns = time.time_ns()
                self.settler.submit(ctx)
            raise
        # 7-8 settle, telemetry
        if self._settle_hooks:
            await self._send_then_settle(ctx, response)
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

    def _reject(self, endpoint: Endpoint, started: float, reply: web.Response) -> web.Response:
        reply.headers[OVERHEAD_HEADER] = f"{(time.perf_counter() - started) * 1000:.3f}"
        code = reply.headers.get("x-sidecar-error", "rejected")
        for stage in self._reject_hooks:
            stage.on_reject(endpoint, reply.status, code)
        return reply

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
        outcome = await self._send(ctx)
        if isinstance(outcome, web.Response):
            return outcome
        resp, upstream, model, sent_ns = outcome
        if self.upstreams.default.is_event_stream(resp):
            tap = StreamTap(canonical.endpoint, hide_usage, ctx.stream_sink)
            out = await upstream.relay(
                ctx.request, resp, lambda h: self._add_headers(ctx, h), tap)
            ctx.stream_summary = tap.summary()
            ctx.first_chunk_ns = tap.first_ns or None
            if tap.failure is not None:
                ctx.error_kind = tap.failure
            ctx.record_phase("upstream", sent_ns, time.time_ns(), status=resp.status,
                             **self._attempt_attrs(ctx, model))
            return out
        sent = time.perf_counter()
        try:
            body = await upstream.read_body(resp)
        except UpstreamError as exc:
            return self._upstream_failed(ctx, exc, sent, sent_ns)
        finally:
            resp.release()
        ctx.upstream_s += time.perf_counter() - sent
        ctx.record_phase("upstream", sent_ns, time.time_ns(), status=resp.status,
                         **self._attempt_attrs(ctx, model))
        ctx.response_body = body  # what the upstream answered (and charged for)
        if ctx.rewrite_body is not None and resp.status == 200:
            try:
                body = ctx.rewrite_body(body)
            except RewriteFailed as exc:
                log.warning("upstream answer could not be mapped back: %s", exc)
                ctx.error_kind = "bad_upstream_answer"
                ctx.status = 502
                reply = errors.upstream_failed(f"unusable answer ({exc})")
                self._add_headers(ctx, reply.headers)
                return reply
        if ctx.answer_hook is not None:
            ctx.answer_hook(ctx)
        headers_out = client_response_headers(resp.headers)
        self._add_headers(ctx, headers_out)
        return web.Response(status=resp.status, reason=resp.reason, body=body,
                            headers=headers_out)

    async def _send(self, ctx: RequestContext
                    ) -> tuple[aiohttp.ClientResponse, Upstream, str, int] | web.Response:
        """Send the request upstream, retrying and falling back per the retry policy.

        Returns the response whose head is in (to relay, whatever its status) or
        the error to answer. Only failures before a response is relayed are retried.
        """
        canonical = ctx.canonical
        route = ctx.route
        model = first = (route.decision.routed if route is not None and route.applied
                         else canonical.model)
        attempts = self.retry.attempts(model) if self.retry is not None else None
        upstream = self.upstreams.get(ctx.upstream_name)
        while True:
            ctx.attempts += 1
            ctx.answered_by = model
            sent = time.perf_counter()
            sent_ns = time.time_ns()
            try:
                resp = await upstream.send("POST", self._urls[upstream][canonical.endpoint],
                                           self._headers(ctx, upstream), canonical.wire_body(),
                                           stream=canonical.stream)
            except UpstreamError as exc:
                nxt = (attempts.next() if attempts is not None and exc.kind in RETRYABLE_KINDS
                       else None)
                if nxt is None:
                    self._note_attempts(ctx, model, first)
                    return self._upstream_failed(ctx, exc, sent, sent_ns,
                                                 **self._attempt_attrs(ctx, model))
                ctx.upstream_s += time.perf_counter() - sent
                ctx.record_phase("upstream", sent_ns, time.time_ns(), error=exc.kind,
                                 model=model, attempt=ctx.attempts)
            else:
                if attempts is None or not retryable_status(resp.status):
                    break
                nxt = attempts.next(retry_after_s(resp.headers))
                if nxt is None:
                    break
                # Drained so the pooled connection can be reused; the body is the
                # upstream's error, which the client will not see.
                with contextlib.suppress(UpstreamError):
                    await upstream.read_body(resp)
                resp.release()
                ctx.upstream_s += time.perf_counter() - sent
                ctx.record_phase("upstream", sent_ns, time.time_ns(), status=resp.status,
                                 model=model, attempt=ctx.attempts)
            log.info("upstream attempt %d for %s failed; %s %s in %.0f ms", ctx.attempts,
                     model, "falling back to" if nxt.fallback else "retrying",
                     nxt.model, nxt.delay_s * 1000)
            if nxt.fallback:
                ctx.fallbacks += 1
                model = nxt.model
                canonical.set("model", nxt.serves)
                upstream = self.upstreams.get(nxt.upstream)
            if nxt.delay_s > 0:
                await asyncio.sleep(nxt.delay_s)
        ctx.upstream_s += time.perf_counter() - sent
        ctx.status = resp.status
        self._note_attempts(ctx, model, first)
        return resp, upstream, model, sent_ns

    @staticmethod
    def _note_attempts(ctx: RequestContext, model: str, first: str) -> None:
        """Announce retries and the model that ended up answering (or failing)."""
        if ctx.attempts <= 1:
            return
        ctx.response_headers[ATTEMPTS_HEADER] = str(ctx.attempts)
        ctx.annotate("upstream.attempts", ctx.attempts)
        if model != first:
            ctx.annotate("upstream.fallback_model", model)
            ctx.response_headers[MODEL_ROUTED_HEADER] = header_value(model)

    @staticmethod
    def _attempt_attrs(ctx: RequestContext, model: str) -> dict[str, AttributeValue]:
        if ctx.attempts <= 1:
            return {}
        return {"model": model, "attempt": ctx.attempts}

    def _headers(self, ctx: RequestContext, upstream: Upstream) -> CIMultiDict[str]:
        if upstream is self.upstreams.default:
            headers = upstream_request_headers(ctx.request.headers, upstream.api_key,
                                               identity_encoding=True)
        else:
            # Another provider: the agent's key (and OpenAI account headers) must
            # never reach it; it gets its own key or none.
            headers = upstream_request_headers(ctx.request.headers, None,
                                               identity_encoding=True)
            for name in _FIRST_PARTY_HEADERS:
                headers.popall(name, None)
            if upstream.api_key is not None:
                headers["Authorization"] = f"Bearer {upstream.api_key}"
        headers.popall("Content-Encoding", None)  # the body was decoded to be read
        if ctx.upstream_headers:
            headers.update(ctx.upstream_headers)
        return headers

    def _upstream_failed(self, ctx: RequestContext, exc: UpstreamError, sent: float,
                         sent_ns: int, **attrs: AttributeValue) -> web.Response:
        ctx.upstream_s += time.perf_counter() - sent
        ctx.error_kind = exc.kind
        ctx.status = exc.response.status
        ctx.record_phase("upstream", sent_ns, time.time_ns(), error=exc.kind, **attrs)
        self._add_headers(ctx, exc.response.headers)
        return exc.response

    @staticmethod
    def _add_headers(ctx: RequestContext, headers: CIMultiDict[str]) -> None:
        for name, value in ctx.response_headers.items():
            headers[name] = value
        ctx.reported_overhead_ms = overhead = ctx.overhead_ms()
        headers[OVERHEAD_HEADER] = f"{overhead:.3f}"

    async def _send_then_settle(self, ctx: RequestContext,
                                response: web.StreamResponse) -> None:
        # The client gets its answer first; settle work never delays it.
        self.settler.begin()
        try:
            try:
                if not response.prepared:
                    await response.prepare(ctx.request)
                    await response.write_eof()
            except ConnectionResetError:
                ctx.error_kind = ctx.error_kind or "client_disconnected"
            ctx.finished_ns = time.time_ns()
            self.settler.submit(ctx)
        finally:
            self.settler.end()
