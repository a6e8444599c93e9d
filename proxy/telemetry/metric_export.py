"""Periodic OTLP export of the sidecar's aggregated metrics.

The snapshot is taken on the event loop (a few dicts); the SDK exporter then
encodes and sends it in a worker thread, once per OTEL_METRIC_EXPORT_INTERVAL
(60 s by default), which keeps its GIL time rare and short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from opentelemetry.sdk.metrics.export import MetricExporter

from proxy.telemetry.instruments import Instruments

log = logging.getLogger("proxy.telemetry")


class MetricExportLoop:
    """Exports ``instruments`` through ``exporter`` every ``interval_s``."""

    def __init__(self, instruments: Instruments, exporter: MetricExporter,
                 interval_s: float, timeout_s: float = 10.0) -> None:
        self.instruments = instruments
        self.exporter = exporter
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the periodic export (on the serving loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp-metrics")

    async def export_now(self) -> None:
        """Export the current snapshot (bounded by the export timeout)."""
        data = self.instruments.collect()
        if not data.resource_metrics[0].scope_metrics[0].metrics:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(
                self.exporter.export, data, timeout_millis=self.timeout_s * 1000),
                self.timeout_s + 1)

    async def stop(self) -> None:
        """Final export, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.export_now()
        await asyncio.to_thread(self.exporter.shutdown)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.export_now()
            except Exception:
                log.exception("metric export failed")
