"""Prometheus scrape endpoint: the same metrics as OTLP, in text exposition format.

Names are translated the way OpenTelemetry specifies for Prometheus (and the
way the Collector's exporters and Prometheus' OTLP ingestion do), so a
dashboard query works whichever path the metrics took:

- ``.`` and other invalid characters become ``_``;
- the unit becomes a suffix (``s`` -> ``_seconds``; ``{token}``-style
  annotations are dropped);
- monotonic counters get ``_total``; histograms become ``_bucket`` / ``_sum`` /
  ``_count``; resource attributes go to ``target_info``.

A scrape renders the current cumulative snapshot; nothing runs between scrapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from opentelemetry.sdk.metrics.export import Gauge, Histogram, Metric, MetricsData, Sum

from proxy.server import SideListener
from proxy.telemetry.instruments import Instruments

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_REPEATS = re.compile(r"__+")
_UNITS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds",
          "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "min": "minutes",
          "h": "hours", "d": "days", "%": "percent"}


def sanitize(name: str) -> str:
    """A valid Prometheus metric or label name."""
    out = _REPEATS.sub("_", _INVALID.sub("_", name))
    return f"_{out}" if out[:1].isdigit() else out


def metric_name(name: str, unit: str, *, counter: bool, gauge: bool) -> str:
    """The Prometheus name of an OpenTelemetry metric (see the module docstring)."""
    base = sanitize(name)
    suffix = ""
    if unit == "1":
        suffix = "ratio" if gauge else ""
    elif unit and not unit.startswith("{"):
        suffix = sanitize(_UNITS.get(unit, unit))
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    if counter and not base.endswith("_total"):
        base += "_total"
    return base


def _escape(value: Any) -> str:
    text = value if isinstance(value, str) else (
        ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value))
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(attrs: Mapping[str, Any] | None, extra: Iterable[tuple[str, str]] = ()) -> str:
    parts = [f'{sanitize(k)}="{_escape(v)}"' for k, v in (attrs or {}).items()]
    parts += [f'{k}="{v}"' for k, v in extra]
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _render_metric(metric: Metric, lines: list[str]) -> None:
    data = metric.data
    if isinstance(data, Histogram):
        name = metric_name(metric.name, metric.unit or "", counter=False, gauge=False)
        lines.append(f"# HELP {name} {_escape(metric.description)}")
        lines.append(f"# TYPE {name} histogram")
        for p in data.data_points:
            cumulative = 0
            for bound, count in zip(p.explicit_bounds, p.bucket_counts, strict=False):
                cumulative += count
                lines.append(f"{name}_bucket{_labels(p.attributes, [('le', _num(bound))])} "
                             f"{cumulative}")
            lines.append(f"{name}_bucket{_labels(p.attributes, [('le', '+Inf')])} {p.count}")
            lines.append(f"{name}_sum{_labels(p.attributes)} {_num(p.sum)}")
            lines.append(f"{name}_count{_labels(p.attributes)} {p.count}")
        return
    if isinstance(data, Sum):
        counter = data.is_monotonic
        kind = "counter" if counter else "gauge"
    elif isinstance(data, Gauge):
        counter, kind = False, "gauge"
    else:  # exponential histograms are not used by the sidecar
        return
    name = metric_name(metric.name, metric.unit or "", counter=counter, gauge=not counter)
    lines.append(f"# HELP {name} {_escape(metric.description)}")
    lines.append(f"# TYPE {name} {kind}")
    for point in data.data_points:
        lines.append(f"{name}{_labels(point.attributes)} {_num(point.value)}")


def render(data: MetricsData) -> bytes:
    """Prometheus text exposition (format 0.0.4) of a metrics snapshot."""
    lines: list[str] = []
    for rm in data.resource_metrics:
        resource = {k: v for k, v in rm.resource.attributes.items()}
        if resource:
            lines.append("# HELP target_info Target metadata")
            lines.append("# TYPE target_info gauge")
            lines.append(f"target_info{_labels(resource)} 1")
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                _render_metric(metric, lines)
    return ("\n".join(lines) + "\n").encode()


class MetricsServer(SideListener):
    """A separate listener for ``GET /metrics``.

    The proxy listens on loopback; Prometheus scrapes the pod's address, so
    metrics get their own port and nothing else is reachable through it.
    """

    def __init__(self, instruments: Instruments, host: str, port: int) -> None:
        self.instruments = instruments
        super().__init__([web.get("/metrics", self._metrics)], host, port)

    async def start(self) -> str:
        """Listen; returns the scrape URL."""
        self.url = await super().start() + "/metrics"
        return self.url

    async def _metrics(self, request: web.Request) -> web.Response:
        # A snapshot of a few dicts: taken on the loop, so it is consistent.
        return web.Response(body=render(self.instruments.collect()),
                            headers={"Content-Type": CONTENT_TYPE})
