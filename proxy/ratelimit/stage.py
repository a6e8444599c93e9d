"""The limit stage: charge a request's buckets before it goes upstream, reconcile after.

Token quotas are charged with an estimate (body size / 4 for the prompt, plus
max_tokens or the configured default) so a token limit is not one request
late, then corrected with the provider's real usage once the answer is known,
off the response path. A failed upstream call is refunded: it is not billed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from aiohttp import web

from proxy.context import RequestContext, Stage
from proxy.ratelimit.limiter import BucketState, Decision, Limiter
from proxy.ratelimit.policy import Charge, Policy, format_duration
from proxy.wire import errors
from proxy.wire.canonical import CanonicalRequest, Endpoint

_OUTPUT_LIMIT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def estimate_tokens(canonical: CanonicalRequest, default_max_tokens: int) -> int:
    """Input + output tokens a request may use, erring high (reconciled afterwards)."""
    # About 4 bytes of JSON per token: the body's punctuation makes this an overestimate.
    prompt = max(1, len(canonical.raw) // 4)
    if canonical.endpoint is Endpoint.EMBEDDINGS:
        return prompt
    body = canonical.body
    for key in _OUTPUT_LIMIT_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            n = body.get("n")
            return prompt + value * (n if isinstance(n, int) and n > 1 else 1)
    return prompt + default_max_tokens


@dataclass(slots=True)
class _Charged:
    tokens: list[Charge]
    estimate: int


class LimitStage(Stage):
    """Distributed rate limits (see the module docstring)."""

    name = "limit"

    def __init__(self, policy: Policy, limiter: Limiter) -> None:
        self.policy = policy
        self.limiter = limiter

    async def on_request(self, ctx: RequestContext) -> web.StreamResponse | None:
        ident = ctx.identity
        dims = {"namespace": ident.namespace if ident else "",
                "tenant": ident.tenant if ident else "",
                "agent": (ident.agent or "") if ident else "",
                "model": ctx.canonical.model}
        estimate = estimate_tokens(ctx.canonical, self.policy.default_max_tokens)
        charges = self.policy.charges(dims, estimate)
        if not charges:
            return None
        decision = await self.limiter.decide(charges)
        ctx.annotate("ratelimit.backend", decision.backend)
        headers = _openai_headers(charges, decision.states)
        if not decision.admitted:
            ctx.annotate("ratelimit.outcome", "denied")
            return _denied(decision, headers)
        ctx.annotate("ratelimit.outcome", "admitted")
        ctx.response_headers.update(headers)
        tokens = [c for c in charges if c.quota.kind == "tokens"]
        if tokens:
            ctx.limit = _Charged(tokens, estimate)
        return None

    async def on_settle(self, ctx: RequestContext) -> None:
        charged = ctx.limit
        if not isinstance(charged, _Charged):
            return
        usage = ctx.usage()
        if usage is not None:
            delta = usage.total_tokens - charged.estimate
        elif ctx.error_kind is not None or (ctx.status or 0) >= 400:
            delta = -charged.estimate  # nothing was billed
        else:
            return  # no usage reported: the estimate stands
        if delta:
            await self.limiter.reconcile([replace(c, cost=delta) for c in charged.tokens])


def _openai_headers(charges: list[Charge], states: list[BucketState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest requests and tokens buckets."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        pairs = [(c, s) for c, s in zip(charges, states, strict=True) if c.quota.kind == kind]
        if not pairs:
            continue
        charge, state = min(pairs, key=lambda p: p[1].remaining / p[0].quota.capacity)
        headers[f"x-ratelimit-limit-{kind}"] = str(charge.quota.amount)
        headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_s)
    return headers


def _denied(decision: Decision, headers: dict[str, str]) -> web.Response:
    charge = decision.denied_by
    rule = charge.rule.name if charge else "rate limit"
    kind = charge.quota.kind if charge else "requests"
    if decision.backend == "closed":
        message = (f"Rate limit rule '{rule}' cannot be checked right now (limiter "
                   f"unavailable) and is configured to refuse requests meanwhile.")
    elif decision.never:
        message = (f"Request too large for rule '{rule}': it needs more {kind} than the "
                   f"bucket can ever hold ({charge.quota.capacity if charge else '?'}). "
                   f"Waiting will not help; reduce the request.")
    else:
        quota = charge.quota if charge else None
        shown = (f"{quota.amount} {kind} per {format_duration(quota.period_s)}"
                 if quota else kind)
        message = f"Rate limit reached for rule '{rule}' ({shown}). Please retry later."
    retry_s = decision.retry_s
    if decision.never:
        headers["x-should-retry"] = "false"
    else:
        headers["retry-after"] = str(max(1, math.ceil(retry_s)))
        headers["retry-after-ms"] = str(max(1, math.ceil(retry_s * 1000)))
    headers["x-sidecar-ratelimit-rule"] = rule
    return errors.error_response(429, message, "requests" if kind == "requests" else "tokens",
                                 "rate_limit_exceeded", headers=headers)
