"""Routing, budgets, retries and fallbacks end to end: the openai SDK through real sidecars."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from loadtest.mock_upstream import Fault
from proxy.config import (
    BudgetConfig,
    ModelConfig,
    RetryConfig,
    RoutePolicyConfig,
    RoutingConfig,
    UpstreamConfig,
)
from tests.conftest import Mock, SidecarFactory, UpstreamCalls, sdk, settled
from tests.redis_server import RedisServer

POLICY = RoutePolicyConfig(name="team", substitute=("gpt-4o",),
                           tiers={"simple": ("gpt-4o-mini",), "standard": ("gpt-4o-mini",)})
NO_RETRY = RetryConfig(max_retries=0)
SIMPLE = [{"role": "user", "content": "Say hello."}]
HARD = [{"role": "user", "content": "Think step by step and prove that there are "
                                    "infinitely many primes."}]


@pytest.fixture
def faults(mock: Mock) -> Iterator[Mock]:
    """The shared mock, with its fault table cleared after the test."""
    mock.server.clear_faults()
    yield mock
    mock.server.clear_faults()


def _chat(client: openai.OpenAI, messages: list[Any], model: str = "gpt-4o",
          **kw: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model=model, messages=messages,
                                                            **kw)


def _models(mock: Mock) -> dict[str, int]:
    return dict(mock.server.stats.models)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {m: n - before.get(m, 0) for m, n in after.items() if n != before.get(m, 0)}


# ------------------------------------------------------------------ routing


@pytest.fixture(scope="module")
def routed(sidecars: SidecarFactory) -> str:
    return sidecars.start(routing=RoutingConfig(policies=(POLICY,), retry=NO_RETRY))


def test_simple_request_is_routed_and_announced(routed: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(routed) as client:
        raw = _chat(client, SIMPLE)
    answer = raw.parse()
    assert upstream.last_body()["model"] == "gpt-4o-mini"
    assert raw.headers["x-sidecar-model-requested"] == "gpt-4o"
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o-mini"
    # The body keeps the model the upstream really used.
    assert answer.model.startswith("gpt-4o-mini")
    assert raw.headers["x-sidecar-cost-basis"] == "usage"
    usage = answer.usage
    expected = (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.60) / 1e6
    assert float(raw.headers["x-sidecar-cost-usd"]) == pytest.approx(expected, abs=1e-6)


def test_complex_request_keeps_the_requested_model(routed: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(routed) as client:
        raw = _chat(client, HARD)
    assert upstream.last_body()["model"] == "gpt-4o"
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o"


def test_route_off_header_disables_rewriting(routed: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(routed) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=SIMPLE, extra_headers={"x-sidecar-route": "off"})
    assert upstream.last_body()["model"] == "gpt-4o"
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o"


def test_tier_header_forces_a_tier(routed: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(routed) as client:
        client.chat.completions.create(model="gpt-4o", messages=SIMPLE,
                                       extra_headers={"x-sidecar-tier": "complex"})
    assert upstream.last_body()["model"] == "gpt-4o"


def test_streamed_answer_carries_the_estimated_cost(routed: str, mock: Mock) -> None:
    with sdk(routed) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o",
                                                               messages=SIMPLE, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse()
                       if chunk.choices)
    assert text
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o-mini"
    assert raw.headers["x-sidecar-cost-basis"] == "estimate"
    assert float(raw.headers["x-sidecar-cost-usd"]) > 0


def test_dry_run_decides_but_sends_the_requested_model(sidecars: SidecarFactory,
                                                       mock: Mock) -> None:
    url = sidecars.start(routing=RoutingConfig(policies=(POLICY,), mode="dry_run",
                                               retry=NO_RETRY))
    upstream = UpstreamCalls(mock)
    with sdk(url) as client:
        raw = _chat(client, SIMPLE)
    assert upstream.last_body()["model"] == "gpt-4o"
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o"


def test_without_a_policy_nothing_is_rewritten_but_cost_is_reported(sidecar: str,
                                                                     mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(sidecar) as client:
        raw = _chat(client, SIMPLE)
    assert upstream.last_body()["model"] == "gpt-4o"
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o"
    assert float(raw.headers["x-sidecar-cost-usd"]) > 0


# ------------------------------------------------------------------ retries and fallbacks


@pytest.fixture(scope="module")
def resilient(sidecars: SidecarFactory) -> str:
    return sidecars.start(
        upstream=UpstreamConfig(base_url=sidecars.mock.url, read_timeout_s=0.5,
                                stream_idle_timeout_s=0.5),
        routing=RoutingConfig(retry=RetryConfig(
            max_retries=1, backoff_ms=1, max_backoff_ms=5, max_retry_after_s=1,
            fallbacks={"gpt-4o": ("gpt-4o-mini",)})))


def test_500_storm_retries_then_falls_back(resilient: str, faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(status=500))
    before = _models(faults)
    with sdk(resilient) as client:
        raw = _chat(client, HARD)
    assert raw.http_response.status_code == 200
    assert _delta(before, _models(faults)) == {"gpt-4o": 2, "gpt-4o-mini": 1}
    assert raw.headers["x-sidecar-attempts"] == "3"
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o-mini"
    assert raw.parse().model.startswith("gpt-4o-mini")


def test_429_with_retry_after_is_retried_on_the_same_model(resilient: str,
                                                           faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(status=429, retry_after=0.05, times=1))
    before = _models(faults)
    with sdk(resilient) as client:
        raw = _chat(client, HARD)
    assert _delta(before, _models(faults)) == {"gpt-4o": 2}
    assert raw.headers["x-sidecar-attempts"] == "2"
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o"


def test_429_asking_too_long_goes_straight_to_the_fallback(resilient: str,
                                                           faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(status=429, retry_after=30))
    before = _models(faults)
    with sdk(resilient) as client:
        raw = _chat(client, HARD)
    assert _delta(before, _models(faults)) == {"gpt-4o": 1, "gpt-4o-mini": 1}
    assert raw.headers["x-sidecar-attempts"] == "2"


def test_client_errors_are_never_retried(resilient: str, faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(status=400))
    before = _models(faults)
    with sdk(resilient) as client, pytest.raises(openai.BadRequestError):
        _chat(client, HARD)
    assert _delta(before, _models(faults)) == {"gpt-4o": 1}


def test_everything_failing_returns_the_last_answer_once(resilient: str,
                                                         faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(status=503))
    faults.server.set_fault("gpt-4o-mini", Fault(status=502))
    before = _models(faults)
    with sdk(resilient) as client, pytest.raises(openai.InternalServerError) as err:
        _chat(client, HARD)
    assert err.value.status_code == 502
    assert _delta(before, _models(faults)) == {"gpt-4o": 2, "gpt-4o-mini": 1}


def test_timeout_falls_back(resilient: str, faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(latency_ms=3000))
    with sdk(resilient) as client:
        raw = _chat(client, HARD)
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o-mini"
    assert raw.headers["x-sidecar-attempts"] == "3"


def test_disconnect_before_first_byte_is_retried(resilient: str, faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(disconnect="before-headers", times=1))
    before = _models(faults)
    with sdk(resilient) as client:
        stream = client.chat.completions.create(model="gpt-4o", messages=HARD, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert _delta(before, _models(faults)) == {"gpt-4o": 2}


def test_a_stream_cut_mid_way_is_never_replayed(resilient: str, faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(disconnect="mid-stream"))
    before = _models(faults)
    with sdk(resilient) as client, pytest.raises(openai.APIError):
        stream = client.chat.completions.create(model="gpt-4o", messages=HARD, stream=True)
        for _ in stream:
            pass
    assert _delta(before, _models(faults)) == {"gpt-4o": 1}


def test_fallback_to_another_upstream_uses_its_own_key(sidecars: SidecarFactory,
                                                       faults: Mock) -> None:
    url = sidecars.start(
        upstreams={"second": UpstreamConfig(base_url=sidecars.mock.url,
                                            api_key="sk-second-upstream")},
        routing=RoutingConfig(
            catalog={"local-llama": ModelConfig(
                upstream="second", input_per_1m=0, output_per_1m=0, context_window=32000,
                max_output=4096, capabilities=("tools", "sampling"))},
            retry=RetryConfig(max_retries=0, fallbacks={"gpt-4o": ("local-llama",)})))
    faults.server.set_fault("gpt-4o", Fault(status=500))
    with sdk(url, key="sk-agent-secret") as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=HARD,
            extra_headers={"OpenAI-Organization": "org-agent"})
    assert raw.headers["x-sidecar-model-routed"] == "local-llama"
    last = faults.server.stats.last_requests[-1]
    headers = {k.lower(): v for k, v in last.headers}
    assert last.model == "local-llama"
    assert headers["authorization"] == "Bearer sk-second-upstream"
    assert "openai-organization" not in headers
    assert all("sk-agent-secret" not in v for v in headers.values())
    # Free model: the answer cost nothing.
    assert float(raw.headers["x-sidecar-cost-usd"]) == 0


# ------------------------------------------------------------------ budgets


def _budget_routing(redis_url: str | None, **budget: Any) -> RoutingConfig:
    budget.setdefault("name", "team-daily")
    return RoutingConfig(policies=(POLICY,), retry=NO_RETRY, redis_url=redis_url,
                         budgets=(BudgetConfig(**budget),))


def test_hard_budget_is_shared_by_two_sidecars(sidecars: SidecarFactory,
                                               redis_server: RedisServer, mock: Mock) -> None:
    routing = _budget_routing(redis_server.url, daily_usd=0.0005, soft_share=0.99)
    first, second = sidecars.start(routing=routing), sidecars.start(routing=routing)
    spent = 0.0
    with sdk(first) as client:
        while spent < 0.0005:
            raw = _chat(client, HARD)  # complex: stays on gpt-4o
            spent += float(raw.headers["x-sidecar-cost-usd"])
            settled(sidecars, first)
    upstream = UpstreamCalls(mock)
    with sdk(second) as client, pytest.raises(openai.RateLimitError) as err:
        _chat(client, HARD)
    assert upstream.calls == 0
    assert err.value.code == "budget_exceeded"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "team-daily" in err.value.message
    status = orjson.loads(_get(second.removesuffix("/v1") + "/status"))
    budgets = status["components"]["router"]["details"]["budgets"]
    assert budgets, status["components"]["router"]


def test_soft_budget_routes_one_tier_down(sidecars: SidecarFactory,
                                          redis_server: RedisServer) -> None:
    routing = _budget_routing(redis_server.url, daily_usd=0.001, soft_share=0.1)
    url = sidecars.start(routing=routing)
    with sdk(url) as client:
        first = _chat(client, HARD)
        settled(sidecars, url)
        # Past the soft share, a complex request is treated as standard: routed down.
        second = _chat(client, HARD)
    assert first.headers["x-sidecar-model-routed"] == "gpt-4o"
    assert float(first.headers["x-sidecar-cost-usd"]) > 0.0001
    assert second.headers["x-sidecar-model-routed"] == "gpt-4o-mini"


def test_hard_budget_with_cheapest_keeps_serving_the_cheapest_model(
        sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(routing=_budget_routing(None, daily_usd=0.0002, on_hard="cheapest"))
    upstream = UpstreamCalls(mock)
    with sdk(url) as client:
        for _ in range(3):
            _chat(client, HARD)
            settled(sidecars, url)
        raw = _chat(client, HARD)
    assert raw.headers["x-sidecar-model-routed"] == "gpt-4o-mini"
    assert upstream.last_body()["model"] == "gpt-4o-mini"


def _get(url: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
    return body


def test_a_fallback_answer_is_not_cached(sidecars: SidecarFactory, faults: Mock) -> None:
    url = sidecars.start(routing=RoutingConfig(retry=RetryConfig(
        max_retries=0, fallbacks={"gpt-4o": ("gpt-4o-mini",)})))
    faults.server.set_fault("gpt-4o", Fault(status=500, times=1))
    with sdk(url) as client:
        first = _chat(client, HARD, temperature=0)
        settled(sidecars, url)
        second = _chat(client, HARD, temperature=0)
    assert first.headers["x-sidecar-model-routed"] == "gpt-4o-mini"
    assert second.headers["x-sidecar-cache"] == "miss"
    assert second.headers["x-sidecar-model-routed"] == "gpt-4o"


def test_model_names_are_made_safe_for_headers(sidecar: str) -> None:
    import urllib.request
    body = orjson.dumps({"model": "gpt-4o\r\nx-evil: 1", "messages": SIMPLE})
    request = urllib.request.Request(sidecar + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["x-evil"] is None
        assert resp.headers["x-sidecar-model-requested"] == "gpt-4o%0D%0Ax-evil: 1"


def test_attempts_are_announced_when_every_connection_fails(resilient: str,
                                                             faults: Mock) -> None:
    faults.server.set_fault("gpt-4o", Fault(disconnect="before-headers"))
    faults.server.set_fault("gpt-4o-mini", Fault(disconnect="before-headers"))
    with sdk(resilient) as client, pytest.raises(openai.InternalServerError) as err:
        _chat(client, HARD)
    headers = err.value.response.headers
    assert err.value.status_code == 502
    assert headers["x-sidecar-attempts"] == "3"
    assert headers["x-sidecar-model-routed"] == "gpt-4o-mini"
