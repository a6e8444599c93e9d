"""Settle work (telemetry, later token reconciliation and cache stores) off the request task.

Awaiting it inside the handler would hold the client's keep-alive connection:
aiohttp reads the next request on a connection only after the handler
returns. So finished requests go into a bounded queue that one worker drains;
if the queue is full (the worker cannot keep up), the request is counted as
dropped rather than letting memory grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from proxy.context import RequestContext, Stage

log = logging.getLogger("proxy.settle")


class Settler:
    """A bounded queue of finished requests and the worker that settles them."""

    def __init__(self, hooks: Sequence[Stage], maxsize: int = 10_000) -> None:
        self.hooks = list(hooks)
        self.dropped = 0
        self._queue: asyncio.Queue[RequestContext] = asyncio.Queue(maxsize)
        self._worker: asyncio.Task[None] | None = None
        # Responses being written: a client can have its whole answer before the
        # handler resumes to submit it, so join() waits for those too.
        self._sending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        """A response starts being sent; its request will be submitted (or not) by end()."""
        self._sending += 1
        self._idle.clear()

    def end(self) -> None:
        """The response that begin() announced is sent (and its request submitted)."""
        self._sending -= 1
        if self._sending == 0:
            self._idle.set()

    def start(self) -> None:
        """Start the worker (from the app's lifecycle, on the serving loop)."""
        if self._worker is None and self.hooks:
            self._worker = asyncio.get_running_loop().create_task(self._run(),
                                                                  name="settle")

    def submit(self, ctx: RequestContext) -> None:
        """Queue a finished request; never blocks."""
        try:
            self._queue.put_nowait(ctx)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...: no log flood
                log.warning("settle queue full: %d requests not settled so far", self.dropped)

    async def join(self) -> None:
        """Wait until every request whose response was sent has been settled."""
        await self._idle.wait()
        await self._queue.join()

    async def stop(self, limit_s: float) -> None:
        """Settle what is queued (within ``limit_s``), then stop the worker."""
        if self._worker is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), limit_s)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    async def _run(self) -> None:
        queue = self._queue
        while True:
            ctx = await queue.get()
            try:
                for stage in self.hooks:
                    try:
                        await stage.on_settle(ctx)
                    except Exception:
                        log.exception("settle hook of stage %s failed", stage.name)
            finally:
                queue.task_done()
