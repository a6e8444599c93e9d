"""Exporters that remember how their last exports went, for /status.

The SDK's exporters retry and log on their own; these thin wrappers only
record outcomes so a dead collector shows as a degraded ``telemetry``
component instead of only as log lines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from proxy.health import Health, State


class ExportRecord:
    """Outcomes of one signal's exports (written from the exporter's thread)."""

    def __init__(self, signal: str) -> None:
        self.signal = signal
        self.ok = 0
        self.failed = 0
        self.consecutive_failures = 0
        self.last_ok_at: float | None = None
        self.last_failure_at: float | None = None
        self._lock = threading.Lock()

    def record(self, success: bool) -> None:
        """Count one export attempt's final result."""
        with self._lock:
            if success:
                self.ok += 1
                self.consecutive_failures = 0
                self.last_ok_at = time.time()
            else:
                self.failed += 1
                self.consecutive_failures += 1
                self.last_failure_at = time.time()

    def details(self) -> dict[str, Any]:
        """Counts and times, for /status."""
        return {"exports_ok": self.ok, "exports_failed": self.failed,
                "last_ok_at": self.last_ok_at, "last_failure_at": self.last_failure_at}


def exports_health(records: list[ExportRecord], summary: dict[str, Any]) -> Health:
    """Degraded while any signal's latest exports are failing; never down (not critical)."""
    details = {**summary, **{r.signal: r.details() for r in records}}
    failing = [r.signal for r in records if r.consecutive_failures > 0]
    if failing:
        return Health(State.DEGRADED,
                      f"export of {', '.join(failing)} failing (collector unreachable?)",
                      details)
    return Health(State.OK, "", details)


class TrackedSpanExporter(SpanExporter):
    """Delegates to an exporter and records each export's result."""

    def __init__(self, inner: SpanExporter, record: ExportRecord) -> None:
        self.inner = inner
        self.record = record

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.record.record(result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class TrackedMetricExporter(MetricExporter):
    """Delegates to a metric exporter (keeping its temporality) and records results."""

    def __init__(self, inner: MetricExporter, record: ExportRecord) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner = inner
        self.record = record

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        self.record.record(result is MetricExportResult.SUCCESS)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)
