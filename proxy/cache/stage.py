"""The cache stage: answer hits before the upstream call, store good answers after it.

Chat completions, legacy completions (exact and normalized tiers;
``proxy.cache.completions``), Responses API answers (exact tier only;
``proxy.cache.responses``) and embeddings (per input item:
``proxy.cache.embeddings``). For chat, the tiers are tried in order: the exact
and normalized keys in one store lookup, then, on a miss, the semantic tier
(``proxy.cache.semantic``), whose hit names the key of the answer to serve.
A hit is served from the stored ``chat.completion`` as JSON or, for
``stream: true``, as an SSE stream (see ``proxy.cache.replay``), with
``x-sidecar-cache: hit; tier=exact|normalized|semantic[; similarity=0.962]``.
A miss goes upstream; once the client has its answer, the answer is stored
under the request's exact and normalized keys if it is complete and
successful (status 200, one choice, finished by ``stop``, ``tool_calls`` or
``length``; a stream cut short or filtered is not stored), and its prompt is
indexed for the semantic tier (and published to the other replicas).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from proxy.cache.assemble import ChatStreamAssembler
from proxy.cache.completions import (
    ID_PREFIX,
    TextStreamAssembler,
    complete_text,
    prompt_count,
    text_chunks,
)
from proxy.cache.directive import CACHE_HEADER, BadCacheHeader, CachePolicy, Directive
from proxy.cache.embeddings import BadUpstreamBatch, Batch, Vector, vectors_from_answer
from proxy.cache.keys import KeyBuilder
from proxy.cache.replay import fresh_completion, new_completion_id, sse_chunks
from proxy.cache.responses import (
    ResponsesStreamAssembler,
    complete_response,
    fresh_response,
    response_events,
)
from proxy.cache.semantic import Probe, SemanticTier
from proxy.cache.semantic_feed import SemanticFeed
from proxy.cache.store import CacheStore
from proxy.context import ATTRIBUTE_PREFIX, RequestContext, Stage
from proxy.wire import errors
from proxy.wire.canonical import Endpoint
from proxy.wire.usage import ResponseSummary

TIERS = ("exact", "normalized")
_FALLBACK = ATTRIBUTE_PREFIX + "upstream.fallback_model"
_CACHED = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS,
                     Endpoint.RESPONSES})
_SWEEP_EVERY_S = 1.0
_STORED_FINISH = frozenset({"stop", "tool_calls", "length"})


@dataclass(slots=True)
class _Pending:
    """A miss whose answer may be stored."""

    keys: list[str]
    ttl_s: int
    stream: ChatStreamAssembler | ResponsesStreamAssembler | TextStreamAssembler | None
    probe: Probe | None
    prompts: int = 1  # legacy completions: the choices a whole answer has


@dataclass(frozen=True, slots=True)
class _WriteBack:
    """A semantic hit's answer, to be kept under the request's own keys too."""

    keys: list[str]
    value: bytes
    ttl_s: int


class CacheStage(Stage):
    """Response cache (see the module docstring)."""

    name = "cache"

    def __init__(self, policy: CachePolicy, keys: KeyBuilder, store: CacheStore,
                 share_tenants: bool, max_entry_bytes: int,
                 semantic: SemanticTier | None = None,
                 feed: SemanticFeed | None = None) -> None:
        self.policy = policy
        self.keys = keys
        self.store = store
        self.semantic = semantic
        self.feed = feed
        self._next_sweep = 0.0
        self.semantic_gone = 0  # semantic candidates whose answer had left the store
        self.share_tenants = share_tenants
        self.max_entry_bytes = max_entry_bytes
        self.stored = 0
        self.not_stored = 0
        self.refused = 0  # normalized hits whose answer quoted another prompt's ids
        self.written_back = 0  # semantic hits copied under the request's own keys

    async def on_request(self, ctx: RequestContext) -> web.StreamResponse | None:
        canonical = ctx.canonical
        if canonical.endpoint not in _CACHED:
            return None
        try:
            directive = self.policy.directive(ctx.request.headers, canonical)
        except BadCacheHeader as exc:
            return errors.error_response(400, str(exc), "invalid_request_error",
                                         "invalid_cache_header")
        if directive is None:
            return None
        ident = ctx.identity
        scope = (ident.namespace if ident else "") + (
            "" if self.share_tenants or ident is None else "/" + ident.tenant)
        if canonical.endpoint is Endpoint.EMBEDDINGS:
            return await self._embeddings(ctx, directive, scope)
        exact, normal, normalized = self.keys.keys(scope, canonical)
        keys = [exact] if normal is None else [exact, normal]
        semantic = self.semantic
        # Embedded only when needed: an exact or normalized hit never pays for it.
        probe: Probe | None = None
        if directive.lookup:
            started_ns = time.time_ns()
            found = await self.store.get(keys)
            if found is not None:
                tier = TIERS[found.index]
                response = self._serve(ctx, found.value, tier)
                if response is not None:
                    ctx.record_phase("cache", started_ns, time.time_ns(),
                                     **{"cache.result": "hit", "cache.tier": tier})
                    if found.where == "redis":
                        self.store.remember(keys[found.index], found.value, directive.ttl_s)
                    return response
                # Refused (its answer quotes another prompt's ids) or unreadable: not a
                # hit, and the semantic tier may still answer.
            if semantic is not None and (probe := semantic.probe(
                    scope, canonical, ctx.request.headers.get("Authorization"),
                    normalized)) is not None:
                answer = await self._semantic(ctx, semantic, probe, started_ns,
                                              keys if directive.store else [], directive.ttl_s)
                if answer is not None:
                    return answer
            else:
                ctx.record_phase("cache", started_ns, time.time_ns(), **{"cache.result": "miss"})
        ctx.annotate("cache.result", "miss")
        ctx.response_headers[CACHE_HEADER] = "miss"
        if directive.store:
            if probe is None and semantic is not None:
                probe = semantic.probe(scope, canonical,
                                       ctx.request.headers.get("Authorization"), normalized)
            endpoint = canonical.endpoint
            stream: ChatStreamAssembler | ResponsesStreamAssembler | TextStreamAssembler | None
            stream = None
            if canonical.stream:
                stream = (ResponsesStreamAssembler() if endpoint is Endpoint.RESPONSES
                          else TextStreamAssembler() if endpoint is Endpoint.COMPLETIONS
                          else ChatStreamAssembler())
            if stream is not None:
                ctx.stream_sink = stream.feed_event_data
            ctx.cache = _Pending(keys, directive.ttl_s, stream, probe,
                                 prompt_count(canonical.body.get("prompt"))
                                 if endpoint is Endpoint.COMPLETIONS else 1)
        return None

    async def _embeddings(self, ctx: RequestContext, directive: Directive,
                          scope: str) -> web.StreamResponse | None:
        batch = Batch.of(scope, ctx.canonical)
        if batch is None:
            return None
        n = len(batch.items)
        vectors: list[Vector | None] = [None] * n
        if directive.lookup:
            started_ns = time.time_ns()
            found = await self.store.get_each(batch.keys)
            vectors = [Vector.decode(v) if v is not None else None for v in found]
            hits = n - vectors.count(None)
            result = "hit" if hits == n else "partial" if hits else "miss"
            attrs: dict[str, str | int] = {"cache.result": result, "cache.items": n,
                                           "cache.items_hit": hits}
            if hits:
                attrs["cache.tier"] = "exact"
            ctx.record_phase("cache", started_ns, time.time_ns(), **attrs)
            ctx.annotate("cache.items", n)
            ctx.annotate("cache.items_hit", hits)
            if hits == n:
                body = batch.answer([v for v in vectors if v is not None])
                ctx.annotate("cache.result", "hit")
                ctx.annotate("cache.tier", "exact")
                ctx.response_headers[CACHE_HEADER] = "hit; tier=exact"
                ctx.status = 200
                ctx.response_body = body
                return web.Response(body=body, headers={"Content-Type": "application/json",
                                                        CACHE_HEADER: "hit; tier=exact"})
        else:
            hits = 0
        # Each missing item goes upstream once, however often the batch repeats it.
        missing: dict[str, Any] = {}
        for key, item, vector in zip(batch.keys, batch.items, vectors, strict=True):
            if vector is None and key not in missing:
                missing[key] = item
        pending = _EmbeddingsPending(batch, vectors, list(missing), list(missing.values()),
                                     directive.ttl_s if directive.store else 0)
        if len(missing) < n:
            ctx.canonical.set("input", pending.sent_items)
            ctx.rewrite_body = pending.merge
        ctx.annotate("cache.result", "partial" if hits else "miss")
        ctx.response_headers[CACHE_HEADER] = (f"partial; tier=exact; hits={hits}; items={n}"
                                              if hits else "miss")
        ctx.cache = pending
        return None

    async def _semantic(self, ctx: RequestContext, semantic: SemanticTier, probe: Probe,
                        started_ns: int, own_keys: list[str],
                        ttl_s: int) -> web.StreamResponse | None:
        now = time.time()
        if now >= self._next_sweep:
            semantic.index.sweep(now)
            self._next_sweep = now + _SWEEP_EVERY_S
        if probe.vector is None and not await semantic.embed(probe):
            ctx.record_phase("cache", started_ns, time.time_ns(),
                             **{"cache.result": "miss", "cache.semantic.outcome": "no_vector"})
            return None
        looked = semantic.lookup(probe, ctx.canonical.model, now)
        if looked.outcome == "verify":
            looked = await semantic.verify(probe, looked)
        value = None
        if looked.outcome == "hit":
            found = await self.store.get([looked.key])
            if found is None:
                # Expired or evicted from the store before the index noticed.
                semantic.index.remove(looked.key)
                self.semantic_gone += 1
            else:
                value = found.value
                if found.where == "redis":
                    self.store.remember(looked.key, value, self.policy.ttl_s)
        attrs: dict[str, str | float] = {"cache.result": "hit" if value else "miss"}
        if looked.outcome != "empty":
            attrs |= {"cache.similarity": round(looked.similarity, 4),
                      "cache.semantic.outcome": looked.outcome,
                      "cache.semantic.reason": looked.reason}
        if looked.verified is not None:
            attrs["cache.semantic.verified"] = round(looked.verified, 4)
        if value is not None:
            attrs["cache.tier"] = "semantic"
        ctx.record_phase("cache", started_ns, time.time_ns(), **attrs)
        if value is None:
            return None
        ctx.annotate("cache.similarity", round(looked.similarity, 4))
        response = self._serve(ctx, value, "semantic", looked.similarity)
        if response is not None and own_keys:
            # The same prompt again is then an exact hit: no embedding, no search.
            # It lives no longer than the answer it copies.
            # Written once the answer is on its way (on_settle), not before.
            remaining = int(min(ttl_s, looked.expires_at - now))
            if remaining > 0:
                ctx.cache = _WriteBack(own_keys, value, remaining)
        return response

    def _serve(self, ctx: RequestContext, value: bytes, tier: str,
               similarity: float | None = None) -> web.Response | None:
        try:
            stored = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None  # not ours (or damaged): a miss, and the answer overwrites it
        if not isinstance(stored, dict):
            return None
        normalizer = self.keys.normalizer
        if tier != "exact" and normalizer is not None and normalizer.echoes_other_values(
                _answer_text(stored), ctx.canonical.raw.decode("utf-8", "replace")):
            self.refused += 1
            return None
        now = int(time.time())
        header = f"hit; tier={tier}"
        if similarity is not None:
            header += f"; similarity={similarity:.3f}"
        ctx.annotate("cache.result", "hit")
        ctx.annotate("cache.tier", tier)
        ctx.response_headers[CACHE_HEADER] = header
        ctx.status = 200
        if ctx.canonical.endpoint is Endpoint.RESPONSES:
            return self._serve_response(ctx, fresh_response(stored, now), header)
        text = ctx.canonical.endpoint is Endpoint.COMPLETIONS
        new_id = new_completion_id(ID_PREFIX) if text else new_completion_id()
        if ctx.canonical.stream:
            replay = text_chunks if text else sse_chunks
            events = replay(stored, now=now, new_id=new_id,
                            include_usage=ctx.canonical.client_wants_usage)
            summary = ResponseSummary.from_document(stored)
            ctx.stream_summary = ResponseSummary(new_id, summary.model,
                                                 summary.finish_reasons, summary.usage)
            return web.Response(body=b"".join(events), headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache", CACHE_HEADER: header})
        body = fresh_completion(stored, now, new_id)
        ctx.response_body = body
        return web.Response(body=body, headers={"Content-Type": "application/json",
                                                CACHE_HEADER: header})

    @staticmethod
    def _serve_response(ctx: RequestContext, answer: dict[str, Any],
                        header: str) -> web.Response:
        ctx.stream_summary = ResponseSummary.from_document(answer)
        if ctx.canonical.stream:
            return web.Response(body=b"".join(response_events(answer)), headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache", CACHE_HEADER: header})
        body = orjson.dumps(answer)
        ctx.response_body = body
        return web.Response(body=body, headers={"Content-Type": "application/json",
                                                CACHE_HEADER: header})

    async def on_settle(self, ctx: RequestContext) -> None:
        pending = ctx.cache
        if ctx.status != 200 or ctx.error_kind is not None:
            return
        if isinstance(pending, _EmbeddingsPending):
            await self._store_vectors(ctx, pending)
            return
        if isinstance(pending, _WriteBack):
            await self.store.put(pending.keys, pending.value, pending.ttl_s)
            self.written_back += 1
            return
        if not isinstance(pending, _Pending):
            return
        if _FALLBACK in ctx.attributes:
            # An outage's stand-in answer from another model: serving it for the
            # entry's lifetime would outlast the outage.
            self.not_stored += 1
            return
        endpoint = ctx.canonical.endpoint
        complete: Callable[[object], bool] = (
            complete_response if endpoint is Endpoint.RESPONSES
            else partial(complete_text, prompts=pending.prompts)
            if endpoint is Endpoint.COMPLETIONS else _complete)
        if pending.stream is not None:
            completion = pending.stream.result()
            value = orjson.dumps(completion) if complete(completion) else None
        else:
            value = _stored_form(ctx.response_body, complete)
        if value is None or len(value) > self.max_entry_bytes:
            self.not_stored += 1
            return
        await self.store.put(pending.keys, value, pending.ttl_s)
        self.stored += 1
        if (pending.probe is not None and self.semantic is not None
                and await self.semantic.prepare(pending.probe)):
            entry = self.semantic.add(pending.probe, pending.keys[0], pending.ttl_s)
            if self.feed is not None and pending.probe.vector is not None:
                await self.feed.publish(entry, pending.probe.vector)


    async def _store_vectors(self, ctx: RequestContext, pending: _EmbeddingsPending) -> None:
        if not pending.ttl_s:
            return
        fresh = pending.fresh
        if fresh is None and ctx.response_body is not None:
            try:
                fresh, _ = vectors_from_answer(ctx.response_body, pending.sent_items)
            except BadUpstreamBatch:
                self.not_stored += 1
                return
        if not fresh:
            return
        entries = [(key, value) for key, vector in zip(pending.sent_keys, fresh, strict=True)
                   if len(value := vector.encode()) <= self.max_entry_bytes]
        self.not_stored += len(fresh) - len(entries)
        await self.store.put_each(entries, pending.ttl_s)
        self.stored += len(entries)


@dataclass(slots=True)
class _EmbeddingsPending:
    """An embeddings batch with misses: what went upstream, and how to answer the client."""

    batch: Batch
    vectors: list[Vector | None]  # per item of the client's batch; None for a miss
    sent_keys: list[str]
    sent_items: list[Any]
    ttl_s: int  # 0: do not store
    fresh: list[Vector] | None = None  # the upstream's vectors, per sent item

    def merge(self, body: bytes) -> bytes:
        """The client's answer from the upstream's answer to the misses and the hits."""
        fresh, model = vectors_from_answer(body, self.sent_items)
        self.fresh = fresh
        by_key = dict(zip(self.sent_keys, fresh, strict=True))
        merged = [v if v is not None else by_key[k]
                  for k, v in zip(self.batch.keys, self.vectors, strict=True)]
        return self.batch.answer(merged, model or None)


def _answer_text(stored: dict[str, Any]) -> str:
    """What the model said (content, refusal, tool-call arguments, a legacy completion's
    text), not the envelope's ids."""
    parts: list[str] = []
    for choice in stored.get("choices") or ():
        if isinstance(choice, dict) and isinstance(text := choice.get("text"), str):
            parts.append(text)
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        parts += [v for k in ("content", "refusal") if isinstance(v := message.get(k), str)]
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                parts.append(function["arguments"])
    return "\n".join(parts)


def _stored_form(body: bytes | None, complete: Callable[[object], bool]) -> bytes | None:
    """The upstream JSON answer as stored, or None if it is not a complete answer."""
    if not body:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return body if complete(doc) else None


def _complete(doc: object) -> bool:
    if not isinstance(doc, dict) or doc.get("object") != "chat.completion":
        return False
    choices = doc.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    return choices[0].get("finish_reason") in _STORED_FINISH
