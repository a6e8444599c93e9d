"""Telemetry end to end: the sidecar exports OTLP/HTTP to a real receiver in the test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import openai
import orjson
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from loadtest.bench import free_port
from loadtest.mock_upstream import Fault
from proxy.app import PIPELINE, TELEMETRY
from proxy.config import (
    QuotaConfig,
    RateLimitConfig,
    RetryConfig,
    RoutePolicyConfig,
    RoutingConfig,
    RuleConfig,
    TelemetryConfig,
    UpstreamConfig,
)
from proxy.telemetry.providers import TelemetryConfigError, build_providers
from tests.conftest import LoopThread, Mock, Scripted, SidecarFactory
from tests.otlp_receiver import OtlpReceiver

AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
MESSAGES: list[Any] = [{"role": "user", "content": "hello telemetry"}]


@pytest.fixture(scope="module")
def receiver(loop_thread: LoopThread) -> Iterator[tuple[OtlpReceiver, str]]:
    rec = OtlpReceiver()
    url = loop_thread.call(rec.start())
    yield rec, url
    loop_thread.call(rec.stop())


@pytest.fixture(scope="module")
def sidecars(loop_thread: LoopThread, mock: Mock,
             receiver: tuple[OtlpReceiver, str]) -> Iterator[SidecarFactory]:
    """This module's sidecars stop before the receiver does, so their last export lands."""
    factory = SidecarFactory(loop_thread, mock)
    yield factory
    factory.close()


def _flush(sidecars: SidecarFactory, url: str) -> None:
    app = sidecars.apps[url]
    sidecars.lt.call(app[PIPELINE].settler.join())  # every finished request settled
    sidecars.lt.call(app[TELEMETRY].flush())


def _by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


@pytest.fixture(scope="module")
def traced(sidecars: SidecarFactory, receiver: tuple[OtlpReceiver, str],
           mock: Mock) -> dict[str, Any]:
    """One traced sidecar and a known workload through it; returns what was captured."""
    rec, endpoint = receiver
    url = sidecars.start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                              "POD_NAMESPACE": "agents", "POD_NAME": "agent-7"})
    out: dict[str, Any] = {"url": url}
    with openai.OpenAI(base_url=url, api_key="sk-secret-telemetry-key", max_retries=0) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, temperature=0.2, max_tokens=50,
            extra_headers={"traceparent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-01",
                           "x-agent-id": "planner-1"})
        out["plain"] = raw.parse()
        out["plain_upstream_headers"] = dict(mock.server.stats.last_requests[-1].headers)
        out["stream"] = list(c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                       stream=True))
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                      extra_headers={"x-mock-error": "500"})
        c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        c.models.list()
    _flush(sidecars, url)
    out["spans"] = list(rec.spans)
    return out


def test_request_span_continues_agent_trace_with_genai_attributes(traced: dict[str, Any]) -> None:
    plain = traced["plain"]
    [span] = [s for s in _by_name(traced["spans"], "chat gpt-4o")
              if s["trace_id"] == AGENT_TRACE]
    assert span["parent_span_id"] == AGENT_SPAN  # child of the agent's span
    assert span["kind"] == Span.SPAN_KIND_SERVER
    a = span["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.response.model"] == plain.model
    assert a["gen_ai.response.id"] == plain.id
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["gen_ai.usage.input_tokens"] == plain.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == plain.usage.completion_tokens
    assert a["server.address"] == "127.0.0.1"
    assert a["llm_sidecar.agent_id"] == "planner-1"
    assert a["llm_sidecar.namespace"] == "default"
    assert len(a["llm_sidecar.tenant"]) == 16
    assert "error.type" not in a
    assert "gen_ai.input.messages" not in a  # content is off by default
    assert span["end"] > span["start"]


def test_upstream_child_span_and_propagated_traceparent(traced: dict[str, Any]) -> None:
    [span] = [s for s in _by_name(traced["spans"], "chat gpt-4o")
              if s["trace_id"] == AGENT_TRACE]
    [child] = [s for s in traced["spans"] if s["parent_span_id"] == span["span_id"]]
    assert child["name"] == "llm_sidecar.upstream"
    assert child["kind"] == Span.SPAN_KIND_CLIENT
    assert child["attributes"]["llm_sidecar.status"] == 200
    assert span["start"] <= child["start"] <= child["end"] <= span["end"]
    sent = {k.lower(): v for k, v in traced["plain_upstream_headers"].items()}
    # The provider sees the sidecar's upstream span as its parent, same trace.
    assert sent["traceparent"] == f"00-{AGENT_TRACE}-{child['span_id']}-01"


def test_stream_span_has_usage_and_time_to_first_chunk(traced: dict[str, Any]) -> None:
    [span] = _by_name(traced["spans"], "chat gpt-4o-mini")
    a = span["attributes"]
    assert a["llm_sidecar.stream"] is True
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    # The client did not ask for usage; the sidecar still knows it.
    assert a["gen_ai.usage.output_tokens"] == len(traced["stream"]) - 2
    assert 0 < a["llm_sidecar.time_to_first_chunk_ms"] < (span["end"] - span["start"]) / 1e6
    assert span["parent_span_id"] == ""  # no agent context: a new trace


def test_telemetry_health_reports_successful_exports(traced: dict[str, Any]) -> None:
    _, _, body = asyncio.run(_get(traced["url"].removesuffix("/v1") + "/status"))
    comp = orjson.loads(body)["components"]["telemetry"]
    assert comp["state"] == "ok"
    assert comp["details"]["traces"]["exports_ok"] >= 1
    assert comp["details"]["metrics"]["exports_ok"] >= 1


def test_error_span(traced: dict[str, Any]) -> None:
    errored = [s for s in _by_name(traced["spans"], "chat gpt-4o")
               if s["attributes"].get("error.type")]
    assert len(errored) == 1
    assert errored[0]["attributes"]["error.type"] == "500"
    assert errored[0]["status"] == Status.STATUS_CODE_ERROR
    assert _by_name(traced["spans"], "embeddings text-embedding-3-small")


def test_no_secret_in_any_span(traced: dict[str, Any]) -> None:
    blob = orjson.dumps(traced["spans"], default=str)
    assert b"sk-secret-telemetry-key" not in blob
    assert b"hello telemetry" not in blob


def test_metrics_after_known_workload(traced: dict[str, Any],
                                      receiver: tuple[OtlpReceiver, str]) -> None:
    rec, _ = receiver
    tokens = rec.points("gen_ai.client.token.usage")
    by_type = {(p[0]["gen_ai.token.type"], p[0]["gen_ai.request.model"]): p[1] for p in tokens}
    plain = traced["plain"]
    assert by_type[("input", "gpt-4o")].sum == plain.usage.prompt_tokens
    assert by_type[("output", "gpt-4o")].sum == plain.usage.completion_tokens
    assert by_type[("output", "gpt-4o-mini")].count == 1
    durations = rec.points("gen_ai.client.operation.duration")
    assert sum(p.count for _, p in durations) == 4
    assert [a for a, _ in durations if a.get("error.type") == "500"]
    requests = {(a["gen_ai.operation.name"], a["http.response.status_code"]): p.as_int
                for a, p in rec.points("llm_sidecar.requests")}
    assert requests == {("chat", 200): 2, ("chat", 500): 1, ("embeddings", 200): 1}
    [(attrs, relayed)] = rec.points("llm_sidecar.passthrough.requests")
    assert attrs == {"http.request.method": "GET", "http.response.status_code": 200}
    assert relayed.as_int == 1
    [(_, ttfc)] = rec.points("llm_sidecar.time_to_first_chunk")
    assert ttfc.count == 1
    assert sum(p.count for _, p in rec.points("llm_sidecar.overhead")) == 4
    resource = rec.resources[-1]
    assert resource["service.name"] == "llm-sidecar"
    assert resource["k8s.namespace.name"] == "agents"
    assert resource["k8s.pod.name"] == "agent-7"


def test_record_content_when_enabled(sidecars: SidecarFactory,
                                     receiver: tuple[OtlpReceiver, str]) -> None:
    rec, endpoint = receiver
    url = sidecars.start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                              "OTEL_METRICS_EXPORTER": "none"},
                         telemetry=TelemetryConfig(record_content=True))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        c.chat.completions.create(model="content-model", messages=MESSAGES)
    _flush(sidecars, url)
    [span] = _by_name(rec.spans, "chat content-model")
    assert "hello telemetry" in span["attributes"]["gen_ai.input.messages"]
    assert "choices" in span["attributes"]["gen_ai.output.messages"]


def test_collector_down_costs_requests_nothing(sidecars: SidecarFactory) -> None:
    url = sidecars.start(env={"OTEL_EXPORTER_OTLP_ENDPOINT":
                              f"http://127.0.0.1:{free_port()}",
                              "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})

    async def go() -> list[int]:
        async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as c:
            rs = await asyncio.gather(*(c.chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES) for _ in range(20)))
        return [r.status_code for r in rs]

    assert asyncio.run(go()) == [200] * 20
    sidecars.lt.call(sidecars.apps[url][PIPELINE].settler.join())
    sidecars.lt.call(sidecars.apps[url][TELEMETRY].flush(300))  # fails (logged), never raises
    status, _, body = asyncio.run(_get(url.removesuffix("/v1") + "/status"))
    comp = orjson.loads(body)["components"]["telemetry"]
    assert status == 200
    assert comp["state"] == "degraded"
    assert comp["reason"].startswith("export of traces")
    assert comp["details"]["traces"]["exports_failed"] >= 1
    ready, _, _ = asyncio.run(_get(url.removesuffix("/v1") + "/readyz"))
    assert ready == 200  # telemetry is not critical: serving goes on


def test_sdk_disabled_passes_agent_traceparent_untouched(sidecars: SidecarFactory,
                                                         mock: Mock) -> None:
    url = sidecars.start(env={"OTEL_SDK_DISABLED": "true",
                              "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert TELEMETRY not in sidecars.apps[url]
    tp = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        c.chat.completions.create(model="m", messages=MESSAGES,
                                  extra_headers={"traceparent": tp})
    sent = {k.lower(): v for k, v in mock.server.stats.last_requests[-1].headers}
    assert sent["traceparent"] == tp


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: must be otlp, console or none"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
     "must be http/protobuf or grpc"),
])
def test_bad_otel_env_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(TelemetryConfigError, match=message):
        build_providers(env, "llm-sidecar")


def test_prometheus_names_follow_otel_translation() -> None:
    from proxy.telemetry.prometheus import metric_name
    assert metric_name("gen_ai.client.operation.duration", "s", counter=False,
                       gauge=False) == "gen_ai_client_operation_duration_seconds"
    assert metric_name("gen_ai.client.token.usage", "{token}", counter=False,
                       gauge=False) == "gen_ai_client_token_usage"
    assert metric_name("llm_sidecar.requests", "{request}", counter=True,
                       gauge=False) == "llm_sidecar_requests_total"
    assert metric_name("llm_sidecar.cache.ratio", "1", counter=False,
                       gauge=True) == "llm_sidecar_cache_ratio"
    assert metric_name("x.size", "By", counter=True, gauge=False) == "x_size_bytes_total"
    # A unit without a Prometheus word is kept as written (as the Collector does).
    assert metric_name("llm_sidecar.cost", "USD", counter=True,
                       gauge=False) == "llm_sidecar_cost_USD_total"
    assert metric_name("llm_sidecar.cost.saved", "USD", counter=True,
                       gauge=False) == "llm_sidecar_cost_saved_USD_total"
    assert metric_name("llm_sidecar.upstream.retries", "{attempt}", counter=True,
                       gauge=False) == "llm_sidecar_upstream_retries_total"


def test_prometheus_scrape_endpoint(sidecars: SidecarFactory) -> None:
    import re

    from proxy.app import METRICS
    url = sidecars.start(env={}, telemetry=TelemetryConfig(prometheus_port=0,
                                                           prometheus_host="127.0.0.1"))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        for _ in range(3):
            c.chat.completions.create(model="prom-model", messages=MESSAGES)
        list(c.chat.completions.create(model="prom-model", messages=MESSAGES, stream=True))
    sidecars.lt.call(sidecars.apps[url][PIPELINE].settler.join())
    scrape_url = sidecars.apps[url][METRICS].url
    assert scrape_url is not None

    status, ctype, text = asyncio.run(_get(scrape_url))
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert ('llm_sidecar_requests_total{gen_ai_operation_name="chat",'
            'http_response_status_code="200"} 4') in text
    assert re.search(r'gen_ai_client_operation_duration_seconds_count\{[^}]*'
                     r'gen_ai_request_model="prom-model"[^}]*\} 4', text)
    assert re.search(r'gen_ai_client_token_usage_bucket\{[^}]*gen_ai_token_type="output"'
                     r'[^}]*le="\+Inf"\} 4', text)
    assert 'llm_sidecar_time_to_first_chunk_seconds_count' in text
    assert "# TYPE llm_sidecar_overhead_seconds histogram" in text
    assert re.search(r'target_info\{[^}]*service_name="llm-sidecar"', text)
    # Only /metrics is on that port.
    status, _, _ = asyncio.run(_get(scrape_url.replace("/metrics", "/v1/models")))
    assert status == 404


async def _get(url: str) -> tuple[int, str, str]:
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def test_grpc_protocol_exports_through_the_sdk(loop_thread: LoopThread, mock: Mock) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list[Any] = []

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    received.extend(ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    factory = SidecarFactory(loop_thread, mock)
    try:
        url = factory.start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                 "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                 "OTEL_METRICS_EXPORTER": "none"})
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
            c.chat.completions.create(model="grpc-model", messages=MESSAGES, extra_headers={
                "traceparent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"})
        sent = {k.lower(): v for k, v in mock.server.stats.last_requests[-1].headers}
        _flush(factory, url)
    finally:
        factory.close()
        server.stop(0)
    by_name = {s.name: s for s in received}
    span, child = by_name["chat grpc-model"], by_name["llm_sidecar.upstream"]
    assert span.trace_id.hex() == AGENT_TRACE
    assert span.parent_span_id.hex() == AGENT_SPAN
    assert child.parent_span_id == span.span_id
    assert sent["traceparent"] == f"00-{AGENT_TRACE}-{child.span_id.hex()}-01"


def test_aggregated_histogram_follows_otel_bucket_rules() -> None:
    from opentelemetry.sdk.metrics.export import Histogram
    from opentelemetry.sdk.resources import Resource

    from proxy.telemetry.instruments import Instruments
    ins = Instruments(Resource.create({}), "test")
    for value in (0.0, 0.01, 0.015, 100.0):  # 0.01 is a bound: it belongs to (0, 0.01]
        ins.duration.record(value, ("chat", "openai", "m", ""))
    ins.duration.record(0.5, ("chat", "openai", "m", "timeout"))
    metrics = {m.name: m for m in ins.collect().resource_metrics[0].scope_metrics[0].metrics}
    data = metrics["gen_ai.client.operation.duration"].data
    assert isinstance(data, Histogram)
    ok, failed = data.data_points
    assert ok.attributes == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                             "gen_ai.request.model": "m"}  # no empty error.type
    assert failed.attributes is not None and failed.attributes["error.type"] == "timeout"
    assert list(ok.bucket_counts[:3]) == [2, 1, 0]
    assert ok.bucket_counts[-1] == 1  # 100 s: above the last bound
    assert (ok.count, ok.sum, ok.min, ok.max) == (4, 100.025, 0.0, 100.0)


def test_rate_limit_span_attributes_and_metrics(sidecars: SidecarFactory,
                                                receiver: tuple[OtlpReceiver, str]) -> None:
    rec, endpoint = receiver
    url = sidecars.start(
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
        ratelimit=RateLimitConfig(rules=(RuleConfig(
            name="traced-rpm", per=("agent",), requests=QuotaConfig(amount=1, period="1h")),)))
    agent = {"x-agent-id": "rl-traced"}
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        c.chat.completions.create(model="rl-model", messages=MESSAGES, extra_headers=agent)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="rl-model", messages=MESSAGES, extra_headers=agent)
    _flush(sidecars, url)
    requests = [s for s in _by_name(rec.spans, "chat rl-model")]
    outcomes = sorted(s["attributes"]["llm_sidecar.ratelimit.outcome"] for s in requests)
    assert outcomes == ["admitted", "denied"]
    [denied] = [s for s in requests if s["attributes"]["llm_sidecar.ratelimit.outcome"]
                == "denied"]
    assert denied["attributes"]["llm_sidecar.ratelimit.rule"] == "traced-rpm"
    assert denied["attributes"]["http.response.status_code"] == 429
    children = [s for s in rec.spans if s["name"] == "llm_sidecar.ratelimit"
                and s["parent_span_id"] in {r["span_id"] for r in requests}]
    assert len(children) == 2
    assert {c["attributes"]["llm_sidecar.ratelimit.backend"] for c in children} == {"local"}
    decisions = {(a["llm_sidecar.ratelimit.outcome"], a.get("llm_sidecar.ratelimit.rule")):
                 p.as_int for a, p in rec.points("llm_sidecar.ratelimit.decisions")}
    assert decisions == {("admitted", None): 1, ("denied", "traced-rpm"): 1}
    [(_, queued)] = rec.points("llm_sidecar.ratelimit.queued")
    assert queued.as_int == 0


def test_cache_span_attributes_and_metrics(sidecars: SidecarFactory,
                                           receiver: tuple[OtlpReceiver, str]) -> None:
    rec, endpoint = receiver
    url = sidecars.start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    messages: Any = [{"role": "user", "content": "traced cache question"}]
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        c.chat.completions.create(model="cache-model", messages=messages, temperature=0)
        sidecars.lt.call(sidecars.apps[url][PIPELINE].settler.join())  # stored
        c.chat.completions.create(model="cache-model", messages=messages, temperature=0)
    _flush(sidecars, url)
    requests = _by_name(rec.spans, "chat cache-model")
    results = sorted((s["attributes"]["llm_sidecar.cache.result"],
                      s["attributes"].get("llm_sidecar.cache.tier")) for s in requests)
    assert results == [("hit", "exact"), ("miss", None)]
    children = [s for s in rec.spans if s["name"] == "llm_sidecar.cache"
                and s["parent_span_id"] in {r["span_id"] for r in requests}]
    assert sorted(c["attributes"]["llm_sidecar.cache.result"] for c in children) == [
        "hit", "miss"]
    upstream = [s for s in rec.spans if s["name"] == "llm_sidecar.upstream"
                and s["parent_span_id"] in {r["span_id"] for r in requests}]
    assert len(upstream) == 1  # the hit never went upstream
    lookups = {(a["llm_sidecar.cache.result"], a.get("llm_sidecar.cache.tier") or None):
               p.as_int for a, p in rec.points("llm_sidecar.cache.lookups")}
    assert lookups == {("miss", None): 1, ("hit", "exact"): 1}
    # The miss's tokens were spent upstream; the hit's are counted as served from cache.
    spent = {a["gen_ai.token.type"]: p.count for a, p in rec.points("gen_ai.client.token.usage")
             if a["gen_ai.request.model"] == "cache-model"}
    assert spent == {"input": 1, "output": 1}
    served = {a["gen_ai.token.type"]: p.as_int for a, p in rec.points("llm_sidecar.cache.tokens")
              if a["gen_ai.request.model"] == "cache-model"}
    assert served["input"] > 0 and served["output"] > 0
    assert served["output"] == next(p.sum for a, p in rec.points("gen_ai.client.token.usage")
                                    if a["gen_ai.request.model"] == "cache-model"
                                    and a["gen_ai.token.type"] == "output")


def test_a_refused_normalized_hit_counts_as_a_miss(sidecars: SidecarFactory, scripted: Scripted,
                                                   receiver: tuple[OtlpReceiver, str]) -> None:
    rec, endpoint = receiver

    def quote_the_order(body: Any) -> Any:  # an answer that repeats the prompt's order id
        order = body["messages"][0]["content"].split()[-1]
        return {"id": "chatcmpl-q", "object": "chat.completion", "created": 1,
                "model": body["model"], "usage": {"prompt_tokens": 9, "completion_tokens": 4,
                                                  "total_tokens": 13},
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": f"Order {order} is cancelled."}}]}

    scripted.doc = quote_the_order
    url = sidecars.start(upstream=UpstreamConfig(base_url=scripted.url),
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    before = scripted.calls
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        for order in ("5f0c2d9e-8a61-4c1b-9d2e-3b7a6f1e0c44",
                      "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"):
            reply = c.chat.completions.with_raw_response.create(
                model="refuse-model", temperature=0, messages=[
                    {"role": "system", "content": f"Cancel order {order}"},
                    {"role": "user", "content": "Cancel it."}])
            sidecars.lt.call(sidecars.apps[url][PIPELINE].settler.join())
            assert reply.headers["x-sidecar-cache"] == "miss"
            assert order in reply.parse().choices[0].message.content
    _flush(sidecars, url)
    assert scripted.calls - before == 2
    lookups = {(a["llm_sidecar.cache.result"], a.get("llm_sidecar.cache.tier") or None):
               p.as_int for a, p in rec.points("llm_sidecar.cache.lookups")}
    assert lookups == {("miss", None): 2}


# ------------------------------------------------------------------ cost, routing, retries

ROUTE_POLICY = RoutePolicyConfig(name="traced-team", substitute=("gpt-4o",),
                                 tiers={"simple": ("gpt-4o-mini",),
                                        "standard": ("gpt-4o-mini",)})
SIMPLE: list[Any] = [{"role": "user", "content": "Say hello."}]
HARD: list[Any] = [{"role": "user", "content": "Think step by step and prove that there are "
                                               "infinitely many primes."}]
# Catalog prices (proxy/routing/data/catalog.yaml), USD per token: (input, output).
PRICES = {"gpt-4o": (2.50e-6, 10.00e-6), "gpt-4o-mini": (0.15e-6, 0.60e-6)}
# One agent trace per request of the workload, so each request span is found by its trace.
COST_TRACES = {name: f"c0575{i:027x}" for i, name in enumerate(
    ("routed", "no_candidate", "cache_miss", "cache_hit", "retried", "fallback"), start=1)}


def _price(model: str, usage: Any) -> float:
    per_input, per_output = PRICES[model]
    return float(usage.prompt_tokens * per_input + usage.completion_tokens * per_output)


def _sent_traceparents(mock: Mock, trace_id: str) -> list[str]:
    """The traceparent of each request the mock received in ``trace_id``, oldest first."""
    sent = [{k.lower(): v for k, v in r.headers} for r in mock.server.stats.last_requests]
    return [h["traceparent"] for h in sent if trace_id in h.get("traceparent", "")]


def _request_span(spans: list[dict[str, Any]], trace_id: str) -> dict[str, Any]:
    [span] = [s for s in spans if s["trace_id"] == trace_id and s["parent_span_id"] == AGENT_SPAN]
    return span


def _upstream_children(spans: list[dict[str, Any]], parent: dict[str, Any]
                       ) -> list[dict[str, Any]]:
    """The request's upstream attempt spans, in the order they were made."""
    return sorted((s for s in spans if s["name"] == "llm_sidecar.upstream"
                   and s["parent_span_id"] == parent["span_id"]), key=lambda s: s["start"])


@pytest.fixture(scope="module")
def costed(sidecars: SidecarFactory, receiver: tuple[OtlpReceiver, str],
           mock: Mock) -> dict[str, Any]:
    """A traced sidecar with a routing policy, retries and a fallback chain, and a known
    workload through it: a routed request, one without a cheaper candidate, a cache miss
    then hit, a request retried after a 500 and one that falls back after a 500 storm.

    Returns each answer's headers and usage, what the mock saw, the spans, and the
    metric points of the export right after the workload.
    """
    rec, endpoint = receiver
    url = sidecars.start(
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
        routing=RoutingConfig(policies=(ROUTE_POLICY,), retry=RetryConfig(
            max_retries=1, backoff_ms=1, max_backoff_ms=5,
            fallbacks={"gpt-4o": ("gpt-4o-mini",)})))
    out: dict[str, Any] = {"url": url, "headers": {}, "usage": {}, "sent": {}}
    workload: list[tuple[str, list[Any], dict[str, Any], Fault | None]] = [
        ("routed", SIMPLE, {}, None),
        ("no_candidate", HARD, {}, None),
        ("cache_miss", HARD, {"temperature": 0}, None),
        ("cache_hit", HARD, {"temperature": 0}, None),
        ("retried", HARD, {}, Fault(status=500, times=1)),
        ("fallback", HARD, {}, Fault(status=500))]
    mock.server.clear_faults()
    try:
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
            for name, messages, params, fault in workload:
                if fault is not None:
                    mock.server.set_fault("gpt-4o", fault)
                trace = COST_TRACES[name]
                raw = c.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=messages, **params,
                    extra_headers={"traceparent": f"00-{trace}-{AGENT_SPAN}-01"})
                mock.server.clear_faults()
                out["headers"][name] = dict(raw.headers)
                out["usage"][name] = raw.parse().usage
                out["sent"][name] = _sent_traceparents(mock, trace)
                # Stored in the cache (and its cost settled) before the next request.
                sidecars.lt.call(sidecars.apps[url][PIPELINE].settler.join())
    finally:
        mock.server.clear_faults()
    _flush(sidecars, url)
    out["spans"] = list(rec.spans)
    out["points"] = {name: rec.points(name) for name in (
        "llm_sidecar.cost", "llm_sidecar.cost.saved", "llm_sidecar.route.decisions",
        "llm_sidecar.upstream.retries")}
    return out


def test_cost_workload_went_as_planned(costed: dict[str, Any]) -> None:
    headers = costed["headers"]
    routed_to = {name: h["x-sidecar-model-routed"] for name, h in headers.items()
                 if "x-sidecar-model-routed" in h}
    assert routed_to == {"routed": "gpt-4o-mini", "no_candidate": "gpt-4o",
                         "cache_miss": "gpt-4o", "retried": "gpt-4o",
                         "fallback": "gpt-4o-mini"}
    assert headers["cache_miss"]["x-sidecar-cache"] == "miss"
    assert headers["cache_hit"]["x-sidecar-cache"] == "hit; tier=exact"
    assert "x-sidecar-cost-usd" not in headers["cache_hit"]  # nothing was spent upstream
    assert headers["retried"]["x-sidecar-attempts"] == "2"
    assert headers["fallback"]["x-sidecar-attempts"] == "3"
    assert {h["x-sidecar-cost-basis"] for n, h in headers.items() if n != "cache_hit"} == {
        "usage"}


def test_cost_metric_adds_up_the_cost_headers(costed: dict[str, Any]) -> None:
    spent: dict[str, float] = {}
    for h in costed["headers"].values():
        if "x-sidecar-cost-usd" in h:  # every answer that came from the upstream
            model = h["x-sidecar-model-routed"]
            spent[model] = spent.get(model, 0.0) + float(h["x-sidecar-cost-usd"])
    points = costed["points"]["llm_sidecar.cost"]
    by_model = {a["gen_ai.request.model"]: p.as_double for a, p in points}
    # By the model that answered; the headers are rounded to 1e-6 USD.
    assert by_model == {m: pytest.approx(v, abs=5e-6) for m, v in spent.items()}
    assert sum(by_model.values()) == pytest.approx(sum(spent.values()), abs=5e-6)
    assert {(a["gen_ai.operation.name"], a["gen_ai.provider.name"]) for a, _ in points} == {
        ("chat", "openai")}
    # Catalog prices of each answer's usage.
    usage = costed["usage"]
    assert by_model["gpt-4o"] == pytest.approx(
        sum(_price("gpt-4o", usage[n]) for n in ("no_candidate", "cache_miss", "retried")))
    assert by_model["gpt-4o-mini"] == pytest.approx(
        sum(_price("gpt-4o-mini", usage[n]) for n in ("routed", "fallback")))


def test_cost_saved_by_routing_and_by_cache(costed: dict[str, Any]) -> None:
    saved = {(a["gen_ai.request.model"], a["llm_sidecar.saved_by"]): p.as_double
             for a, p in costed["points"]["llm_sidecar.cost.saved"]}
    assert set(saved) == {("gpt-4o-mini", "routing"), ("gpt-4o", "cache")}
    usage = costed["usage"]
    # Routing: the routed answer's tokens at the requested model's prices, minus its cost.
    # A fallback is no saving (the policy did not choose it).
    routed = usage["routed"]
    assert saved[("gpt-4o-mini", "routing")] > 0
    assert saved[("gpt-4o-mini", "routing")] == pytest.approx(
        _price("gpt-4o", routed) - _price("gpt-4o-mini", routed))
    # Cache: what the hit's answer would have cost, i.e. what the miss did cost.
    assert saved[("gpt-4o", "cache")] > 0
    assert saved[("gpt-4o", "cache")] == pytest.approx(_price("gpt-4o", usage["cache_hit"]))
    assert saved[("gpt-4o", "cache")] == pytest.approx(
        float(costed["headers"]["cache_miss"]["x-sidecar-cost-usd"]), abs=1e-6)


def test_route_decision_and_retry_counters(costed: dict[str, Any]) -> None:
    decisions = {(a["llm_sidecar.route.reason"], a.get("llm_sidecar.route.tier")): p.as_int
                 for a, p in costed["points"]["llm_sidecar.route.decisions"]}
    # The cache hit was answered before routing: no decision.
    assert decisions == {("routed", "simple"): 1, ("no_candidate", "complex"): 4}
    retries = {a["llm_sidecar.retry.kind"]: p.as_int
               for a, p in costed["points"]["llm_sidecar.upstream.retries"]}
    # retried: one attempt more on gpt-4o. fallback: gpt-4o twice, then gpt-4o-mini; the
    # metric counts every attempt beyond the first of a request that ended on another
    # model as a fallback.
    assert retries == {"retry": 2, "fallback": 1}


def test_request_spans_carry_route_and_cost(costed: dict[str, Any]) -> None:
    spans, headers = costed["spans"], costed["headers"]
    routed = _request_span(spans, COST_TRACES["routed"])["attributes"]
    assert routed["llm_sidecar.route.reason"] == "routed"
    assert routed["llm_sidecar.route.tier"] == "simple"
    assert routed["llm_sidecar.route.candidate"] == "gpt-4o-mini"
    assert routed["llm_sidecar.cost_usd"] == pytest.approx(
        float(headers["routed"]["x-sidecar-cost-usd"]), abs=1e-6)
    assert routed["llm_sidecar.cost.saved_by"] == "routing"
    assert routed["llm_sidecar.cost.saved_usd"] > 0
    stays = _request_span(spans, COST_TRACES["no_candidate"])["attributes"]
    assert stays["llm_sidecar.route.reason"] == "no_candidate"
    assert stays["llm_sidecar.route.tier"] == "complex"
    assert stays["llm_sidecar.cost_usd"] == pytest.approx(
        float(headers["no_candidate"]["x-sidecar-cost-usd"]), abs=1e-6)
    assert "llm_sidecar.cost.saved_by" not in stays
    hit = _request_span(spans, COST_TRACES["cache_hit"])["attributes"]
    assert hit["llm_sidecar.cache.result"] == "hit"
    assert hit["llm_sidecar.cost.saved_by"] == "cache"
    assert "llm_sidecar.cost_usd" not in hit and "llm_sidecar.route.reason" not in hit
    fallback = _request_span(spans, COST_TRACES["fallback"])["attributes"]
    assert fallback["llm_sidecar.upstream.attempts"] == 3
    assert fallback["llm_sidecar.upstream.fallback_model"] == "gpt-4o-mini"
    assert fallback["llm_sidecar.cost_usd"] == pytest.approx(
        float(headers["fallback"]["x-sidecar-cost-usd"]), abs=1e-6)


@pytest.mark.parametrize(("name", "attempts"), [
    ("retried", [(500, "gpt-4o"), (200, "gpt-4o")]),
    ("fallback", [(500, "gpt-4o"), (500, "gpt-4o"), (200, "gpt-4o-mini")]),
])
def test_each_upstream_attempt_has_its_own_span(costed: dict[str, Any], name: str,
                                                attempts: list[tuple[int, str]]) -> None:
    trace = COST_TRACES[name]
    span = _request_span(costed["spans"], trace)
    children = _upstream_children(costed["spans"], span)
    assert [(c["attributes"]["llm_sidecar.status"], c["attributes"]["llm_sidecar.model"])
            for c in children] == attempts
    assert [c["attributes"]["llm_sidecar.attempt"] for c in children] == list(
        range(1, len(attempts) + 1))
    assert len({c["span_id"] for c in children}) == len(attempts)  # distinct span ids
    assert all(c["trace_id"] == trace and c["kind"] == Span.SPAN_KIND_CLIENT
               for c in children)
    assert all(a["end"] <= b["start"] for a, b in pairwise(children))
    assert span["start"] <= children[0]["start"] and children[-1]["end"] <= span["end"]
    sent = costed["sent"][name]
    assert len(sent) == len(attempts)  # every attempt reached the mock, in this trace
    # The attempt whose answer the client got is the parent the provider saw last.
    assert sent[-1] == f"00-{trace}-{children[-1]['span_id']}-01"
