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
  (default) or ``grpc``. OTLP/HTTP traces are exported by the loop-native
  ``SpanShipper`` (pre-encoded spans, no export thread); gRPC and console go
  through the SDK.
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

from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Sampler

from proxy import __version__
from proxy.health import Health
from proxy.telemetry.export_health import (
    ExportRecord,
    TrackedMetricExporter,
    TrackedSpanExporter,
    exports_health,
)
from proxy.telemetry.instruments import Instruments
from proxy.telemetry.metric_export import MetricExportLoop
from proxy.telemetry.otlp_encode import RequestEncoder
from proxy.telemetry.span_shipper import SpanShipper
from proxy.telemetry.tracecontext import PresetIdGenerator

log = logging.getLogger("proxy.telemetry")

_K8S_ENV = {"POD_NAMESPACE": "k8s.namespace.name", "POD_NAME": "k8s.pod.name",
            "NODE_NAME": "k8s.node.name"}


class TelemetryConfigError(ValueError):
    """An OTEL_* variable has a value the sidecar cannot use."""


@dataclass
class Providers:
    """The app's telemetry: what is exported where; any part may be off."""

    tracer_provider: TracerProvider | None  # SDK path: gRPC / console spans
    id_generator: PresetIdGenerator
    trace_exporter: str
    metric_exporter: str
    # Aggregated metrics, present when exported over OTLP or scraped.
    instruments: Instruments | None = None
    metric_loop: MetricExportLoop | None = None
    prometheus: bool = False
    exports: list[ExportRecord] = field(default_factory=list)
    # OTLP/HTTP traces go through the loop-native shipper instead of the SDK's
    # batch thread (tracer_provider is then None); sampler serves both paths.
    shipper: SpanShipper | None = None
    sampler: Sampler | None = None

    async def health(self) -> Health:
        """The telemetry component's health: which exporters, and whether exports succeed."""
        return exports_health(self.exports, {"traces": self.trace_exporter,
                                             "metrics": self.metric_exporter,
                                             "prometheus": self.prometheus})

    @property
    def tracing(self) -> bool:
        """Whether spans are exported."""
        return self.tracer_provider is not None or self.shipper is not None

    @property
    def active(self) -> bool:
        """Whether any signal is on."""
        return self.tracing or self.instruments is not None

    async def start(self) -> None:
        """Start background export that lives on the event loop."""
        if self.shipper is not None:
            await self.shipper.start()
        if self.metric_loop is not None:
            await self.metric_loop.start()

    async def flush(self, timeout_ms: int = 5000) -> None:
        """Export everything recorded so far."""
        if self.shipper is not None:
            await self.shipper.flush()
        if self.metric_loop is not None:
            await self.metric_loop.export_now()
        if self.tracer_provider is not None:
            await asyncio.to_thread(self.tracer_provider.force_flush, timeout_ms)

    async def shutdown(self, limit_s: float = 5.0) -> None:
        """Flush and stop everything, within ``limit_s`` (a dead collector cannot hang exit)."""
        try:
            async with asyncio.timeout(limit_s):
                if self.shipper is not None:
                    await self.shipper.stop(limit_s)
                if self.metric_loop is not None:
                    await self.metric_loop.stop()
                if self.tracer_provider is not None:
                    await asyncio.to_thread(self.tracer_provider.shutdown)
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
    # Only console and gRPC come here: OTLP/HTTP spans go through the SpanShipper.
    if kind == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(**_exporter_kwargs(env, "traces", "grpc"))


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


def sampler_from_env(env: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER(_ARG) as the specification defines them."""
    name = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on").strip().lower()
    raw = env.get("OTEL_TRACES_SAMPLER_ARG")
    try:
        ratio = float(raw) if raw else 1.0
    except ValueError:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG: not a number: {raw!r}") from None
    if not 0.0 <= ratio <= 1.0:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG: must be in [0, 1], got {ratio}")
    samplers: dict[str, Sampler] = {
        "always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER: unknown sampler {name!r} "
                                   f"(one of {', '.join(samplers)})")
    return samplers[name]


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TelemetryConfigError(f"{name}: not an integer: {raw!r}") from None
    if value <= 0:
        raise TelemetryConfigError(f"{name}: must be > 0, got {value}")
    return value


def _shipper(env: Mapping[str, str], resource: Resource, record: ExportRecord) -> SpanShipper:
    kwargs = _exporter_kwargs(env, "traces", "http/protobuf")
    compression = (_setting(env, "traces", "COMPRESSION") or "none").strip().lower()
    if compression not in ("none", "gzip"):
        raise TelemetryConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION: must be gzip or none, "
                                   f"got {compression!r}")
    resource_attrs = {k: v for k, v in resource.attributes.items()
                      if isinstance(v, str | bool | int | float)}
    return SpanShipper(
        kwargs["endpoint"] or "http://localhost:4318/v1/traces",
        RequestEncoder(resource_attrs, "llm-sidecar", __version__), record,
        headers=kwargs.get("headers"), timeout_s=kwargs.get("timeout", 10.0),
        interval_s=_positive_int(env, "OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000,
        batch=_positive_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        max_queue=_positive_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 20_000),
        gzip=compression == "gzip")


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
    """Telemetry for the signals the environment asks for (nothing registered globally).

    ``prometheus``: metrics are aggregated for the scrape endpoint even when
    they are not exported over OTLP.
    """
    traces, metrics = _choice(env, "traces"), _choice(env, "metrics")
    resource = build_resource(env, service_name)
    ids = PresetIdGenerator()
    records: list[ExportRecord] = []
    tracer_provider = None
    shipper = None
    sampler = sampler_from_env(env) if traces != "none" else None
    if traces == "otlp" and _protocol(env, "traces") == "http/protobuf":
        records.append(span_record := ExportRecord("traces"))
        shipper = _shipper(env, resource, span_record)
    elif traces != "none":
        tracer_provider = TracerProvider(resource=resource, id_generator=ids, sampler=sampler)
        records.append(span_record := ExportRecord("traces"))
        tracer_provider.add_span_processor(BatchSpanProcessor(
            TrackedSpanExporter(_span_exporter(env, traces), span_record)))
    instruments = None
    metric_loop = None
    if metrics != "none" or prometheus:
        instruments = Instruments(resource, __version__)
    if metrics != "none" and instruments is not None:
        records.append(metric_record := ExportRecord("metrics"))
        timeout = _exporter_kwargs(env, "metrics", _protocol(env, "metrics")).get("timeout", 10.0)
        metric_loop = MetricExportLoop(
            instruments, TrackedMetricExporter(_metric_exporter(env, metrics), metric_record),
            _positive_int(env, "OTEL_METRIC_EXPORT_INTERVAL", 60_000) / 1000, timeout)
    log.info("telemetry: traces -> %s, metrics -> %s%s", traces, metrics,
             " + prometheus scrape" if prometheus else "")
    return Providers(tracer_provider, ids, traces, metrics, instruments, metric_loop,
                     prometheus, records, shipper, sampler)
