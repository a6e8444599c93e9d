"""The settle worker: runs hooks off the request task, survives failing hooks, bounded."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.context import RequestContext, Stage
from proxy.settle import Settler


class _Recorder(Stage):
    name = "recorder"

    def __init__(self, fail_on: Any = None) -> None:
        self.seen: list[Any] = []
        self.fail_on = fail_on

    async def on_settle(self, ctx: RequestContext) -> None:
        if ctx is self.fail_on:
            raise RuntimeError("hook bug")
        self.seen.append(ctx)


def test_hooks_run_in_order_and_a_failing_hook_does_not_stop_the_worker() -> None:
    bad, good = object(), object()
    first, second = _Recorder(fail_on=bad), _Recorder()

    async def go() -> None:
        settler = Settler([first, second])
        settler.start()
        settler.submit(bad)  # type: ignore[arg-type]
        settler.submit(good)  # type: ignore[arg-type]
        await settler.join()
        await settler.stop(1.0)

    asyncio.run(go())
    assert first.seen == [good]
    assert second.seen == [bad, good]


def test_full_queue_drops_and_counts_instead_of_growing() -> None:
    hook = _Recorder()

    async def go() -> Settler:
        settler = Settler([hook], maxsize=3)
        settler.start()
        for i in range(5):  # the worker has not run yet: 3 fit, 2 are dropped
            settler.submit(i)  # type: ignore[arg-type]
        await settler.join()
        await settler.stop(1.0)
        return settler

    settler = asyncio.run(go())
    assert settler.dropped == 2
    assert hook.seen == [0, 1, 2]
