"""The health registry: states, readiness, and the latency budget of each check."""

from __future__ import annotations

import asyncio

from proxy.health import Health, HealthRegistry, State


def test_hung_check_is_down_within_its_budget_and_blocks_readiness() -> None:
    async def hung() -> Health:
        await asyncio.Event().wait()  # never set: a dependency that never answers
        return Health(State.OK)

    async def fine() -> Health:
        return Health(State.OK, "", {"n": 1})

    async def go() -> tuple[bool, list[str], dict[str, object]]:
        reg = HealthRegistry()
        reg.register("fine", fine, critical=True)
        reg.register("hung", hung, critical=True, budget_s=0.05)
        await asyncio.wait_for(reg.check_all(), 2.0)  # the probe itself never hangs
        ready, reasons = reg.ready()
        return ready, reasons, reg.snapshot()

    ready, reasons, snap = asyncio.run(go())
    assert not ready
    assert reasons == ["hung: check exceeded its 50 ms budget"]
    comps = snap["components"]
    assert isinstance(comps, dict)
    assert comps["hung"]["state"] == "down"
    assert comps["fine"]["details"] == {"n": 1}
    assert snap["state"] == "down"


def test_degraded_or_non_critical_components_keep_readiness() -> None:
    async def degraded() -> Health:
        return Health(State.DEGRADED, "slow")

    async def broken() -> Health:
        raise RuntimeError("boom")

    async def go() -> tuple[bool, dict[str, object]]:
        reg = HealthRegistry()
        reg.register("upstream", degraded, critical=True)
        reg.register("cache", broken, critical=False)
        await reg.check_all()
        return reg.ready()[0], reg.snapshot()

    ready, snap = asyncio.run(go())
    assert ready
    comps = snap["components"]
    assert isinstance(comps, dict)
    assert comps["cache"] == {**comps["cache"], "state": "down",
                              "reason": "check failed: RuntimeError"}
    assert comps["upstream"]["state"] == "degraded"
