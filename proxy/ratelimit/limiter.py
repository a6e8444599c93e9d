"""Admit or deny a request's charges: Redis first, local buckets when Redis cannot answer.

The Redis call has a tight time budget and sits behind a circuit breaker, so
a slow or dead Redis costs at most one budget per request until the breaker
opens, and nothing after. While Redis is unavailable each rule follows its
``on_redis_down``: ``local`` buckets holding ``local_share`` of the limit,
``open`` (admit) or ``closed`` (deny). The breaker closes again by itself
once a trial call succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from proxy.breaker import Breaker
from proxy.config import RateLimitConfig
from proxy.health import Health, State
from proxy.ratelimit.decision import BucketState, Decision
from proxy.ratelimit.policy import Charge
from proxy.ratelimit.reserve import Reservations
from proxy.ratelimit.scripts import LuaScript
from proxy.redis_connect import connect, resp_client_url
from proxy.resp import RespClient

if TYPE_CHECKING:
    from proxy.telemetry.instruments import Instruments

log = logging.getLogger("proxy.ratelimit")

_GRACE_MS = 1000  # a key outlives its full-again time by this much
# A full in-flight quota frees up when some request ends, which nobody can
# predict: clients are told to retry after this long.
CONCURRENT_RETRY_S = 1.0
_CONCURRENT_RETRY_US = int(CONCURRENT_RETRY_S * 1_000_000)
# Buckets whose pending corrections, or fallback use during an outage, are kept.
_MAX_PENDING_KEYS = 10_000
_BATCH = 64  # buckets per Redis call when sending corrections or repaying


class LocalBuckets:
    """The same maths as lua/ratelimit.lua, in process (one replica's view)."""

    def __init__(self, lease_ttl_s: float) -> None:
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # key -> lease id -> expiry (us)
        self._lease_ttl_us = lease_ttl_s * 1_000_000
        self._sweep_at = 0.0

    def apply(self, charges: list[Charge], *, force: bool = False, share: float = 1.0,
              lease: str = "") -> tuple[bool, list[BucketState]]:
        """Check and charge all buckets atomically (``force``: charge regardless)."""
        now = time.monotonic() * 1_000_000
        plans = []
        admitted = True
        for c in charges:
            quota = c.quota if share == 1.0 else c.quota.scaled(share)
            cap = quota.capacity
            retry = 0.0
            if quota.kind == "concurrent":
                held = self._held(c.key, now)
                if not force and c.cost > 0 and len(held) >= cap:
                    retry, admitted = CONCURRENT_RETRY_S, False
                plans.append((c, 0.0, 0.0, 0.0, cap, retry))
                continue
            t = quota.us_per_unit
            tat = max(self._tat.get(c.key, now), now)
            new = max(tat + c.cost * t, now)
            if not force and c.cost > 0:
                if c.cost > cap:
                    retry, admitted = -1.0, False
                elif new > now + cap * t:
                    retry, admitted = (new - now - cap * t) / 1e6, False
            plans.append((c, tat, new, t, cap, retry))
        states = []
        for c, before, after, t, cap, retry in plans:
            if c.quota.kind == "concurrent":
                held = self._held(c.key, now)
                if admitted and c.cost > 0:
                    held[lease] = now + self._lease_ttl_us
                elif admitted and c.cost < 0:
                    held.pop(lease, None)
                states.append(BucketState(max(0, cap - len(held)), 0.0, retry))
                continue
            level = before
            if admitted:
                level = after
                self._tat[c.key] = after
            # +1 us: float rounding must not turn an exact whole unit into 0.99...
            states.append(BucketState(min(cap, max(0, int((now + cap * t - level + 1) // t))),
                                      (level - now) / 1e6, retry))
        if now > self._sweep_at:
            self._sweep(now)
        return admitted, states

    def _held(self, key: str, now: float) -> dict[str, float]:
        held = self._leases.get(key)
        if held is None:
            held = self._leases[key] = {}
        elif held:
            for lease in [k for k, expiry in held.items() if expiry <= now]:
                del held[lease]  # a lease whose release was lost (settle queue full)
        return held

    def _sweep(self, now: float) -> None:
        # Full buckets need no state: forget them, as Redis lets such keys expire.
        self._tat = {k: v for k, v in self._tat.items() if v > now}
        self._leases = {k: v for k, v in self._leases.items() if v}
        self._sweep_at = now + 10_000_000


class Limiter:
    """Decides charges against Redis, or locally when there is no Redis or it is down."""

    def __init__(self, cfg: RateLimitConfig) -> None:
        self.cfg = cfg
        self.redis = _client(cfg)
        self.script = LuaScript("ratelimit")
        self.local = LocalBuckets(cfg.lease_ttl_s)
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_reset_s,
                               trial_s=2 * cfg.timeout_ms / 1000)
        self.timeout_s = cfg.timeout_ms / 1000
        self.lease_ttl_ms = int(cfg.lease_ttl_s * 1000)
        self.decisions: dict[str, int] = {}
        self.last_latency_ms: float | None = None
        self.queued = 0  # requests held right now for rules with max_wait
        # Lease ids must be unique across the fleet: a random replica prefix + a counter.
        self._lease_prefix = os.urandom(6).hex()
        self._leases = itertools.count()
        self._released = asyncio.Event()
        self._debt: dict[str, Charge] = {}  # key -> what fallback decisions took from it
        self._repaying: asyncio.Task[None] | None = None
        self._corrections: dict[str, Charge] = {}  # key -> net correction not yet sent
        self._flusher: asyncio.Task[None] | None = None
        self.debt_dropped = 0
        self.reserve = (Reservations(cfg.reserve_share, cfg.reserve_ttl_ms / 1000)
                        if self.redis is not None and cfg.reserve_share > 0 else None)

    def observe(self, instruments: Instruments) -> None:
        """Publish the breaker state and the queue length as gauges."""
        if self.redis is not None:
            instruments.observe(
                "llm_sidecar.ratelimit.breaker.state", "{state}",
                "Circuit breaker in front of the limiter's Redis: 0 closed, 1 half-open, "
                "2 open (limits on the fallback policy).", (),
                lambda: {(): self.breaker.state_code})
        instruments.observe(
            "llm_sidecar.ratelimit.queued", "{request}",
            "Requests held right now by rules in queue mode (max_wait).", (),
            lambda: {(): self.queued})

    def new_lease(self) -> str:
        """A fleet-unique id for the in-flight slots one request holds."""
        return f"{self._lease_prefix}:{next(self._leases)}"

    async def start(self) -> None:
        """Load the script (a Redis that is down now is not fatal: the breaker handles it)."""
        if self.redis is not None:
            try:
                await self.script.load(self.redis)
            except (RedisError, OSError) as exc:
                log.warning("rate limiter: cannot load script yet (%s)", type(exc).__name__)

    async def close(self) -> None:
        """Return reservations and send what is pending (bounded by the call timeouts),
        then close the pool."""
        if self.reserve is not None:
            self._correct(self.reserve.release_all())
        with contextlib.suppress(Exception):
            await self.drain()
        if self.redis is not None:
            await self.redis.aclose()

    async def decide(self, charges: list[Charge], lease: str = "") -> Decision:
        """Admit (charging every bucket, taking in-flight slots) or deny (charging none)."""
        reserve = self.reserve
        wants: list[int] | None = None
        if reserve is not None:
            now = time.monotonic()
            if reserve.due(now):
                self._correct(reserve.expired(now))
            spent = reserve.take(charges, now)
            if spent is not None:
                self.decisions["reserved"] = self.decisions.get("reserved", 0) + 1
                return Decision(True, spent, "reserved")
            wants = [reserve.block_size(c) for c in charges]
        decision = await self._redis_call(charges, "check", lease, wants)
        if decision is None:
            decision = self._fallback(charges, lease)
            if decision.admitted and self.redis is not None:
                self._owe(charges)
        elif self._debt and self._repaying is None:
            # Off the request path: the task runs once the decision is returned.
            self._repaying = asyncio.get_running_loop().create_task(self._repay(),
                                                                     name="ratelimit-repay")
        self.decisions[decision.backend] = self.decisions.get(decision.backend, 0) + 1
        return decision

    def _owe(self, charges: list[Charge]) -> None:
        """Remember what was admitted without Redis, to charge it there once it answers.

        Without this, a replica on its fallback (Redis down, or its own calls
        too slow) admits on top of what the other replicas admit through
        Redis, and Redis never learns of it. Charged later, that use still
        counts against the shared buckets, so the limit holds over time.
        """
        owed = [c for c in charges if c.quota.kind != "concurrent" and c.cost != 0]
        # Slots are held and released where they were granted: never owed.
        if not self._merge(self._debt, owed):
            self.debt_dropped += 1

    async def _repay(self) -> None:
        try:
            debt, self._debt = list(self._debt.values()), {}
            for i in range(0, len(debt), _BATCH):
                batch = debt[i:i + _BATCH]
                if await self._redis_call(batch, "force", "") is None:
                    self._owe(batch + debt[i + _BATCH:])
                    return
            log.info("rate limiter: charged %d buckets in Redis with what was admitted "
                     "on the fallback policy", len(debt))
        finally:
            self._repaying = None

    async def settle(self, corrections: list[Charge], releases: list[Charge], lease: str,
                     backend: str) -> None:
        """After a request: apply token corrections (any sign) and free its slots.

        Slots go back at once to the store that granted them (a Redis slot
        that cannot be released now lapses after the lease TTL). Corrections
        are merged per bucket and sent by one background flusher: while its
        Redis call is in flight the next ones accumulate, so under load one
        call carries many requests' corrections.
        """
        if corrections:
            if self.redis is None:
                self.local.apply(corrections, force=True)
            else:
                if self.reserve is not None:
                    now = time.monotonic()
                    corrections = [c for c in corrections if not self.reserve.correct(c, now)]
                self._correct(corrections)
        if releases:
            if backend == "redis":
                await self._redis_call(releases, "force", lease)
            elif backend == "local":
                self.local.apply(releases, force=True, share=self._share(), lease=lease)
            # Wake requests queued here for a slot; other replicas' waiters poll.
            self._released.set()
            self._released = asyncio.Event()

    def _correct(self, corrections: list[Charge]) -> None:
        """Queue corrections for Redis; the background flusher sends them."""
        if not corrections:
            return
        self._merge(self._corrections, corrections)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="ratelimit-corrections")

    async def _flush(self) -> None:
        try:
            while self._corrections:
                pending = list(self._corrections.values())
                self._corrections = {}
                for i in range(0, len(pending), _BATCH):
                    batch = pending[i:i + _BATCH]
                    if await self._redis_call(batch, "force", "") is None:
                        # Redis away: the local buckets limit meanwhile, and Redis
                        # is charged once it answers again.
                        self.local.apply(batch, force=True, share=self._share())
                        self._owe(batch)
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Wait until pending corrections and repayments have been sent."""
        for task in (self._flusher, self._repaying):
            if task is not None:
                await asyncio.shield(task)

    @staticmethod
    def _merge(into: dict[str, Charge], charges: list[Charge]) -> bool:
        """Add ``charges`` to the per-bucket totals in ``into``; False if it is full."""
        complete = True
        for c in charges:
            held = into.get(c.key)
            if held is None and len(into) >= _MAX_PENDING_KEYS:
                complete = False
                continue
            into[c.key] = replace(c, cost=c.cost + (held.cost if held else 0))
        return complete

    async def wait_for_release(self, timeout_s: float) -> None:
        """Return when this replica releases an in-flight slot, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout_s)

    def _share(self) -> float:
        return 1.0 if self.redis is None else self.cfg.local_share

    async def _redis_call(self, charges: list[Charge], mode: str, lease: str,
                          wants: list[int] | None = None) -> Decision | None:
        redis = self.redis
        if redis is None or not self.breaker.allow():
            return None
        args: list[object] = [mode, _GRACE_MS, lease, self.lease_ttl_ms]
        for i, c in enumerate(charges):
            quota = c.quota
            if quota.kind == "concurrent":
                args += ["concurrent", _CONCURRENT_RETRY_US, quota.capacity, c.cost, 0]
            else:
                args += ["rate", quota.us_per_unit, quota.capacity, c.cost,
                         wants[i] if wants is not None else 0]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await self.script(redis, [c.key for c in charges], args)
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failure()
            log.debug("rate limiter: Redis call failed (%s)", type(exc).__name__)
            return None
        self.last_latency_ms = (time.perf_counter() - started) * 1000
        self.breaker.success()
        admitted = bool(reply[0])
        states = []
        now = time.monotonic()
        for c, i in zip(charges, range(2, len(reply), 4), strict=True):
            remaining, reset_s = int(reply[i]), int(reply[i + 1]) / 1e6
            retry = int(reply[i + 2])
            granted = int(reply[i + 3])
            if granted and self.reserve is not None:
                self.reserve.grant(c, granted, remaining, reset_s, now)
            if self.reserve is not None:
                # The block is this replica's to spend: the client can count on it.
                remaining = min(c.quota.capacity, remaining + self.reserve.held(c.key))
            states.append(BucketState(remaining, reset_s, -1.0 if retry < 0 else retry / 1e6))
        return Decision(admitted, states, "redis", _denier(charges, states))

    def _fallback(self, charges: list[Charge], lease: str) -> Decision:
        local = [c for c in charges if self.redis is None or c.rule.on_redis_down == "local"]
        closed = [c for c in charges
                  if self.redis is not None and c.rule.on_redis_down == "closed"]
        if closed:
            wait = max(self.breaker.open_until - time.monotonic(), 1.0)
            states = [BucketState(0, wait, wait) for _ in charges]
            return Decision(False, states, "closed", closed[0])
        admitted, local_states = self.local.apply(local, share=self._share(), lease=lease)
        by_key = dict(zip((c.key for c in local), local_states, strict=True))
        # Rules that fail open impose nothing while Redis is away.
        states = [by_key.get(c.key, BucketState(c.quota.capacity, 0.0, 0.0)) for c in charges]
        backend = "local" if local else "open"
        return Decision(admitted, states, backend, _denier(charges, states))

    async def health(self) -> Health:
        """Redis reachability as the breaker sees it."""
        details: dict[str, object] = {"backend": "redis" if self.redis else "local",
                                      "breaker": self.breaker.state,
                                      "breaker_opened": self.breaker.opened,
                                      "decisions": dict(self.decisions),
                                      "queued": self.queued,
                                      "owed_buckets": len(self._debt),
                                      "reserved_buckets": len(self.reserve or ()),
                                      "last_redis_ms": self.last_latency_ms}
        if self.redis is None:
            return Health(State.OK, "local buckets (no Redis configured)", details)
        if self.breaker.state != "closed":
            return Health(State.DEGRADED, "Redis unavailable: limits run on the local "
                          "fallback policy", details)
        return Health(State.OK, "", details)


def _client(cfg: RateLimitConfig) -> Redis | RedisCluster | RespClient | None:
    if not cfg.redis_url:
        return None
    connect_s = cfg.timeout_ms / 1000 * 20
    if cfg.redis_cluster:
        return connect(cfg.redis_url, cluster=True, connect_timeout_s=connect_s)
    if resp_client_url(cfg.redis_url):
        return RespClient(cfg.redis_url, connect_s)
    return connect(cfg.redis_url, connect_timeout_s=connect_s, health_check_interval=0)


def _denier(charges: list[Charge], states: list[BucketState]) -> Charge | None:
    worst = None
    worst_retry = 0.0
    for c, s in zip(charges, states, strict=True):
        if s.retry_s < 0:
            return c
        if s.retry_s > worst_retry:
            worst, worst_retry = c, s.retry_s
    return worst
