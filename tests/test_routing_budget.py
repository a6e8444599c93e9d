"""Spend budgets: scopes, levels, micro-USD counters in a real Redis, rollover, outages."""

from __future__ import annotations

import asyncio
import calendar
import math
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis import Redis

from proxy.config import BudgetConfig, RouteMatchConfig
from proxy.context import Identity
from proxy.health import State
from proxy.routing.budget import (
    DAY_TTL_S,
    MONTH_TTL_S,
    OK,
    BudgetBook,
    BudgetStatus,
    Scope,
)
from tests.redis_server import RedisServer

T = TypeVar("T")
PROD = Identity("prod", "t0ab12", "a1")
TIMEOUT_MS = 500.0  # generous: a loaded CI machine must not look like an outage


class Clock:
    """Wall time the test moves by hand (UTC), to cross day and month boundaries."""

    def __init__(self, year: int, month: int, day: int, hour: int = 12, minute: int = 0
                 ) -> None:
        self.now = float(calendar.timegm((year, month, day, hour, minute, 0)))

    def __call__(self) -> float:
        return self.now


def _budget(name: str, *, daily: float | None = None, monthly: float | None = None,
            per: tuple[str, ...] = ("namespace",), namespace: str = "*", agent: str = "*",
            on_hard: str = "deny", soft_share: float = 0.8) -> BudgetConfig:
    return BudgetConfig(name=name, per=per, match=RouteMatchConfig(namespace, agent),
                        daily_usd=daily, monthly_usd=monthly, on_hard=on_hard,
                        soft_share=soft_share)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _sync(server: RedisServer) -> Redis:
    return Redis.from_url(server.url)


@pytest.fixture(scope="module")
def shared_redis(module_redis: RedisServer) -> RedisServer:
    """One Redis for the module's tests that never stop it (each uses its own budget names)."""
    return module_redis


# Scopes --------------------------------------------------------------------------------


def test_scopes_follow_globs_and_per_dimensions() -> None:
    book = BudgetBook([
        _budget("prod-ns", daily=1, namespace="prod*"),
        _budget("per-agent", daily=1, per=("namespace", "agent"), agent="a*"),
        _budget("per-tenant", daily=1, per=("tenant",)),
        _budget("everyone", monthly=100, per=()),
        _budget("staging", daily=1, namespace="staging"),
        _budget("all-dims", daily=1, per=("agent", "tenant", "namespace")),
    ], None, TIMEOUT_MS)
    keys = {s.budget.name: s.key for s in book.scopes(PROD)}
    assert keys == {"prod-ns": "ns=prod", "per-agent": "ns=prod/agent=a1",
                    "per-tenant": "tenant=t0ab12", "everyone": "all",
                    # dimensions in a fixed order, whatever order `per` lists them in
                    "all-dims": "ns=prod/tenant=t0ab12/agent=a1"}

    # No agent id: only the agent glob "*" matches, and the agent reads "-".
    no_agent = {s.budget.name: s.key for s in book.scopes(Identity("prod", "t0ab12", None))}
    assert "per-agent" not in no_agent
    assert no_agent["all-dims"] == "ns=prod/tenant=t0ab12/agent=-"
    # An agent glob that does not match, and a namespace glob that does not.
    assert "per-agent" not in {s.budget.name for s in book.scopes(Identity("prod", "t", "b1"))}
    assert {s.budget.name for s in book.scopes(Identity("staging", "t", None))} == {
        "per-tenant", "everyone", "staging", "all-dims"}


def test_scope_keys_cannot_be_forged_and_share_a_hash_tag() -> None:
    book = BudgetBook([_budget("b", daily=1, per=("namespace", "agent"))], None, TIMEOUT_MS)
    (scope,) = book.scopes(Identity("prod", "t", "x/agent=y}{z"))
    assert scope.key == "ns=prod/agent=x%2Fagent%3Dy%7D%7Bz"
    assert scope.prefix == "llm-sidecar:budget:{b|ns=prod/agent=x%2Fagent%3Dy%7D%7Bz}"
    # A literal "-" agent is not the missing agent.
    (dash,) = book.scopes(Identity("prod", "t", "-"))
    (missing,) = book.scopes(Identity("prod", "t", None))
    assert dash.key == "ns=prod/agent=%2D" and missing.key == "ns=prod/agent=-"
    # Memoized per identity: the same tuple comes back.
    assert book.scopes(Identity("prod", "t", "-")) is book.scopes(Identity("prod", "t", "-"))
    assert book.scopes(Identity("dev", "t", None)) != ()
    assert isinstance(scope, Scope)


# Levels on the local backend -----------------------------------------------------------


def test_local_daily_levels_go_ok_soft_hard() -> None:
    async def go() -> list[BudgetStatus]:
        book = BudgetBook([_budget("day", daily=1.0)], None, TIMEOUT_MS)
        await book.start()
        scopes = book.scopes(PROD)
        seen = [await book.status(scopes)]
        for usd in (0.5, 0.3, 0.2):
            await book.charge(scopes, usd)
            seen.append(await book.status(scopes))
        await book.close()
        return seen

    fresh, half, soft, hard = _run(go())
    assert (fresh.level, half.level, soft.level, hard.level) == ("ok", "ok", "soft", "hard")
    assert soft == BudgetStatus("soft", "day", "day", 0.8, 1.0, "deny")
    assert hard.spent_usd == 1.0 and hard.period == "day"


def test_local_monthly_limit_counts_across_days() -> None:
    clock = Clock(2026, 3, 10)

    async def go() -> list[str]:
        book = BudgetBook([_budget("month", daily=100.0, monthly=10.0, soft_share=0.5,
                                   on_hard="cheapest")], None, TIMEOUT_MS, clock=clock)
        scopes = book.scopes(PROD)
        levels = []
        for _ in range(3):  # 4 USD a day: far from the day's limit, at the month's on day 3
            await book.charge(scopes, 4.0)
            status = await book.status(scopes)
            levels.append(f"{status.level}:{status.period}")
            clock.now += 86_400
        assert status == BudgetStatus("hard", "month", "month", 12.0, 10.0, "cheapest")
        return levels

    assert _run(go()) == ["ok:month", "soft:month", "hard:month"]


def test_the_worst_budget_decides_and_deny_beats_cheapest() -> None:
    async def go() -> tuple[BudgetStatus, BudgetStatus, BudgetStatus]:
        book = BudgetBook([_budget("wide", daily=10.0, on_hard="cheapest"),
                           _budget("narrow", daily=2.0, on_hard="cheapest", per=("agent",)),
                           _budget("strict", daily=4.0, on_hard="deny", per=("tenant",))],
                          None, TIMEOUT_MS)
        scopes = book.scopes(PROD)
        await book.charge(scopes, 1.0)
        ok = await book.status(scopes)  # all ok: the closest to its limit is named
        await book.charge(scopes, 1.0)
        cheapest = await book.status(scopes)  # narrow is hard, strict only at half
        await book.charge(scopes, 2.0)
        deny = await book.status(scopes)  # narrow and strict both hard: deny wins
        return ok, cheapest, deny

    ok, cheapest, deny = _run(go())
    assert (ok.level, ok.budget, ok.limit_usd) == ("ok", "narrow", 2.0)
    assert (cheapest.level, cheapest.budget, cheapest.on_hard) == ("hard", "narrow", "cheapest")
    assert (deny.level, deny.budget, deny.on_hard, deny.spent_usd) == ("hard", "strict",
                                                                        "deny", 4.0)


def test_no_scope_is_ok_and_bad_costs_are_ignored() -> None:
    async def go() -> BudgetStatus:
        book = BudgetBook([_budget("day", daily=1.0, namespace="other")], None, TIMEOUT_MS)
        assert book.scopes(PROD) == ()
        assert await book.status(()) is OK
        covered = BudgetBook([_budget("day", daily=1.0)], None, TIMEOUT_MS)
        scopes = covered.scopes(PROD)
        for usd in (0.0, -1.0, math.nan, math.inf, -math.inf):
            await covered.charge(scopes, usd)
        await covered.charge(scopes, 1e-9)  # below one micro-USD: counts as one
        return await covered.status(scopes)

    status = _run(go())
    assert status.level == "ok" and status.spent_usd == 1e-6


def test_local_health_and_snapshot() -> None:
    async def go() -> None:
        book = BudgetBook([_budget("day", daily=1.0, monthly=20.0)], None, TIMEOUT_MS)
        scopes = book.scopes(PROD)
        await book.charge(scopes, 0.9)
        health = await book.health()
        assert health.state is State.OK and health.details["backend"] == "local"
        snap = book.snapshot()
        assert snap["backend"] == "local"
        entry = snap["budgets"]["day"]
        assert (entry["daily_usd"], entry["monthly_usd"], entry["scopes_tracked"]) == (
            1.0, 20.0, 1)
        assert {k: entry["scopes"][0][k] for k in ("scope", "day_usd", "month_usd", "level")
                } == {"scope": "ns=prod", "day_usd": 0.9, "month_usd": 0.9, "level": "soft"}

    _run(go())


# Redis ---------------------------------------------------------------------------------


def test_replicas_sharing_redis_see_each_others_spend(shared_redis: RedisServer) -> None:
    async def go() -> list[tuple[str, str]]:
        budgets = [_budget("fleet", daily=1.0)]
        a = BudgetBook(budgets, shared_redis.url, TIMEOUT_MS)
        b = BudgetBook(budgets, shared_redis.url, TIMEOUT_MS)
        await a.start()
        await b.start()
        levels = []
        for book, usd in ((a, 0.5), (b, 0.3), (a, 0.2)):
            await book.charge(book.scopes(PROD), usd)
            levels.append(((await a.status(a.scopes(PROD))).level,
                           (await b.status(b.scopes(PROD))).level))
        assert (await b.status(b.scopes(PROD))).spent_usd == 1.0
        assert (await a.health()).state is State.OK
        await a.close()
        await b.close()
        return levels

    assert _run(go()) == [("ok", "ok"), ("soft", "soft"), ("hard", "hard")]


def test_spend_is_stored_as_integer_micro_usd(shared_redis: RedisServer) -> None:
    clock = Clock(2026, 5, 20)

    async def go() -> BudgetStatus:
        book = BudgetBook([_budget("micro", daily=1.0)], shared_redis.url, TIMEOUT_MS,
                          clock=clock)
        scopes = book.scopes(PROD)
        for _ in range(10):
            await book.charge(scopes, 0.1)
        status = await book.status(scopes)
        await book.close()
        return status

    status = _run(go())
    assert status.spent_usd == 1.0 and status.level == "hard"  # 0.1 * 10 in floats is not 1.0
    with _sync(shared_redis) as r:
        assert r.get("llm-sidecar:budget:{micro|ns=prod}:d:20260520") == b"1000000"
        assert r.get("llm-sidecar:budget:{micro|ns=prod}:m:202605") == b"1000000"


def test_keys_get_a_ttl_once(shared_redis: RedisServer) -> None:
    clock = Clock(2026, 5, 21)
    day_key = "llm-sidecar:budget:{ttl|ns=prod}:d:20260521"
    month_key = "llm-sidecar:budget:{ttl|ns=prod}:m:202605"

    async def charge() -> None:
        book = BudgetBook([_budget("ttl", daily=1.0)], shared_redis.url, TIMEOUT_MS,
                          clock=clock)
        await book.charge(book.scopes(PROD), 0.01)
        await book.close()

    _run(charge())
    with _sync(shared_redis) as r:
        assert DAY_TTL_S - 5 < r.ttl(day_key) <= DAY_TTL_S
        assert MONTH_TTL_S - 5 < r.ttl(month_key) <= MONTH_TTL_S
        r.expire(day_key, 100)
        _run(charge())
        assert r.ttl(day_key) <= 100  # EXPIRE NX: a later charge does not extend it
        assert r.get(day_key) == b"20000"


def test_day_rollover_keeps_the_month(shared_redis: RedisServer) -> None:
    clock = Clock(2026, 3, 15, 23, 59)

    async def go() -> list[BudgetStatus]:
        budgets = [_budget("roll", daily=1.0, monthly=2.0)]
        book = BudgetBook(budgets, shared_redis.url, TIMEOUT_MS, clock=clock)
        other = BudgetBook(budgets, shared_redis.url, TIMEOUT_MS, clock=clock)
        scopes = book.scopes(PROD)
        await book.charge(scopes, 0.9)
        seen = [await book.status(scopes)]
        clock.now += 120  # 2026-03-16 00:01 UTC
        seen.append(await book.status(scopes))
        seen.append(await other.status(other.scopes(PROD)))  # a replica that never saw it
        await book.charge(scopes, 0.7)
        seen.append(await other.status(other.scopes(PROD)))
        clock.now += 16 * 86_400  # 2026-04-01: both periods start over
        seen.append(await other.status(other.scopes(PROD)))
        await book.close()
        await other.close()
        return seen

    before, after, replica, month_soft, april = _run(go())
    assert (before.level, before.period, before.spent_usd) == ("soft", "day", 0.9)
    assert (after.level, after.spent_usd, after.period) == ("ok", 0.9, "month")
    assert replica == after
    assert (month_soft.level, month_soft.period, month_soft.spent_usd) == ("soft", "month", 1.6)
    assert (april.level, april.spent_usd) == ("ok", 0.0)
    with _sync(shared_redis) as r:
        assert r.get("llm-sidecar:budget:{roll|ns=prod}:d:20260315") == b"900000"
        assert r.get("llm-sidecar:budget:{roll|ns=prod}:d:20260316") == b"700000"
        assert r.get("llm-sidecar:budget:{roll|ns=prod}:m:202603") == b"1600000"


async def _recovered(book: BudgetBook, scopes: tuple[Scope, ...]) -> None:
    """Poll until the breaker's half-open trial (after breaker_reset_s) closed it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while book.breaker.state != "closed":
        assert loop.time() < deadline, "breaker never closed"
        await book.status(scopes)
        await asyncio.sleep(0.01)  # lets the monotonic reset_s run out between polls


def test_redis_down_falls_back_to_local_spend_then_recovers(redis_server: RedisServer
                                                            ) -> None:
    clock = Clock(2026, 6, 2)
    day_key = "llm-sidecar:budget:{outage|ns=prod}:d:20260602"

    async def go() -> None:
        budgets = [_budget("outage", daily=1.0)]
        a = BudgetBook(budgets, redis_server.url, TIMEOUT_MS, breaker_failures=1,
                       breaker_reset_s=0.05, clock=clock)
        b = BudgetBook(budgets, redis_server.url, TIMEOUT_MS, breaker_failures=1,
                       breaker_reset_s=0.05, clock=clock)
        await a.start()
        await b.start()
        scopes_a, scopes_b = a.scopes(PROD), b.scopes(PROD)
        await a.charge(scopes_a, 0.5)
        assert (await b.status(scopes_b)).spent_usd == 0.5  # b has now seen Redis's 0.5

        redis_server.stop()
        await b.charge(scopes_b, 0.35)  # fails: kept locally and owed to Redis
        down = await b.status(scopes_b)
        assert (down.level, down.spent_usd) == ("soft", 0.85)  # last seen 0.5 + own 0.35
        assert (await a.status(scopes_a)).spent_usd == 0.5  # a only knows its own charge
        health = await b.health()
        assert health.state is State.DEGRADED
        assert health.reason == "Redis unavailable: local spend only"
        assert health.details["breaker"] in ("open", "half-open")
        assert b.snapshot()["budgets"]["outage"]["scopes"][0]["day_usd"] == 0.85

        redis_server.start()  # the same port, empty (no persistence)
        await _recovered(b, scopes_b)
        await _recovered(a, scopes_a)
        assert (await b.health()).state is State.OK
        # Redis lost its counters; b's unsent charge still counts and reaches Redis
        # with the next charge.
        assert (await b.status(scopes_b)).spent_usd == 0.35
        await b.charge(scopes_b, 0.1)
        assert (await a.status(scopes_a)).spent_usd == 0.45
        await a.close()
        await b.close()

    _run(go())
    with _sync(redis_server) as r:
        assert r.get(day_key) == b"450000"


def test_redis_down_at_start_is_not_fatal(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # a free port nobody listens on

    async def go() -> None:
        book = BudgetBook([_budget("early", daily=1.0)], server.url, TIMEOUT_MS,
                          breaker_failures=1)
        await book.start()
        scopes = book.scopes(PROD)
        await book.charge(scopes, 0.9)
        assert (await book.status(scopes)).level == "soft"
        assert (await book.health()).state is State.DEGRADED
        await book.close()

    _run(go())


def test_unix_socket_goes_through_redis_py(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    server = RedisServer(tmp_path, extra_args=("--unixsocket", str(sock),
                                               "--unixsocketperm", "700"))
    server.start()
    clock = Clock(2026, 7, 1)

    async def go() -> BudgetStatus:
        book = BudgetBook([_budget("unix", daily=1.0)], f"unix://{sock}?db=0", TIMEOUT_MS,
                          clock=clock)
        await book.start()
        other = BudgetBook([_budget("unix", daily=1.0)], f"unix://{sock}?db=0", TIMEOUT_MS,
                           clock=clock)
        for _ in range(8):
            await book.charge(book.scopes(PROD), 0.1)
        status = await other.status(other.scopes(PROD))
        await book.close()
        await other.close()
        return status

    try:
        assert _run(go()).level == "soft"
        with _sync(server) as r:
            key = "llm-sidecar:budget:{unix|ns=prod}:d:20260701"
            assert r.get(key) == b"800000" and 0 < r.ttl(key) <= DAY_TTL_S
    finally:
        server.stop()


def test_usage_gauge_reports_the_most_spent_scope_per_period() -> None:
    async def go() -> dict[tuple[str | int, ...], float]:
        book = BudgetBook([_budget("team", daily=2.0, monthly=10.0)], None, TIMEOUT_MS)
        await book.start()
        await book.charge(book.scopes(PROD), 0.5)
        await book.charge(book.scopes(Identity("staging", "t2", None)), 1.5)
        shares = book.usage_shares()
        await book.close()
        return shares

    assert _run(go()) == {("team", "day"): 0.75, ("team", "month"): 0.15}
