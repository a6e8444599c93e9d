"""A real OTLP/HTTP receiver for tests: decodes what the sidecar's exporters send."""

from __future__ import annotations

import gzip
import threading
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def value_of(v: AnyValue) -> Any:
    """A protobuf AnyValue as a Python value."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(value_of(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    """Collects exported spans (as dicts) and metric data points, thread-safely."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.metrics: dict[str, list[Any]] = {}
        self.resources: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        return app

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        body = await request.read()
        return gzip.decompress(body) if request.headers.get("Content-Encoding") == "gzip" \
            else body

    async def _traces(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest.FromString(await self._body(request))
        with self._lock:
            for rs in req.resource_spans:
                self.resources.append({a.key: value_of(a.value)
                                       for a in rs.resource.attributes})
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        self.spans.append({
                            "name": sp.name, "kind": sp.kind,
                            "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
                            "parent_span_id": sp.parent_span_id.hex(),
                            "start": sp.start_time_unix_nano, "end": sp.end_time_unix_nano,
                            "status": sp.status.code,
                            "attributes": {a.key: value_of(a.value) for a in sp.attributes},
                        })
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        req = ExportMetricsServiceRequest.FromString(await self._body(request))
        with self._lock:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        points = list(getattr(m, kind).data_points)
                        self.metrics.setdefault(m.name, []).append((m.unit, kind, points))
        return web.Response(body=ExportMetricsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """The data points of the latest export of metric ``name``, with their attributes."""
        with self._lock:
            exports = self.metrics.get(name, [])
            if not exports:
                return []
            _, _, points = exports[-1]
        return [({a.key: value_of(a.value) for a in p.attributes}, p) for p in points]
