"""Tracer and meter providers, configured by the standard ``OTEL_*`` environment.

Nothing is registered globally: the app owns its providers (several sidecars
can live in one process, as in the tests). The SDK's own exporters read the
endpoint, headers, timeout, compression and the batch settings from the
environment; this module picks the exporter per signal and the protocol.

- ``OTEL_SDK_DISABLED=true`` switches telemetry off altogether.
- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``otlp``, ``console``
  or ``none``. Unset, a signal is exported over OTLP only when an OTLP
  endpoint is configured, so a sidecar with no collector logs nothing.
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or the per-signal variant): ``http/protobuf``
  (default) or ``grpc``.
- ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER(_ARG)``,
  ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_INTERVAL`` as the specification says.
- ``POD_NAMESPACE``, ``POD_NAME``, ``NODE_NAME`` (set by the Helm chart from the
  downward API) become the ``k8s.*`` resource attributes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

from proxy import __version__
from proxy.health import Health
from proxy.telemetry.export_health import (
    ExportRecord,
    TrackedMetricExporter,
    TrackedSpanExporter,
    exports_health,
)
from proxy.telemetry.prometheus import PrometheusReader
from proxy.telemetry.tracecontext import PresetIdGenerator

log = logging.getLogger("proxy.telemetry")

_K8S_ENV = {"POD_NAMESPACE": "k8s.namespace.name", "POD_NAME": "k8s.pod.name",
            "NODE_NAME": "k8s.node.name"}


class TelemetryConfigError(ValueError):
    """An OTEL_* variable has a value the sidecar cannot use."""


@dataclass
class Providers:
    """The app's telemetry providers; either may be absent when its signal is off."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    id_generator: PresetIdGenerator
    trace_exporter: str
    metric_exporter: str
    prometheus: PrometheusReader | None = None
    exports: list[ExportRecord] = field(default_factory=list)

    async def health(self) -> Health:
        """The telemetry component's health: which exporters, and whether exports succeed."""
        return exports_health(self.exports, {"traces": self.trace_exporter,
                                             "metrics": self.metric_exporter,
                                             "prometheus": self.prometheus is not None})

    @property
    def active(self) -> bool:
        """Whether any signal is on."""
        return self.tracer_provider is not None or self.meter_provider is not None

    def force_flush(self, timeout_ms: int = 5000) -> None:
        """Export everything recorded so far (blocking: call off the event loop)."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.force_flush(timeout_ms)

    async def shutdown(self, limit_s: float = 5.0) -> None:
        """Flush and stop both providers, within ``limit_s`` (a dead collector cannot hang exit)."""
        providers = [p for p in (self.tracer_provider, self.meter_provider) if p is not None]
        try:
            await asyncio.wait_for(asyncio.gather(
                *(asyncio.to_thread(p.shutdown) for p in providers)), limit_s)
        except TimeoutError:
            log.warning("telemetry: exporters did not flush within %.1fs; dropping the rest",
                        limit_s)


def telemetry_disabled(env: Mapping[str, str]) -> bool:
    """Whether ``OTEL_SDK_DISABLED`` switches telemetry off."""
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _choice(env: Mapping[str, str], signal: str) -> str:
    name = f"OTEL_{signal.upper()}_EXPORTER"
    value = env.get(name, "").strip().lower()
    if not value:
        has_endpoint = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                            or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"))
        return "otlp" if has_endpoint else "none"
    if value not in ("otlp", "console", "none"):
        raise TelemetryConfigError(f"{name}: must be otlp, console or none, got {value!r}")
    return value


def _protocol(env: Mapping[str, str], signal: str) -> str:
    name = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    value = (env.get(name) or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
             or "http/protobuf").strip().lower()
    if value not in ("http/protobuf", "grpc"):
        raise TelemetryConfigError(
            f"{name} / OTEL_EXPORTER_OTLP_PROTOCOL: must be http/protobuf or grpc, "
            f"got {value!r}")
    return value


def _endpoint(env: Mapping[str, str], signal: str, protocol: str) -> str | None:
    # Resolved here (the exporters would read os.environ) so an app built with
    # an explicit env mapping exports where that mapping says.
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base or protocol == "grpc":
        return base or None
    return f"{base.rstrip('/')}/v1/{signal}"


def _setting(env: Mapping[str, str], signal: str, name: str) -> str | None:
    return (env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}")
            or env.get(f"OTEL_EXPORTER_OTLP_{name}") or None)


def _exporter_kwargs(env: Mapping[str, str], signal: str, protocol: str) -> dict[str, Any]:
    """Endpoint, headers and timeout from ``env`` (default: the exporter's own defaults)."""
    kwargs: dict[str, Any] = {"endpoint": _endpoint(env, signal, protocol)}
    if (headers := _setting(env, signal, "HEADERS")) is not None:
        kwargs["headers"] = {unquote(k).strip(): unquote(v).strip()
                             for k, _, v in (p.partition("=") for p in headers.split(","))
                             if k.strip()}
    if (timeout := _setting(env, signal, "TIMEOUT")) is not None:
        try:
            # The specification says milliseconds; values under 100 are read as seconds,
            # as older SDKs did, rather than as an unusably short timeout.
            value = float(timeout)
        except ValueError:
            raise TelemetryConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT: not a number: "
                                       f"{timeout!r}") from None
        kwargs["timeout"] = value if value < 100 else value / 1000
    return kwargs


def _span_exporter(env: Mapping[str, str], kind: str) -> SpanExporter:
    if kind == "console":
        return ConsoleSpanExporter()
    protocol = _protocol(env, "traces")
    kwargs = _exporter_kwargs(env, "traces", protocol)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )
        return GrpcSpanExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(**kwargs)


def _metric_exporter(env: Mapping[str, str], kind: str) -> MetricExporter:
    if kind == "console":
        return ConsoleMetricExporter()
    protocol = _protocol(env, "metrics")
    kwargs = _exporter_kwargs(env, "metrics", protocol)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )
        return GrpcMetricExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter(**kwargs)


def build_resource(env: Mapping[str, str], service_name: str) -> Resource:
    """service.*, k8s.* (downward API env) and OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME."""
    attrs: dict[str, str] = {"service.name": service_name, "service.version": __version__}
    for var, key in _K8S_ENV.items():
        if env.get(var):
            attrs[key] = env[var]
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME over these.
    return Resource.create(attrs)


def build_providers(env: Mapping[str, str], service_name: str, *,
                    prometheus: bool = False) -> Providers:
    """Providers for the signals the environment asks for (not registered globally).

    ``prometheus`` adds a reader for the scrape endpoint.
    """
    traces, metrics = _choice(env, "traces"), _choice(env, "metrics")
    resource = build_resource(env, service_name)
    ids = PresetIdGenerator()
    records: list[ExportRecord] = []
    tracer_provider = None
    if traces != "none":
        # The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (default parent-based always-on).
        tracer_provider = TracerProvider(resource=resource, id_generator=ids)
        records.append(span_record := ExportRecord("traces"))
        tracer_provider.add_span_processor(BatchSpanProcessor(
            TrackedSpanExporter(_span_exporter(env, traces), span_record)))
    scrape = PrometheusReader() if prometheus else None
    readers: list[MetricReader] = [scrape] if scrape is not None else []
    if metrics != "none":
        records.append(metric_record := ExportRecord("metrics"))
        readers.append(PeriodicExportingMetricReader(
            TrackedMetricExporter(_metric_exporter(env, metrics), metric_record)))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers) \
        if readers else None
    log.info("telemetry: traces -> %s, metrics -> %s%s", traces, metrics,
             " + prometheus scrape" if scrape else "")
    return Providers(tracer_provider, meter_provider, ids, traces, metrics, scrape, records)
