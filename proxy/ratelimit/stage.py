"""The limit stage: charge a request's buckets before it goes upstream, reconcile after.

Token quotas are charged with an estimate (body size / 4 for the prompt, plus
max_tokens or the configured default) so a token limit is not one request
late, then corrected with the provider's real usage once the answer is known,
off the response path. A failed upstream call is refunded: it is not billed.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from aiohttp import web

from proxy.context import AttributeValue, RequestContext, Stage
from proxy.ratelimit.decision import BucketState, Decision
from proxy.ratelimit.limiter import Limiter
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
    """What an admitted request holds until it settles."""

    tokens: list[Charge]
    estimate: int
    slots: list[Charge]  # in-flight (concurrent) quotas
    lease: str
    backend: str


_FIRST_POLL_S = 0.01
_MAX_POLL_S = 0.25


@dataclass(slots=True)
class _Line:
    """Requests held for one bucket on this replica, served in arrival order."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0


class LimitStage(Stage):
    """Distributed rate limits (see the module docstring)."""

    name = "limit"

    def __init__(self, policy: Policy, limiter: Limiter, max_queued: int = 1000) -> None:
        self.policy = policy
        self.limiter = limiter
        self.max_queued = max_queued
        self._lines: dict[str, _Line] = {}

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
        slots = [c for c in charges if c.quota.kind == "concurrent"]
        lease = self.limiter.new_lease() if slots else ""
        started_ns = time.time_ns()
        started = time.perf_counter()
        decision = await self.limiter.decide(charges, lease)
        outcome = "admitted"
        if not decision.admitted:
            budget = _queue_budget(charges, decision)
            if budget > 0 and self.limiter.queued < self.max_queued:
                decision = await self._queue(charges, lease, decision, started + budget)
                outcome = "queued"
        waited_ms = (time.perf_counter() - started) * 1000
        if not decision.admitted:
            outcome = ("unavailable" if decision.backend == "closed"
                       else "too_large" if decision.never else "denied")
        rule = (decision.denied_by.rule.name
                if not decision.admitted and decision.denied_by is not None else "")
        # The phase becomes the limiter's child span and its metrics (telemetry).
        phase: dict[str, AttributeValue] = {"ratelimit.backend": decision.backend,
                                            "ratelimit.outcome": outcome}
        if rule:
            phase["ratelimit.rule"] = rule
        ctx.record_phase("ratelimit", started_ns, time.time_ns(), **phase)
        ctx.annotate("ratelimit.backend", decision.backend)
        ctx.annotate("ratelimit.outcome", outcome)
        headers = _openai_headers(charges, decision.states)
        if outcome == "queued":
            ctx.annotate("ratelimit.wait_ms", round(waited_ms, 3))
            headers["x-sidecar-ratelimit-wait-ms"] = f"{waited_ms:.0f}"
        if not decision.admitted:
            ctx.annotate("ratelimit.rule", rule)
            return _denied(decision, headers)
        ctx.response_headers.update(headers)
        tokens = [c for c in charges if c.quota.kind == "tokens"]
        if tokens or slots:
            ctx.limit = _Charged(tokens, estimate, slots, lease, decision.backend)
        return None

    async def _queue(self, charges: list[Charge], lease: str, decision: Decision,
                     deadline: float) -> Decision:
        """Hold a denied request until its buckets admit it or the deadline passes.

        Requests held for the same bucket form a line on this replica: only
        its head asks the limiter again, so they are admitted in arrival
        order and a crowd of waiters does not hammer Redis at every refill.
        Across replicas there is no order. A rate bucket says when it will
        admit the request, so the head sleeps that long; a full in-flight
        quota frees up when some request ends, so the head wakes on a release
        here and polls with backoff for releases on other replicas.
        """
        key = decision.denied_by.key if decision.denied_by is not None else ""
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line()
        line.waiting += 1
        self.limiter.queued += 1
        try:
            if line.lock.locked():
                try:
                    await asyncio.wait_for(line.lock.acquire(),
                                           max(deadline - time.perf_counter(), 0.0))
                except TimeoutError:
                    return decision
                try:
                    # Those ahead took what they waited for: look again.
                    decision = await self.limiter.decide(charges, lease)
                    if decision.admitted:
                        return decision
                    return await self._wait_at_head(charges, lease, decision, deadline)
                finally:
                    line.lock.release()
            async with line.lock:
                return await self._wait_at_head(charges, lease, decision, deadline)
        finally:
            self.limiter.queued -= 1
            line.waiting -= 1
            if line.waiting == 0:
                del self._lines[key]

    async def _wait_at_head(self, charges: list[Charge], lease: str, decision: Decision,
                            deadline: float) -> Decision:
        poll = _FIRST_POLL_S
        while not (decision.admitted or decision.never or decision.backend == "closed"):
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            slot_wait = any(s.retry_s > 0 and c.quota.kind == "concurrent"
                            for c, s in zip(charges, decision.states, strict=True))
            if slot_wait:
                await self.limiter.wait_for_release(min(poll, left))
                poll = min(poll * 2, _MAX_POLL_S)
            else:
                retry = decision.retry_s
                if retry > left:
                    break  # waiting longer than allowed would not help
                await asyncio.sleep(retry)
            decision = await self.limiter.decide(charges, lease)
        return decision

    async def on_settle(self, ctx: RequestContext) -> None:
        charged = ctx.limit
        if not isinstance(charged, _Charged):
            return
        corrections: list[Charge] = []
        if charged.tokens:
            usage = ctx.usage()
            if usage is not None:
                delta = usage.total_tokens - charged.estimate
            elif ctx.status is None or ctx.status >= 400:
                delta = -charged.estimate  # no answer, or an error: nothing was billed
            else:
                delta = 0  # no usage reported (a stream cut short): the estimate stands
            if delta:
                corrections = [Charge(c.rule, c.quota, c.key, delta) for c in charged.tokens]
        releases = [Charge(c.rule, c.quota, c.key, -1) for c in charged.slots]
        if corrections or releases:
            await self.limiter.settle(corrections, releases, charged.lease, charged.backend)


def _queue_budget(charges: list[Charge], decision: Decision) -> float:
    """How long a denied request may be held: the shortest max_wait of the rules denying it.

    Zero (answer 429 now) when any denying rule does not queue, when waiting
    cannot help, or when the limiter is unavailable.
    """
    if decision.never or decision.backend == "closed":
        return 0.0
    waits = [c.rule.max_wait_s for c, s in zip(charges, decision.states, strict=True)
             if s.retry_s != 0]
    return min(waits, default=0.0)


def _openai_headers(charges: list[Charge], states: list[BucketState]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the tightest requests and tokens buckets."""
    tightest: dict[str, tuple[float, Charge, BucketState]] = {}
    for c, s in zip(charges, states, strict=True):
        kind = c.quota.kind
        if kind == "concurrent":
            continue
        share = s.remaining / c.quota.capacity
        held = tightest.get(kind)
        if held is None or share < held[0]:
            tightest[kind] = (share, c, s)
    headers: dict[str, str] = {}
    for kind, (_, charge, state) in tightest.items():
        names = _HEADER_NAMES[kind]
        headers[names[0]] = str(charge.quota.amount)
        headers[names[1]] = str(state.remaining)
        headers[names[2]] = format_duration(state.reset_s)
    return headers


_HEADER_NAMES = {kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}",
                        f"x-ratelimit-reset-{kind}") for kind in ("requests", "tokens")}


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
    elif kind == "concurrent" and charge is not None:
        message = (f"Concurrency limit reached for rule '{rule}' ({charge.quota.amount} "
                   f"requests in flight at once). Please retry later.")
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
    return errors.error_response(429, message, "tokens" if kind == "tokens" else "requests",
                                 "rate_limit_exceeded", headers=headers)
