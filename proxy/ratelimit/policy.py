"""The rate-limit policy: rules compiled once, turned into bucket charges per request.

A rule covers the requests whose dimensions match its globs; ``per`` names
the dimensions that get a bucket each (Envoy's descriptors, in short). Each
of its quotas is a bucket: requests and tokens are GCRA buckets, concurrent
is a set of in-flight leases. Every applicable bucket must admit a request,
atomically.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass

from proxy.config import DIMENSIONS, QuotaConfig, RateLimitConfig, RuleConfig, parse_period

KEY_TAG = "{llm-sidecar:rl}"  # one hash tag: every key of a call in one cluster slot


@dataclass(frozen=True, slots=True)
class Quota:
    """A bucket shape: ``amount`` units per ``period_s``, holding up to ``capacity``."""

    kind: str  # "requests" | "tokens" | "concurrent"
    amount: int
    period_s: float
    capacity: int

    @property
    def us_per_unit(self) -> float:
        """Refill interval of one unit, in microseconds."""
        return self.period_s * 1_000_000 / self.amount

    def scaled(self, share: float) -> Quota:
        """The same quota holding ``share`` of its amount (local fallback)."""
        return Quota(self.kind, max(1, int(self.amount * share)), self.period_s,
                     max(1, int(self.capacity * share)))


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule."""

    name: str
    per: tuple[str, ...]
    match: tuple[tuple[str, re.Pattern[str]], ...]
    quotas: tuple[Quota, ...]
    on_redis_down: str
    max_wait_s: float = 0.0  # > 0: hold a denied request up to this long (queue mode)

    def applies(self, dims: dict[str, str]) -> bool:
        """Whether the request's dimensions match every glob of the rule."""
        return all(pattern.fullmatch(dims.get(dim, "")) for dim, pattern in self.match)


@dataclass(frozen=True, slots=True)
class Charge:
    """One bucket a request must take ``cost`` units from (a lease, for concurrent)."""

    rule: Rule
    quota: Quota
    key: str
    cost: int


def _quota(kind: str, cfg: QuotaConfig) -> Quota:
    period = parse_period(cfg.period)
    assert period is not None  # validated with the config
    return Quota(kind, cfg.amount, period, cfg.capacity or cfg.amount)


def compile_rule(cfg: RuleConfig) -> Rule:
    """A rule ready for matching."""
    quotas = tuple(_quota(kind, q) for kind, q in (("requests", cfg.requests),
                                                   ("tokens", cfg.tokens)) if q is not None)
    if cfg.concurrent is not None:
        # period_s is unused for in-flight slots: nothing refills, leases are released.
        quotas += (Quota("concurrent", cfg.concurrent, 0.0, cfg.concurrent),)
    match = tuple((dim, re.compile(fnmatch.translate(glob))) for dim, glob in cfg.match.items())
    wait = parse_period(cfg.max_wait) if cfg.max_wait else None
    return Rule(cfg.name, cfg.per, match, quotas, cfg.on_redis_down, wait or 0.0)


class Policy:
    """All rules; computes the charges of one request."""

    def __init__(self, cfg: RateLimitConfig) -> None:
        self.rules = tuple(compile_rule(r) for r in cfg.rules)
        self.default_max_tokens = cfg.default_max_tokens
        # Agents, tenants and models repeat: match the rules and build the bucket
        # keys once per combination, then only the token costs change.
        self._keys: dict[tuple[str, str, tuple[str, ...]], str] = {}
        self._plans: dict[tuple[str, ...], tuple[Charge, ...]] = {}

    def charges(self, dims: dict[str, str], tokens: int) -> list[Charge]:
        """The buckets this request takes from: 1 per requests quota or in-flight slot,
        ``tokens`` per tokens quota."""
        scope = tuple(dims.get(d, "") for d in DIMENSIONS)
        plan = self._plans.get(scope)
        if plan is None:
            if len(self._plans) >= 65_536:  # client-chosen agent ids: stay bounded
                self._plans.clear()
            plan = self._plans[scope] = self._plan(dict(zip(DIMENSIONS, scope, strict=True)))
        return [Charge(c.rule, c.quota, c.key, tokens) if c.quota.kind == "tokens" else c
                for c in plan]

    def _plan(self, dims: dict[str, str]) -> tuple[Charge, ...]:
        out: list[Charge] = []
        for rule in self.rules:
            if rule.match and not rule.applies(dims):
                continue
            values = tuple(dims.get(d, "") for d in rule.per)
            for quota in rule.quotas:
                # Token costs are filled in per request.
                out.append(Charge(rule, quota, self._key(rule, quota.kind, values), 1))
        return tuple(out)

    def _key(self, rule: Rule, kind: str, values: tuple[str, ...]) -> str:
        cache_key = (rule.name, kind, values)
        key = self._keys.get(cache_key)
        if key is None:
            if len(self._keys) >= 65_536:  # client-chosen agent ids: stay bounded
                self._keys.clear()
            scope = _scope_id(values) if values else "all"
            key = self._keys[cache_key] = f"{KEY_TAG}:{rule.name}:{kind}:{scope}"
        return key


def _scope_id(values: tuple[str, ...]) -> str:
    # Agent ids and model names are client text: hash them into a short, safe key part.
    return hashlib.blake2b("\x00".join(values).encode(), digest_size=8).hexdigest()


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(seconds)
    frac = seconds - whole
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    sec_text = f"{secs + frac:.3f}".rstrip("0").rstrip(".") if frac >= 0.001 else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"
