"""Reservations: blocks of shared units spent locally, against a real Redis and in process."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

import openai
import pytest
from redis.asyncio import Redis

from proxy.config import QuotaConfig, RateLimitConfig, RuleConfig
from proxy.ratelimit.limiter import Limiter
from proxy.ratelimit.policy import Charge, Policy
from proxy.ratelimit.reserve import Reservations
from tests.conftest import SidecarFactory
from tests.redis_server import RedisServer
from tests.test_ratelimit_e2e import _limiter, _settled

T = TypeVar("T")
HOUR = "1h"  # refill so slow (per hour) that nothing comes back during a test


@pytest.fixture(scope="module")
def redis_server(module_redis: RedisServer) -> RedisServer:
    """One Redis for the whole module (each test flushes it first)."""
    return module_redis


def _cfg(server: RedisServer, rule: RuleConfig, share: float) -> RateLimitConfig:
    return RateLimitConfig(rules=(rule,), redis_url=server.url, reserve_share=share,
                           timeout_ms=2000)


def _run(server: RedisServer, coro: Coroutine[Any, Any, T]) -> T:
    async def go() -> T:
        async with Redis.from_url(server.url) as r:
            await r.flushall()
        return await coro
    return asyncio.run(go())


async def _remaining(limiter: Limiter, charge: Charge) -> int:
    """The bucket's remaining units in Redis (a cost-0 check charges nothing)."""
    decision = await limiter._redis_call([replace(charge, cost=0)], "check", "")
    assert decision is not None
    return decision.states[0].remaining


async def _evalsha_calls(server: RedisServer) -> int:
    async with Redis.from_url(server.url) as r:
        stats: dict[str, Any] = await r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_two_replicas_with_reservations_never_admit_past_the_limit(
        redis_server: RedisServer) -> None:
    rule = RuleConfig(name="fleet", requests=QuotaConfig(200, HOUR))
    cfg = _cfg(redis_server, rule, share=0.1)  # blocks of 20 requests
    [charge] = Policy(cfg).charges({}, tokens=0)

    async def go() -> tuple[list[int], list[dict[str, int]], int, int]:
        replicas = [Limiter(cfg), Limiter(cfg)]
        for r in replicas:
            await r.start()
        calls_before = await _evalsha_calls(redis_server)
        admitted = [0, 0]
        refused = [False, False]
        turn = 0
        while not all(refused):  # alternate, as two busy pods would, until both refuse
            i = turn % 2
            turn += 1
            if refused[i]:
                continue
            decision = await replicas[i].decide([charge])
            if decision.admitted:
                admitted[i] += 1
            else:
                refused[i] = True
        calls = await _evalsha_calls(redis_server) - calls_before
        left = await _remaining(replicas[0], charge)
        for r in replicas:
            await r.close()
        return admitted, [dict(r.decisions) for r in replicas], calls, left

    admitted, decisions, calls, left = _run(redis_server, go())
    # Exactly the limit, fleet-wide: every unit spent locally was charged in Redis first,
    # and the last units were decided request by request, never parked in a block.
    assert sum(admitted) == 200 and left == 0
    assert all(d.get("reserved", 0) >= 60 for d in decisions)
    assert calls < 90  # without reservations: 202 calls (every request, plus 2 refusals)


def test_closing_returns_what_is_left_of_a_block(redis_server: RedisServer) -> None:
    rule = RuleConfig(name="agent", requests=QuotaConfig(200, HOUR))
    cfg = _cfg(redis_server, rule, share=0.1)
    [charge] = Policy(cfg).charges({}, tokens=0)

    async def go() -> tuple[int, int, list[str]]:
        limiter, observer = Limiter(cfg), Limiter(replace(cfg, reserve_share=0))
        await limiter.start()
        backends = [(await limiter.decide([charge])).backend for _ in range(6)]
        while_held = await _remaining(observer, charge)
        await limiter.close()  # gives back the 15 units it did not spend
        after = await _remaining(observer, charge)
        await observer.close()
        return while_held, after, backends

    while_held, after, backends = _run(redis_server, go())
    assert backends == ["redis"] + ["reserved"] * 5
    assert while_held == 200 - 1 - 20
    assert after == 200 - 6


def test_token_corrections_settle_in_the_block_then_in_redis(redis_server: RedisServer) -> None:
    rule = RuleConfig(name="tpm", tokens=QuotaConfig(100_000, HOUR))
    cfg = _cfg(redis_server, rule, share=0.05)  # blocks of 5,000 tokens
    policy = Policy(cfg)
    [charge] = policy.charges({}, tokens=1000)

    async def go() -> tuple[int, int, int, int]:
        limiter, observer = Limiter(cfg), Limiter(replace(cfg, reserve_share=0))
        await limiter.start()
        first = await limiter.decide([charge])  # 1,000 + a block of 5,000
        assert first.admitted and first.backend == "redis"
        second = await limiter.decide([charge])  # from the block
        assert second.backend == "reserved"
        calls = await _evalsha_calls(redis_server)
        # Each request really used 400 tokens: 600 back each, into the block.
        await limiter.settle([replace(charge, cost=-600)] * 2, [], "", "redis")
        await limiter.drain()
        calls_after = await _evalsha_calls(redis_server)
        before_close = await _remaining(observer, charge)
        await limiter.close()
        after = await _remaining(observer, charge)
        await observer.close()
        assert limiter.reserve is not None
        return calls_after - calls, before_close, after, limiter.reserve.granted

    sent, before_close, after, granted = _run(redis_server, go())
    assert sent == 0  # corrections of a bucket with a live block never went to Redis
    assert granted == 1
    assert before_close == 100_000 - 6000
    assert after == 100_000 - 800  # what the two requests really used


def test_small_buckets_and_slots_decide_exactly() -> None:
    policy = Policy(RateLimitConfig(rules=(
        RuleConfig(name="agent-rpm", per=("agent",), requests=QuotaConfig(60, "1m")),
        RuleConfig(name="ns-tpm", tokens=QuotaConfig(1_000_000, "1m"), concurrent=4))))
    rpm, tpm, slots = policy.charges({"agent": "a"}, tokens=2000)
    reserve = Reservations(share=0.01, ttl_s=1.0)
    assert reserve.block_size(rpm) == 0  # 0.6 of a request: never worth a block
    assert reserve.block_size(slots) == 0  # in-flight slots are never reserved
    assert reserve.block_size(tpm) == 10_000
    assert reserve.block_size(replace(tpm, cost=6000)) == 0  # a block below two requests
    reserve.grant(tpm, 10_000, 900_000, 1.0, now=0.0)
    assert reserve.block_size(tpm) == 0  # plenty left already
    # One bucket of the request without a block: the whole request goes to Redis.
    assert reserve.take([tpm, rpm], now=0.1) is None
    assert reserve.held(tpm.key) == 10_000  # and nothing was taken from the others


def test_blocks_expire_and_go_back() -> None:
    policy = Policy(RateLimitConfig(rules=(RuleConfig(name="t", tokens=QuotaConfig(10**6, "1m")),)))
    [c] = policy.charges({}, tokens=100)
    reserve = Reservations(share=0.01, ttl_s=1.0)
    reserve.grant(c, 1000, 500_000, 30.0, now=10.0)
    spent = reserve.take([c], now=10.5)
    assert spent is not None and spent[0].remaining == 500_900
    assert spent[0].reset_s == pytest.approx(29.5)
    assert reserve.correct(replace(c, cost=50), now=10.6)  # used 50 more than estimated
    assert not reserve.due(10.9)
    assert reserve.due(11.0)
    assert reserve.take([c], now=11.0) is None  # an expired block admits nothing
    [back] = reserve.expired(now=11.0)
    assert back.key == c.key and back.cost == -(1000 - 100 - 50)
    assert len(reserve) == 0 and not reserve.due(100.0)
    assert not reserve.correct(c, now=11.1)  # no block: the correction goes to Redis


def test_overdrawn_block_charges_redis_when_returned() -> None:
    policy = Policy(RateLimitConfig(rules=(RuleConfig(name="t", tokens=QuotaConfig(10**6, "1m")),)))
    [c] = policy.charges({}, tokens=100)
    reserve = Reservations(share=0.01, ttl_s=1.0)
    reserve.grant(c, 1000, 0, 0.0, now=0.0)
    assert reserve.correct(replace(c, cost=1500), now=0.1)  # a reply far over its estimate
    assert reserve.take([c], now=0.2) is None
    [owed] = reserve.release_all()
    assert owed.cost == 500


def test_sidecar_decides_most_requests_from_its_block(sidecars: SidecarFactory,
                                                       redis_server: RedisServer) -> None:
    rule = RuleConfig(name="ns-rpm", per=("namespace",), requests=QuotaConfig(100_000, "1m"))
    url = sidecars.start(ratelimit=_cfg(redis_server, rule, share=0.001))  # blocks of 100
    remaining = []
    with openai.OpenAI(base_url=url, api_key="sk-reserve", max_retries=0) as client:
        for _ in range(30):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    _settled(sidecars, url)
    limiter = _limiter(sidecars, url)
    assert limiter.decisions == {"redis": 1, "reserved": 29}
    # The headers count down by one per request, the block included.
    assert remaining == [100_000 - n for n in range(1, 31)]
