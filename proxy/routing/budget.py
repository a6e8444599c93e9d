"""Spend budgets: USD spent per namespace / tenant / agent per UTC day and per UTC month.

A budget (``routing.budgets``) covers the requests its globs match and keeps
one spend counter per distinct value of its ``per`` dimensions: a *scope*.
Each scope has a day counter and a month counter, fed after each answer with
its real cost, and the router asks for the level of the scopes of a request
before choosing a model: ``ok``, ``soft`` (past ``soft_share`` of a limit:
route cheaper) or ``hard`` (at the limit: deny or cheapest only).

Where spend lives
    In Redis when ``routing.redis_url`` is set, shared by every replica, as
    integer micro-USD (INCRBY), so replicas adding floats never drift apart.
    Keys (one hash tag per scope, so a scope's keys share a Redis Cluster slot)::

        llm-sidecar:budget:{<budget name>|<scope key>}:d:<YYYYMMDD>   TTL 2 days
        llm-sidecar:budget:{<budget name>|<scope key>}:m:<YYYYMM>     TTL 32 days

    The TTL is set when a key is created (EXPIRE NX) and not extended after.
    A scope key reads ``ns=prod/tenant=<hash>/agent=a1`` (only the budget's
    ``per`` dimensions; a missing agent is ``-``; values are percent-encoded so
    no value can fake another's key). The tenant is already a hash of the API
    key: no key material reaches Redis.

When Redis is unavailable (no URL, breaker open, a call past ``timeout_ms``, an error)
    Levels come from local counters: for each key, the last value read from
    Redis plus the charges this replica made since. With no Redis at all that
    is this replica's own spend since it started. Charges that could not be
    sent are kept (bounded) and added to the next charge that reaches Redis, so
    an outage does not erase this replica's spend from the shared counters;
    a charge whose call timed out after Redis applied it may be sent twice,
    so spend errs high, never low. A Redis that restarts without persistence
    starts its counters from zero.

Calls
    ``status`` costs one round trip (one MGET of the scopes' day and month
    keys); ``charge`` one pipelined round trip (INCRBY + EXPIRE NX per key).
    Both go through a circuit breaker and never raise.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from proxy.breaker import Breaker
from proxy.config import BudgetConfig
from proxy.context import Identity
from proxy.health import Health, State
from proxy.redis_connect import connect, resp_client_url
from proxy.resp import RespClient
from proxy.telemetry.instruments import Instruments, LabelValue

log = logging.getLogger("proxy.routing.budget")

KEY_PREFIX = "llm-sidecar:budget:"
DAY_TTL_S = 2 * 86_400
MONTH_TTL_S = 32 * 86_400
MICRO = 1_000_000  # spend is counted in integer micro-USD

_DAY_S = 86_400
_LEVELS = ("ok", "soft", "hard")  # by rank
_DIMENSION_LABELS = (("namespace", "ns"), ("tenant", "tenant"), ("agent", "agent"))
_MEMO_MAX = 4096  # identities whose scopes are remembered
_TRACKED_MAX = 10_000  # scopes whose counters are kept locally
_OWED_MAX = 10_000  # keys with charges waiting for Redis to come back
_SNAPSHOT_SCOPES = 50  # most recently used scopes per budget shown in /status


def _escape(value: str) -> str:
    # Percent-encode everything but unreserved characters: "/", "=", "|", "{" and
    # "}" in a header value cannot forge another scope or end the hash tag early.
    text = quote(value, safe="")
    return "%2D" if text == "-" else text  # "-" stands for a missing agent


@dataclass(frozen=True, slots=True)
class Scope:
    """One budget's counter for one group of requests (e.g. ``ns=prod/agent=a1``)."""

    budget: BudgetConfig
    key: str
    prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The Redis key stem, built once: the braces are the Cluster hash tag.
        object.__setattr__(self, "prefix",
                           f"{KEY_PREFIX}{{{_escape(self.budget.name)}|{self.key}}}")


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """The level of a request's budgets and the budget and period that decided it."""

    level: str  # ok | soft | hard
    budget: str | None
    period: str | None  # day | month
    spent_usd: float
    limit_usd: float | None
    on_hard: str


OK = BudgetStatus("ok", None, None, 0.0, None, "deny")
"""The status of a request no budget covers."""


@dataclass(slots=True)
class _Matcher:
    """A budget's globs, compiled once."""

    budget: BudgetConfig
    namespace: Callable[[str], object]
    agent: Callable[[str], object] | None  # None: the glob is "*"
    dimensions: tuple[tuple[str, str], ...]

    def covers(self, identity: Identity) -> bool:
        if not self.namespace(identity.namespace):
            return False
        if self.agent is None:
            return True
        # Requests without an agent id match the agent glob "*" only.
        return identity.agent is not None and bool(self.agent(identity.agent))

    def scope_key(self, identity: Identity) -> str:
        if not self.dimensions:
            return "all"
        parts = []
        for dimension, label in self.dimensions:
            value = getattr(identity, dimension)
            parts.append(f"{label}={'-' if value is None else _escape(value)}")
        return "/".join(parts)


def _compile(glob: str) -> Callable[[str], object]:
    return re.compile(fnmatch.translate(glob)).match  # what fnmatchcase does, compiled once


@dataclass(slots=True)
class _Spend:
    """Local counters of one scope for the current day and month, in micro-USD.

    ``*_seen`` is the last value read from Redis; ``*_local`` the charges made
    here since (all of them when there is no Redis). Their sum is the fallback.
    """

    scope: Scope
    day_limit: int | None
    month_limit: int | None
    soft_share: float
    day: str = ""
    month: str = ""
    day_key: str = ""
    month_key: str = ""
    day_seen: int = 0
    day_local: int = 0
    month_seen: int = 0
    month_local: int = 0
    used: float = 0.0  # clock time of the last status or charge

    def roll(self, day: str, month: str) -> None:
        """Start new counters when the UTC day or month changed."""
        if self.day != day:
            self.day, self.day_key = day, f"{self.scope.prefix}:d:{day}"
            self.day_seen = self.day_local = 0
        if self.month != month:
            self.month, self.month_key = month, f"{self.scope.prefix}:m:{month}"
            self.month_seen = self.month_local = 0

    def worst(self) -> tuple[int, float, str | None, int, int | None]:
        """(level rank, share of the limit, period, spent, limit) of the worse period."""
        best: tuple[int, float, str | None, int, int | None] = (0, -1.0, None, 0, None)
        for period, spent, limit in (("day", self.day_seen + self.day_local, self.day_limit),
                                     ("month", self.month_seen + self.month_local,
                                      self.month_limit)):
            if limit is None:
                continue
            rank = 2 if spent >= limit else 1 if spent >= self.soft_share * limit else 0
            share = spent / limit
            if (rank, share) > best[:2]:
                best = (rank, share, period, spent, limit)
        return best


def _micro_limit(usd: float | None) -> int | None:
    return None if usd is None else round(usd * MICRO)


def _micro(value: object) -> int:
    """A counter read from Redis (bytes of an integer, or None when absent)."""
    if value is None:
        return 0
    if isinstance(value, bytes | str | int):
        try:
            return int(value)
        except ValueError:
            pass
    log.debug("budgets: ignoring a non-integer spend counter in Redis")
    return 0


class BudgetBook:
    """Spend of every budget scope, in Redis shared by the replicas or in this process."""

    def __init__(self, budgets: Sequence[BudgetConfig], redis_url: str | None,
                 timeout_ms: float, *, breaker_failures: int = 3,
                 breaker_reset_s: float = 5.0, clock: Callable[[], float] = time.time
                 ) -> None:
        self.budgets = tuple(budgets)
        self._matchers = [self._matcher(b) for b in self.budgets]
        self._clock = clock
        self.timeout_s = timeout_ms / 1000
        self.redis: RespClient | Redis | None = None
        self._connect_s = self.timeout_s * 20
        if redis_url:
            self.redis = (RespClient(redis_url, self._connect_s)
                          if resp_client_url(redis_url)
                          else connect(redis_url, connect_timeout_s=self._connect_s,
                                       health_check_interval=0))
        self.breaker = Breaker(breaker_failures, breaker_reset_s,
                               trial_s=2 * self.timeout_s, name="budgets",
                               fallback="local spend only")
        self.redis_errors = 0
        self.last_latency_ms: float | None = None
        self.owed_dropped = 0
        self._memo: dict[tuple[str, str, str | None], tuple[Scope, ...]] = {}
        self._spend: dict[str, _Spend] = {}  # by scope prefix
        self._owed: dict[str, list[int]] = {}  # key -> [micro-USD, TTL s] not yet in Redis
        self._expire_nx = True  # EXPIRE ... NX needs Redis 7; older servers get plain EXPIRE
        self._period_from = 1.0
        self._period_until = 0.0
        self._day = self._month = ""

    @staticmethod
    def _matcher(budget: BudgetConfig) -> _Matcher:
        dims = tuple(pair for pair in _DIMENSION_LABELS if pair[0] in budget.per)
        agent = None if budget.match.agent == "*" else _compile(budget.match.agent)
        return _Matcher(budget, _compile(budget.match.namespace), agent, dims)

    async def start(self) -> None:
        """Connect to Redis now, so the first request does not pay for it (down is not fatal)."""
        if self.redis is None:
            return
        try:
            async with asyncio.timeout(self._connect_s):
                await self.redis.execute_command("PING")
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("budgets: cannot reach Redis yet (%s); local spend decides until "
                        "it answers", type(exc).__name__)

    async def close(self) -> None:
        """Close the Redis connection."""
        if self.redis is not None:
            await self.redis.aclose()

    def scopes(self, identity: Identity) -> tuple[Scope, ...]:
        """The scopes of the budgets covering ``identity`` (memoized per identity)."""
        memo_key = (identity.namespace, identity.tenant, identity.agent)
        found = self._memo.get(memo_key)
        if found is None:
            found = tuple(Scope(m.budget, m.scope_key(identity))
                          for m in self._matchers if m.covers(identity))
            if len(self._memo) >= _MEMO_MAX:
                del self._memo[next(iter(self._memo))]  # oldest first
            self._memo[memo_key] = found
        return found

    async def status(self, scopes: Sequence[Scope]) -> BudgetStatus:
        """The worst level across the scopes' day and month limits (hard > soft > ok).

        Reads the counters with one MGET; without Redis, from the local counters.
        Among equal levels the budget closest to its limit decides, and at
        ``hard`` a budget that denies wins over one that allows the cheapest model.
        """
        if not scopes:
            return OK
        spends = self._spends(scopes)
        await self._refresh(spends)
        worst: tuple[int, int, float] = (-1, 0, 0.0)
        decided: tuple[_Spend, str | None, int, int | None] | None = None
        for spend in spends:
            rank, share, period, spent, limit = spend.worst()
            deny = int(rank == 2 and spend.scope.budget.on_hard == "deny")
            if (rank, deny, share) > worst:
                worst = (rank, deny, share)
                decided = (spend, period, spent, limit)
        assert decided is not None
        spend, period, spent, limit = decided
        budget = spend.scope.budget
        return BudgetStatus(_LEVELS[worst[0]], budget.name, period,
                            spent / MICRO, None if limit is None else limit / MICRO,
                            budget.on_hard)

    async def charge(self, scopes: Sequence[Scope], usd: float) -> None:
        """Add the cost of an answer to the day and month counters of each scope.

        Always counted locally; sent to Redis in one pipelined round trip with
        the charges an earlier outage kept from it. Costs <= 0 are ignored; a cost
        smaller than one micro-USD counts as one, so tiny answers are not free.
        """
        if not math.isfinite(usd):
            log.debug("budgets: ignoring a charge of %r USD", usd)
            return
        if usd <= 0 or not scopes:
            return
        micro = max(1, round(usd * MICRO))
        spends = self._spends(scopes)
        sends: dict[str, list[int]] = {}
        for spend in spends:
            spend.day_local += micro
            spend.month_local += micro
            sends.setdefault(spend.day_key, [0, DAY_TTL_S])[0] += micro
            sends.setdefault(spend.month_key, [0, MONTH_TTL_S])[0] += micro
        redis = self.redis
        if redis is None:
            return
        if not self.breaker.allow():
            self._owe(sends)
            return
        if self._owed:
            owed, self._owed = self._owed, {}
            for key, (amount, ttl) in owed.items():
                sends.setdefault(key, [0, ttl])[0] += amount
        started = time.perf_counter()
        try:
            # Off the response path (after the answer was sent): a wider budget than
            # reads, so a slow moment does not turn into an ambiguous, re-sent charge.
            async with asyncio.timeout(self.timeout_s * 5):
                replies = await self._increment(redis, sends)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            self._owe(sends)
            return
        self.last_latency_ms = (time.perf_counter() - started) * 1000
        self.breaker.success()
        by_key = dict(zip(sends, replies, strict=True))
        for spend in spends:
            # The reply is Redis's total, this charge included: it replaces the local sum.
            day, month = by_key.get(spend.day_key), by_key.get(spend.month_key)
            if day is not None:
                spend.day_seen, spend.day_local = day, 0
            if month is not None:
                spend.month_seen, spend.month_local = month, 0

    async def _increment(self, redis: RespClient | Redis,
                         sends: dict[str, list[int]]) -> list[int | None]:
        """INCRBY + EXPIRE NX per key in one round trip; the new totals (None: refused)."""
        nx = ("NX",) if self._expire_nx else ()
        if isinstance(redis, RespClient):
            # One connection answers in order: INCRBY is applied before its EXPIRE.
            calls: list[Coroutine[Any, Any, Any]] = []
            for key, (amount, ttl) in sends.items():
                calls.append(redis.execute("INCRBY", key, amount))
                calls.append(redis.execute("EXPIRE", key, ttl, *nx))
            results: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
        else:
            # redis-py spreads concurrent commands over its pool: a pipeline keeps the order.
            pipe = redis.pipeline(transaction=False)
            for key, (amount, ttl) in sends.items():
                pipe.execute_command("INCRBY", key, amount)
                pipe.execute_command("EXPIRE", key, ttl, *nx)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ResponseError):
                raise result
        totals: list[int | None] = []
        retry_expire = []
        for (key, (_, ttl)), total, expired in zip(sends.items(), results[::2], results[1::2],
                                                    strict=True):
            if isinstance(total, ResponseError):
                # Something else owns the key (wrong type, not an integer): skip it.
                log.debug("budgets: INCRBY %s refused (%s)", key, total)
                totals.append(None)
                continue
            totals.append(int(total))
            if isinstance(expired, ResponseError):
                retry_expire.append((key, ttl))
        if retry_expire and self._expire_nx:
            self._expire_nx = False
            log.warning("budgets: Redis refuses EXPIRE NX (older than 7.0); TTLs are "
                        "refreshed on each charge instead")
            await asyncio.gather(*(redis.execute_command("EXPIRE", key, ttl)
                                   for key, ttl in retry_expire), return_exceptions=True)
        return totals

    def _owe(self, sends: dict[str, list[int]]) -> None:
        """Keep charges Redis did not get, for the next charge that reaches it."""
        for key, (amount, ttl) in sends.items():
            owed = self._owed.get(key)
            if owed is not None:
                owed[0] += amount
            elif len(self._owed) < _OWED_MAX:
                self._owed[key] = [amount, ttl]
            else:
                self.owed_dropped += 1  # still counted locally, lost to the fleet

    def _period(self) -> tuple[str, str]:
        """The current UTC day (YYYYMMDD) and month (YYYYMM), recomputed once a day."""
        now = self._clock()
        if not self._period_from <= now < self._period_until:
            start = now - now % _DAY_S  # POSIX days are 86,400 s: UTC midnight
            tm = time.gmtime(start)
            self._day = f"{tm.tm_year:04d}{tm.tm_mon:02d}{tm.tm_mday:02d}"
            self._month = self._day[:6]
            self._period_from, self._period_until = start, start + _DAY_S
        return self._day, self._month

    def _spends(self, scopes: Sequence[Scope]) -> list[_Spend]:
        day, month = self._period()
        now = self._clock()
        spends = []
        for scope in scopes:
            spend = self._spend.get(scope.prefix)
            if spend is None:
                if len(self._spend) >= _TRACKED_MAX:
                    self._forget_idle()
                budget = scope.budget
                spend = self._spend[scope.prefix] = _Spend(
                    scope, _micro_limit(budget.daily_usd), _micro_limit(budget.monthly_usd),
                    budget.soft_share)
            spend.roll(day, month)
            spend.used = now
            spends.append(spend)
        return spends

    def _forget_idle(self) -> None:
        # Drop the least recently used half at once: the sort is paid rarely.
        # Their spend is still in Redis; without Redis it is forgotten.
        idle = sorted(self._spend.values(), key=lambda s: s.used)[:len(self._spend) // 2]
        for spend in idle:
            del self._spend[spend.scope.prefix]

    async def _refresh(self, spends: list[_Spend]) -> None:
        """Replace the local counters with Redis's (one MGET), if Redis answers."""
        redis = self.redis
        if redis is None or not self.breaker.allow():
            return
        keys: list[str] = []
        for spend in spends:
            keys += (spend.day_key, spend.month_key)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                values = await redis.execute_command("MGET", *keys)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        self.last_latency_ms = (time.perf_counter() - started) * 1000
        self.breaker.success()
        owed = self._owed
        for i, spend in enumerate(spends):
            day_key, month_key = keys[2 * i], keys[2 * i + 1]
            if spend.day_key == day_key:  # else the day turned during the call
                # Charges Redis has not got yet still count here.
                spend.day_seen = _micro(values[2 * i])
                spend.day_local = owed[day_key][0] if day_key in owed else 0
            if spend.month_key == month_key:
                spend.month_seen = _micro(values[2 * i + 1])
                spend.month_local = owed[month_key][0] if month_key in owed else 0

    def _failed(self, exc: BaseException) -> None:
        self.redis_errors += 1
        self.breaker.failure()
        log.debug("budgets: Redis call failed (%s)", type(exc).__name__)

    async def health(self) -> Health:
        """Backend and breaker; degraded while Redis is unavailable."""
        details: dict[str, object] = {
            "backend": "redis" if self.redis is not None else "local",
            "breaker": self.breaker.state, "breaker_opened": self.breaker.opened,
            "redis_errors": self.redis_errors, "last_redis_ms": self.last_latency_ms,
            "scopes_tracked": len(self._spend), "owed_keys": len(self._owed),
            "owed_dropped": self.owed_dropped}
        if self.redis is None:
            return Health(State.OK, "local spend (no Redis configured)", details)
        if self.breaker.state != "closed":
            return Health(State.DEGRADED, "Redis unavailable: local spend only", details)
        return Health(State.OK, "", details)

    def snapshot(self) -> dict[str, Any]:
        """Spend of the recently used scopes per budget, from the last known values.

        Makes no Redis call: values are those of the latest status or charge.
        """
        day, month = self._period()
        by_budget: dict[str, list[_Spend]] = {b.name: [] for b in self.budgets}
        for spend in self._spend.values():
            by_budget.setdefault(spend.scope.budget.name, []).append(spend)
        budgets: dict[str, Any] = {}
        for budget in self.budgets:
            spends = sorted(by_budget[budget.name], key=lambda s: s.used, reverse=True)
            scopes = []
            for spend in spends[:_SNAPSHOT_SCOPES]:
                spend.roll(day, month)  # a scope idle since yesterday spent nothing today
                rank, _, _, _, _ = spend.worst()
                scopes.append({
                    "scope": spend.scope.key,
                    "day_usd": (spend.day_seen + spend.day_local) / MICRO,
                    "month_usd": (spend.month_seen + spend.month_local) / MICRO,
                    "level": _LEVELS[rank],
                    "last_used": spend.used})
            budgets[budget.name] = {
                "per": list(budget.per), "daily_usd": budget.daily_usd,
                "monthly_usd": budget.monthly_usd, "soft_share": budget.soft_share,
                "on_hard": budget.on_hard, "scopes_tracked": len(spends), "scopes": scopes}
        return {"backend": "redis" if self.redis is not None else "local",
                "breaker": self.breaker.state, "day": day, "month": month,
                "budgets": budgets}

    def usage_shares(self) -> dict[tuple[LabelValue, ...], float]:
        """Per (budget, period), the largest share of its limit any tracked scope has spent.

        From the last known values (no Redis call): the gauge a dashboard alerts on.
        """
        snap = self.snapshot()
        shares: dict[tuple[LabelValue, ...], float] = {}
        for budget in self.budgets:
            scopes = snap["budgets"][budget.name]["scopes"]
            for period, limit, spent in (("day", budget.daily_usd, "day_usd"),
                                         ("month", budget.monthly_usd, "month_usd")):
                if limit:
                    shares[(budget.name, period)] = max(
                        (s[spent] / limit for s in scopes), default=0.0)
        return shares

    def observe(self, instruments: Instruments) -> None:
        """Publish budget usage and, with Redis, the breaker state as gauges."""
        instruments.observe(
            "llm_sidecar.budget.usage", "1",
            "Largest share of a budget's limit spent by any scope this replica tracks "
            "(1 = at the hard limit), by budget and period (day, month).",
            ("llm_sidecar.budget", "llm_sidecar.budget.period"), self.usage_shares)
        if self.redis is not None:
            instruments.observe(
                "llm_sidecar.budget.breaker.state", "{state}",
                "Circuit breaker in front of the budgets' Redis: 0 closed, 1 half-open, "
                "2 open (local spend only).", (),
                lambda: {(): self.breaker.state_code})
