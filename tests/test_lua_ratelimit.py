"""lua/ratelimit.lua against a real Redis: refill maths, atomicity, expiry, NOSCRIPT."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from proxy.ratelimit.scripts import LuaScript
from tests.redis_server import RedisServer

TAG = "{llm-sidecar:rl}"
SECOND_US = 1_000_000


@pytest.fixture(scope="module")
def redis_server(module_redis: RedisServer) -> RedisServer:
    """One Redis for the whole module (each test flushes it first)."""
    return module_redis


def run(server: RedisServer, steps: Any) -> Any:
    async def go() -> Any:
        client = Redis.from_url(server.url)
        try:
            await client.flushall()
            return await steps(client, LuaScript("ratelimit"))
        finally:
            await client.aclose()
    return asyncio.run(go())


def head(mode: str, grace_ms: int = 1000, lease: str = "", lease_ttl_ms: int = 60_000) -> list[Any]:
    """The four leading ARGV values."""
    return [mode, grace_ms, lease, lease_ttl_ms]


def bucket(period_s: float, amount: int, cost: int, capacity: int | None = None,
           reserve: int = 0) -> list[Any]:
    """ARGV values of a rate bucket of ``amount`` units per ``period_s`` (capacity = amount)."""
    return ["rate", period_s * SECOND_US / amount, capacity or amount, cost, reserve]


def slots(limit: int, cost: int = 1, retry_hint_us: int = SECOND_US) -> list[Any]:
    """ARGV values of an in-flight (concurrent) bucket."""
    return ["concurrent", retry_hint_us, limit, cost, 0]


def parse(reply: list[int]) -> tuple[bool, int, list[tuple[int, int, int]]]:
    """admitted, now, and (remaining, reset_us, retry_us) per bucket."""
    admitted, now, rest = reply[0], reply[1], reply[2:]
    return bool(admitted), now, [tuple(rest[i:i + 3]) for i in range(0, len(rest), 4)]


def reserved(reply: list[int]) -> list[int]:
    """Units of reservation granted, per bucket."""
    return list(reply[5::4])


def test_burst_then_deny_with_retry_time(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        key = f"{TAG}:agent:a"
        return [parse(await script(r, [key], [*head("check"), *bucket(60, 3, 1)]))
                for _ in range(4)]

    replies = run(redis_server, steps)
    assert [ok for ok, _, _ in replies] == [True, True, True, False]
    assert [b[0][0] for _, _, b in replies] == [2, 1, 0, 0]  # remaining
    _, _, [(_, reset_us, retry_us)] = replies[3]
    # 3 per minute: one unit comes back every 20 s; the 4th waits about that long.
    assert 19 * SECOND_US < retry_us <= 20 * SECOND_US
    assert 59 * SECOND_US < reset_us <= 60 * SECOND_US


def test_refill_is_continuous(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        key = f"{TAG}:agent:b"
        # 100,000 units per second (10 us each), drained at once; every later call
        # (cost 0) sees what the server's clock has refilled since.
        out = [parse(await script(r, [key], [*head("check"), *bucket(1, 100_000, 100_000)]))]
        for _ in range(5):
            await r.ping()
            out.append(parse(await script(r, [key], [*head("check"), *bucket(1, 100_000, 0)])))
        return out

    replies = run(redis_server, steps)
    assert replies[0][0] and replies[0][2][0][0] == 0
    drained_at = replies[0][1]
    for _, now, [(remaining, reset_us, _)] in replies[1:]:
        # Exactly one unit back per 10 us of Redis time, whatever the wall clock did.
        # (The script counts a unit whole 1 us early, against float rounding.)
        assert remaining == (now - drained_at + 1) // 10
        assert reset_us == SECOND_US - (now - drained_at)
    assert replies[-1][2][0][0] > replies[1][2][0][0]


def test_all_or_nothing_across_buckets(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> tuple[Any, Any, Any]:
        agent, ns = f"{TAG}:agent:c", f"{TAG}:ns:x:tokens"
        # The agent bucket has room; the namespace token bucket does not.
        await script(r, [ns], [*head("check"), *bucket(60, 100, 90)])
        denied = parse(await script(r, [agent, ns], [
            *head("check"), *bucket(60, 10, 1), *bucket(60, 100, 50)]))
        stored = await r.get(agent)
        agent_after = parse(await script(r, [agent], [*head("check"), *bucket(60, 10, 0)]))
        return denied, agent_after, stored

    denied, agent_after, stored = run(redis_server, steps)
    ok, _, buckets = denied
    assert not ok
    assert buckets[0][2] == 0 and buckets[1][2] > 0  # only the namespace bucket refused
    assert agent_after[2][0][0] == 10  # the agent bucket was not charged
    assert stored is None  # nor even created


def test_cost_above_capacity_can_never_pass(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> Any:
        return parse(await script(r, [f"{TAG}:t"], [*head("check"), *bucket(60, 100, 101)]))

    ok, _, [(_, _, retry)] = run(redis_server, steps)
    assert not ok and retry == -1


def test_force_charges_past_the_limit_and_refunds(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        key = f"{TAG}:tokens:f"
        out = [parse(await script(r, [key], [*head("force"), *bucket(60, 100, 150)]))]
        out.append(parse(await script(r, [key], [*head("check"), *bucket(60, 100, 1)])))
        out.append(parse(await script(r, [key], [*head("force"), *bucket(60, 100, -120)])))
        out.append(parse(await script(r, [key], [*head("check"), *bucket(60, 100, 1)])))
        return out

    overdrawn, blocked, refunded, admitted = run(redis_server, steps)
    assert overdrawn[0] and overdrawn[2][0][0] == 0  # reconciliation is never refused
    assert not blocked[0]
    assert refunded[2][0][0] == 70  # 150 - 120 = 30 used of 100
    assert admitted[0] and admitted[2][0][0] == 69


def test_keys_expire_once_full_again(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> tuple[int, int]:
        key = f"{TAG}:agent:e"
        await script(r, [key], [*head("check", 250), *bucket(60, 60, 1)])
        return int(await r.pttl(key)), int(await r.exists(key))

    pttl, exists = run(redis_server, steps)
    # One unit taken from a 1-per-second bucket: full again in 1 s, then 250 ms grace.
    assert exists == 1
    assert 1000 < pttl <= 1250


def test_noscript_reload_after_script_flush(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> tuple[str | None, Any]:
        await script.load(r)
        sha = script.sha
        await r.script_flush()  # as after a Redis restart
        reply = parse(await script(r, [f"{TAG}:n"], [*head("check"), *bucket(1, 5, 1)]))
        return sha, reply

    sha, reply = run(redis_server, steps)
    assert sha is not None and reply[0]


def test_script_documents_its_interface() -> None:
    text = (Path(__file__).resolve().parents[1] / "lua" / "ratelimit.lua").read_text()
    head = text.split("]]", 1)[0]
    for word in ("KEYS[i]", "ARGV[1]", "ARGV[2]", "ARGV[3]", "ARGV[4]", "Returns",
                 "Redis TIME", "hash tag", "concurrent"):
        assert word in head


def test_concurrent_slots_are_leased_and_released(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        key = f"{TAG}:inflight:a"
        out = [parse(await script(r, [key], [*head("check", lease=f"l{i}"), *slots(2)]))
               for i in range(3)]
        out.append(parse(await script(r, [key], [*head("force", lease="l0"), *slots(2, -1)])))
        out.append(parse(await script(r, [key], [*head("check", lease="l3"), *slots(2)])))
        out.append(sorted(m.decode() for m in await r.zrange(key, 0, -1)))
        return out

    first, second, third, released, fourth, members = run(redis_server, steps)
    assert [first[0], second[0], third[0]] == [True, True, False]
    assert [first[2][0][0], second[2][0][0], third[2][0][0]] == [1, 0, 0]  # free slots
    assert third[2][0][2] == SECOND_US  # full: the retry hint
    assert released[2][0][0] == 1
    assert fourth[0] and members == ["l1", "l3"]


def test_lease_of_a_dead_replica_lapses_after_its_ttl(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        key = f"{TAG}:inflight:b"
        # Two holders that never release: one lease still valid for a minute, one
        # whose TTL (0 ms) has passed by the next call, whatever the clock did.
        await script(r, [key], [*head("check", lease="alive"), *slots(2)])
        await script(r, [key], [*head("check", lease="dead", lease_ttl_ms=0), *slots(2)])
        pttl = int(await r.pttl(key))
        admitted = parse(await script(r, [key], [*head("check", lease="next"), *slots(2)]))
        refused = parse(await script(r, [key], [*head("check", lease="more"), *slots(2)]))
        return [admitted, refused, sorted(m.decode() for m in await r.zrange(key, 0, -1)),
                pttl]

    admitted, refused, members, pttl = run(redis_server, steps)
    assert admitted[0] and not refused[0]
    assert members == ["alive", "next"]
    assert 59_000 < pttl <= 61_000  # the key outlives its longest lease (+ grace)


def test_slots_and_rates_are_all_or_nothing(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> tuple[Any, int]:
        rate, inflight = f"{TAG}:r:c", f"{TAG}:inflight:c"
        await script(r, [rate], [*head("check"), *bucket(60, 1, 1)])  # rate bucket now empty
        denied = parse(await script(r, [inflight, rate],
                                    [*head("check", lease="x"), *slots(5), *bucket(60, 1, 1)]))
        return denied, int(await r.exists(inflight))

    denied, exists = run(redis_server, steps)
    assert not denied[0]
    assert denied[2][0] == (5, 0, 0)  # the slot bucket would admit, but took nothing
    assert exists == 0


def test_remaining_never_exceeds_capacity_for_tiny_refill_intervals(
        redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> Any:
        # 1e12 tokens per minute: a unit refills every 0.00006 us.
        return parse(await script(r, [f"{TAG}:huge"], [*head("check"),
                                                       *bucket(60, 10**12, 1)]))

    ok, _, [(remaining, _, _)] = run(redis_server, steps)
    assert ok and remaining <= 10**12


def test_reservation_is_granted_with_room_and_counted_in_remaining(
        redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        key = f"{TAG}:reserve:a"
        out = []
        # 100 per minute; ask for 1 + a reservation of 30 each time.
        for _ in range(4):
            out.append(await script(r, [key], [*head("check"), *bucket(60, 100, 1, reserve=30)]))
        return out

    replies = run(redis_server, steps)
    # 1+30 -> 69 left; 1+30 -> 38; 1+30 would leave 7 < 30: request only -> 37; again 36.
    assert [reserved(x) for x in replies] == [[30], [30], [0], [0]]
    assert [parse(x)[2][0][0] for x in replies] == [69, 38, 37, 36]
    assert all(parse(x)[0] for x in replies)


def test_reservation_needs_the_request_admitted_and_is_refused_in_force_mode(
        redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        full, other = f"{TAG}:reserve:full", f"{TAG}:reserve:other"
        await script(r, [full], [*head("check"), *bucket(60, 10, 10)])  # now empty
        denied = await script(r, [other, full], [*head("check"), *bucket(60, 1000, 1, reserve=50),
                                                 *bucket(60, 10, 1)])
        forced = await script(r, [other], [*head("force"), *bucket(60, 1000, 5, reserve=50)])
        return [denied, forced, await r.get(other)]

    denied, forced, stored = run(redis_server, steps)
    assert not parse(denied)[0] and reserved(denied) == [0, 0]
    assert reserved(forced) == [0]
    assert parse(forced)[2][0][0] == 995  # force charged the cost only
    assert stored is not None


def test_returned_reservation_refills_the_bucket(redis_server: RedisServer) -> None:
    async def steps(r: Redis, script: LuaScript) -> list[Any]:
        key = f"{TAG}:reserve:back"
        first = await script(r, [key], [*head("check"), *bucket(60, 100, 1, reserve=40)])
        # The replica used 5 of its 40 and gives back the other 35.
        back = await script(r, [key], [*head("force"), *bucket(60, 100, -35)])
        return [first, back]

    first, back = run(redis_server, steps)
    assert reserved(first) == [40] and parse(first)[2][0][0] == 59
    assert parse(back)[2][0][0] == 94  # 1 + 5 used
