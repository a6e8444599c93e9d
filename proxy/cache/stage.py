"""The cache stage: answer hits before the upstream call, store good answers after it.

Chat completions only, for now. A hit is served from the stored
``chat.completion`` as JSON or, for ``stream: true``, as an SSE stream (see
``proxy.cache.replay``), with ``x-sidecar-cache: hit; tier=exact|normalized``.
A miss goes upstream; once the client has its answer, the answer is stored
under the request's exact and normalized keys if it is complete and
successful (status 200, one choice, finished by ``stop``, ``tool_calls`` or
``length``; a stream cut short or filtered is not stored).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.cache.assemble import ChatStreamAssembler
from proxy.cache.directive import CACHE_HEADER, BadCacheHeader, CachePolicy
from proxy.cache.keys import KeyBuilder
from proxy.cache.replay import fresh_completion, new_completion_id, sse_chunks
from proxy.cache.store import CacheStore
from proxy.context import RequestContext, Stage
from proxy.wire import errors
from proxy.wire.canonical import Endpoint
from proxy.wire.usage import ResponseSummary

TIERS = ("exact", "normalized")
_STORED_FINISH = frozenset({"stop", "tool_calls", "length"})


@dataclass(slots=True)
class _Pending:
    """A miss whose answer may be stored."""

    keys: list[str]
    ttl_s: int
    stream: ChatStreamAssembler | None


class CacheStage(Stage):
    """Response cache (see the module docstring)."""

    name = "cache"

    def __init__(self, policy: CachePolicy, keys: KeyBuilder, store: CacheStore,
                 share_tenants: bool, max_entry_bytes: int) -> None:
        self.policy = policy
        self.keys = keys
        self.store = store
        self.share_tenants = share_tenants
        self.max_entry_bytes = max_entry_bytes
        self.stored = 0
        self.not_stored = 0
        self.refused = 0  # normalized hits whose answer quoted another prompt's ids

    async def on_request(self, ctx: RequestContext) -> web.StreamResponse | None:
        canonical = ctx.canonical
        if canonical.endpoint is not Endpoint.CHAT:
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
        exact, normal = self.keys.keys(scope, canonical)
        keys = [exact] if normal is None else [exact, normal]
        if directive.lookup:
            started_ns = time.time_ns()
            found = await self.store.get(keys)
            tier = TIERS[found.index] if found is not None else ""
            ctx.record_phase("cache", started_ns, time.time_ns(),
                             **{"cache.result": "hit" if found else "miss",
                                **({"cache.tier": tier} if found else {})})
            if found is not None:
                response = self._serve(ctx, found.value, tier)
                if response is not None:
                    if found.where == "redis":
                        self.store.remember(keys[found.index], found.value, directive.ttl_s)
                    return response
        ctx.annotate("cache.result", "miss")
        ctx.response_headers[CACHE_HEADER] = "miss"
        if directive.store:
            stream = ChatStreamAssembler() if canonical.stream else None
            if stream is not None:
                ctx.stream_sink = stream.feed_event_data
            ctx.cache = _Pending(keys, directive.ttl_s, stream)
        return None

    def _serve(self, ctx: RequestContext, value: bytes, tier: str) -> web.Response | None:
        try:
            stored = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None  # not ours (or damaged): a miss, and the answer overwrites it
        if not isinstance(stored, dict):
            return None
        normalizer = self.keys.normalizer
        if tier == "normalized" and normalizer is not None and normalizer.echoes_other_values(
                _answer_text(stored), ctx.canonical.raw.decode("utf-8", "replace")):
            self.refused += 1
            return None
        now, new_id = int(time.time()), new_completion_id()
        header = f"hit; tier={tier}"
        ctx.annotate("cache.result", "hit")
        ctx.annotate("cache.tier", tier)
        ctx.response_headers[CACHE_HEADER] = header
        ctx.status = 200
        if ctx.canonical.stream:
            events = sse_chunks(stored, now=now, new_id=new_id,
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

    async def on_settle(self, ctx: RequestContext) -> None:
        pending = ctx.cache
        if not isinstance(pending, _Pending):
            return
        if ctx.status != 200 or ctx.error_kind is not None:
            return
        if pending.stream is not None:
            completion = pending.stream.result()
            value = orjson.dumps(completion) if _complete(completion) else None
        else:
            value = _stored_form(ctx.response_body)
        if value is None or len(value) > self.max_entry_bytes:
            self.not_stored += 1
            return
        await self.store.put(pending.keys, value, pending.ttl_s)
        self.stored += 1


def _answer_text(stored: dict[str, Any]) -> str:
    """What the model said (content, refusal, tool-call arguments), not the envelope's ids."""
    parts: list[str] = []
    for choice in stored.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        parts += [v for k in ("content", "refusal") if isinstance(v := message.get(k), str)]
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                parts.append(function["arguments"])
    return "\n".join(parts)


def _stored_form(body: bytes | None) -> bytes | None:
    """The upstream JSON answer as stored, or None if it is not a complete completion."""
    if not body:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return body if _complete(doc) else None


def _complete(doc: object) -> bool:
    if not isinstance(doc, dict) or doc.get("object") != "chat.completion":
        return False
    choices = doc.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return False
    return choices[0].get("finish_reason") in _STORED_FINISH
