"""A minimal OTLP/HTTP collector stand-in for the telemetry benchmark.

``python -m loadtest.otlp_sink --port 4318 [--host 127.0.0.1] [--no-decode]``

- ``POST /v1/traces`` and ``POST /v1/metrics`` read the (optionally gzip
  compressed) protobuf body, count exports and bytes and, unless
  ``--no-decode``, decode it with opentelemetry-proto to count spans and
  metric data points (upb makes that a few microseconds per span). The answer
  is 200 with an empty ``Export*ServiceResponse`` (``application/x-protobuf``),
  what a collector answers to a fully accepted export.
- ``GET /stats`` returns the counters as JSON, so a benchmark can prove that
  telemetry really left the process under test, and the arrival time of each
  trace export, so it can line exports up with slow requests.

Nothing is stored and nothing is logged per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import time
import zlib
from typing import Any

import orjson
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from proxy.server import loop_factory, wait_for_stop_signal

PROTOBUF = "application/x-protobuf"
_TRACE_OK = ExportTraceServiceResponse().SerializeToString()
_METRICS_OK = ExportMetricsServiceResponse().SerializeToString()
MAX_EXPORT_TIMES = 100_000
"""Arrival times kept (``time.perf_counter()``: CLOCK_MONOTONIC on Linux, so a benchmark
on the same machine can line them up with its own request times)."""
MAX_TRACE_IDS = 16
"""Distinct trace ids counted by name; later ones are counted as ``other``."""
_POINT_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")


class Stats:
    """What arrived so far."""

    def __init__(self) -> None:
        self.trace_exports = 0
        self.trace_bytes = 0
        self.spans = 0
        self.span_names: dict[str, int] = {}
        self.trace_ids: dict[str, int] = {}
        self.trace_export_at: list[float] = []
        self.metric_exports = 0
        self.metric_bytes = 0
        self.metric_points = 0
        self.metric_names: set[str] = set()
        self.bad_requests = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counters."""
        return {"trace_exports": self.trace_exports, "trace_bytes": self.trace_bytes,
                "spans": self.spans, "span_names": self.span_names,
                "trace_ids": self.trace_ids, "trace_export_at": self.trace_export_at,
                "metric_exports": self.metric_exports, "metric_bytes": self.metric_bytes,
                "metric_points": self.metric_points,
                "metric_names": sorted(self.metric_names),
                "bad_requests": self.bad_requests}


STATS = web.AppKey("stats", Stats)


def _body(raw: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return raw
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "deflate":
        return zlib.decompress(raw)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def count_spans(body: bytes, stats: Stats | None = None) -> int:
    """Spans in an ``ExportTraceServiceRequest``; tallies names and trace ids into ``stats``."""
    req = ExportTraceServiceRequest.FromString(body)
    n = 0
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            n += len(ss.spans)
            if stats is None:
                continue
            names, traces = stats.span_names, stats.trace_ids
            for span in ss.spans:
                names[span.name] = names.get(span.name, 0) + 1
                trace_id = span.trace_id.hex()
                if trace_id not in traces and len(traces) >= MAX_TRACE_IDS:
                    trace_id = "other"
                traces[trace_id] = traces.get(trace_id, 0) + 1
    return n


def count_points(body: bytes, names: set[str] | None = None) -> int:
    """Data points in an ``ExportMetricsServiceRequest``; collects metric names."""
    req = ExportMetricsServiceRequest.FromString(body)
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if names is not None:
                    names.add(metric.name)
                kind = metric.WhichOneof("data")
                if kind in _POINT_KINDS:
                    n += len(getattr(metric, kind).data_points)
    return n


def build_app(decode: bool = True) -> web.Application:
    """The sink's aiohttp application (its counters in ``app[STATS]``)."""
    stats = Stats()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = stats

    async def traces(request: web.Request) -> web.Response:
        raw = await request.read()
        if len(stats.trace_export_at) < MAX_EXPORT_TIMES:
            stats.trace_export_at.append(round(time.perf_counter(), 6))
        stats.trace_exports += 1
        stats.trace_bytes += len(raw)
        if decode:
            try:
                stats.spans += count_spans(_body(raw, request.headers.get("Content-Encoding")),
                                           stats)
            except Exception:  # a malformed export must not kill the sink
                stats.bad_requests += 1
                return web.Response(status=400, text="cannot decode the export")
        return web.Response(body=_TRACE_OK, content_type=PROTOBUF)

    async def metrics(request: web.Request) -> web.Response:
        raw = await request.read()
        stats.metric_exports += 1
        stats.metric_bytes += len(raw)
        if decode:
            try:
                stats.metric_points += count_points(
                    _body(raw, request.headers.get("Content-Encoding")), stats.metric_names)
            except Exception:
                stats.bad_requests += 1
                return web.Response(status=400, text="cannot decode the export")
        return web.Response(body=_METRICS_OK, content_type=PROTOBUF)

    async def get_stats(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(stats.as_dict()),
                            content_type="application/json")

    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    app.router.add_get("/stats", get_stats)
    return app


async def _serve_forever(host: str, port: int, decode: bool) -> None:
    runner = web.AppRunner(build_app(decode), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"otlp sink listening on http://{host}:{bound}", flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the sink until SIGINT/SIGTERM (uses uvloop when installed)."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.otlp_sink",
                                     description="Minimal OTLP/HTTP collector stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318, help="0 picks a free port")
    parser.add_argument("--no-decode", action="store_true",
                        help="count exports and bytes only (no span / data point counts)")
    args = parser.parse_args(argv)
    with (contextlib.suppress(KeyboardInterrupt),
          asyncio.Runner(loop_factory=loop_factory()) as runner):
        runner.run(_serve_forever(args.host, args.port, not args.no_decode))


if __name__ == "__main__":
    main()
