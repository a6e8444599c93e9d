"""OTLP/HTTP span export on the event loop: pre-encoded spans, async POSTs, no thread.

Spans arrive already encoded (``otlp_encode``), so an export is a byte join
and a non-blocking POST on the sidecar's own loop; nothing ever holds the GIL
for long. Bounded: past ``max_queue`` pending spans new ones are dropped and
counted. A failed export is logged (rate-limited), recorded for /status and
dropped; export never retries into a growing backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib

import aiohttp

from proxy.telemetry.export_health import ExportRecord
from proxy.telemetry.otlp_encode import RequestEncoder

log = logging.getLogger("proxy.telemetry")

_CONTENT_TYPE = "application/x-protobuf"


class SpanShipper:
    """Batches encoded spans and POSTs them to an OTLP/HTTP traces endpoint."""

    def __init__(self, endpoint: str, encoder: RequestEncoder, record: ExportRecord, *,
                 headers: dict[str, str] | None = None, timeout_s: float = 10.0,
                 interval_s: float = 1.0, batch: int = 512, max_queue: int = 20_000,
                 gzip: bool = False) -> None:
        self.endpoint = endpoint
        self.encoder = encoder
        self.record = record
        self.headers = {"Content-Type": _CONTENT_TYPE, **(headers or {})}
        if gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.gzip = gzip
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.interval_s = interval_s
        self.batch = batch
        self.max_queue = max_queue
        self.dropped = 0
        self._pending: list[bytes] = []
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures_logged = 0

    def add(self, span: bytes) -> None:
        """Queue one encoded span (never blocks)."""
        if len(self._pending) >= self.max_queue:
            self.dropped += 1
            return
        self._pending.append(span)
        if len(self._pending) >= self.batch:
            self._wake.set()

    async def start(self) -> None:
        """Open the exporter's own connection pool and start the export loop."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=4), timeout=self.timeout,
            cookie_jar=aiohttp.DummyCookieJar())
        self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp-spans")

    async def flush(self) -> None:
        """Export everything pending now."""
        while self._pending:
            await self._export_batch()

    async def stop(self, limit_s: float) -> None:
        """Export what is pending (within ``limit_s``), then close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), limit_s)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            if self._pending:
                await self._export_batch()

    async def _export_batch(self) -> None:
        spans, self._pending = self._pending[:self.batch], self._pending[self.batch:]
        body = self.encoder.request(spans)
        if self.gzip:
            # zlib releases the GIL while it works, so a thread really runs beside the loop.
            body = await asyncio.to_thread(zlib.compress, body, 6, 31)
        ok = False
        detail = ""
        session = self._session
        if session is None:
            detail = "exporter closed"
        else:
            try:
                async with session.post(self.endpoint, data=body, headers=self.headers) as r:
                    await r.read()
                    ok = 200 <= r.status < 300
                    detail = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                detail = type(exc).__name__
        self.record.record(ok)
        if ok:
            self._failures_logged = 0
            return
        self.dropped += len(spans)
        self._failures_logged += 1
        if self._failures_logged & (self._failures_logged - 1) == 0:  # 1, 2, 4, ...
            log.warning("span export to %s failed (%s); %d spans dropped so far",
                        self.endpoint, detail, self.dropped)
