"""The mock upstream's fault table: per-model faults for retry / fallback tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from loadtest.mock_upstream import Fault, MockStats, RecordedRequest
from tests.conftest import Mock

MESSAGES = [{"role": "user", "content": "hello there"}]


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


@pytest.fixture(autouse=True)
def clean_table(mock: Mock) -> Iterator[None]:
    """The mock is shared by the whole session: never leak a fault to another test."""
    mock.server.clear_faults()
    yield
    mock.server.clear_faults()


async def _request(method: str, url: str, *, client_timeout: float = 10,
                   **kw: Any) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=client_timeout)) as s, \
            s.request(method, url, **kw) as r:
        return r.status, r.headers, await r.read()


def call(method: str, url: str, **kw: Any) -> tuple[int, Any, bytes]:
    return asyncio.run(_request(method, url, **kw))


def chat(mock: Mock, model: str, **kw: Any) -> tuple[int, Any, bytes]:
    return call("POST", f"{mock.url}/chat/completions", json=chat_body(model), **kw)


def error_of(body: bytes) -> dict[str, Any]:
    doc = orjson.loads(body)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = doc["error"]
    return err


# ------------------------------------------------------------------ outcomes


def test_500_on_one_model_while_another_answers(mock: Mock, direct: openai.OpenAI) -> None:
    mock.server.set_fault("fa-broken", Fault(status=500))
    with pytest.raises(openai.InternalServerError) as info:
        direct.chat.completions.create(model="fa-broken", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 500
    assert error_of(info.value.response.content)["type"] == "server_error"
    ok = direct.chat.completions.create(model="fa-healthy", messages=MESSAGES)  # type: ignore[arg-type]
    assert ok.model == "fa-healthy"
    assert ok.choices[0].message.content
    # Forever by default.
    assert chat(mock, "fa-broken")[0] == 500


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/completions", chat_body("fa-endpoint")),
    ("/completions", {"model": "fa-endpoint", "prompt": "hi"}),
    ("/embeddings", {"model": "fa-endpoint", "input": "hi"}),
    ("/responses", {"model": "fa-endpoint", "input": "hi"}),
])
def test_fault_applies_on_every_generation_endpoint(mock: Mock, path: str,
                                                    body: dict[str, Any]) -> None:
    mock.server.set_fault("fa-endpoint", Fault(status=502))
    status, _, raw = call("POST", f"{mock.url}{path}", json=body)
    assert status == 502
    assert error_of(raw)["type"] == "server_error"
    assert call("POST", f"{mock.url}{path}", json={**body, "model": "fa-other"})[0] == 200


def test_times_then_success(mock: Mock) -> None:
    mock.server.set_fault("fa-flaky", Fault(status=503, times=2))
    assert mock.server.faults()["fa-flaky"].times == 2
    assert chat(mock, "fa-flaky")[0] == 503
    assert mock.server.faults()["fa-flaky"].times == 1
    assert chat(mock, "fa-flaky")[0] == 503
    assert mock.server.faults() == {}  # exhausted faults leave the table
    status, _, body = chat(mock, "fa-flaky")
    assert status == 200
    assert orjson.loads(body)["model"] == "fa-flaky"


def test_429_retry_after_headers(mock: Mock) -> None:
    mock.server.set_fault("fa-limited", Fault(status=429, retry_after=2.5))
    status, headers, body = chat(mock, "fa-limited")
    assert status == 429
    assert headers["retry-after"] == "3"  # whole seconds, rounded up
    assert headers["retry-after-ms"] == "2500"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert error_of(body)["code"] == "rate_limit_exceeded"

    mock.server.set_fault("fa-limited", Fault(status=429))  # same default as x-mock-error: 429
    _, headers, _ = chat(mock, "fa-limited")
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("7", "7000")

    mock.server.set_fault("fa-limited", Fault(status=503, retry_after=1))
    status, headers, _ = chat(mock, "fa-limited")
    assert status == 503
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "1000")

    mock.server.set_fault("fa-limited", Fault(status=503))
    _, headers, _ = chat(mock, "fa-limited")
    assert "retry-after" not in headers


def test_429_seen_by_the_sdk(mock: Mock, direct: openai.OpenAI) -> None:
    mock.server.set_fault("fa-sdk-limited", Fault(status=429, retry_after=0.25))
    with pytest.raises(openai.RateLimitError) as info:
        direct.chat.completions.create(model="fa-sdk-limited", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.response.headers["retry-after-ms"] == "250"
    assert info.value.response.headers["retry-after"] == "1"


def test_disconnect_before_headers(mock: Mock, direct: openai.OpenAI) -> None:
    mock.server.set_fault("fa-gone", Fault(disconnect="before-headers", times=2))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        chat(mock, "fa-gone")
    with pytest.raises(openai.APIConnectionError):
        direct.chat.completions.create(model="fa-gone", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat(mock, "fa-gone")[0] == 200


async def _stream_lines(url: str, body: dict[str, Any]) -> tuple[int, list[bytes], bool]:
    """Read an SSE response line by line; returns (status, lines, whether it broke)."""
    lines: list[bytes] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
            s.post(url, json=body) as r:
        try:
            async for line in r.content:
                lines.append(line)
        except aiohttp.ClientPayloadError:
            return r.status, lines, True
        return r.status, lines, False


def test_disconnect_mid_stream(mock: Mock, direct: openai.OpenAI) -> None:
    mock.server.set_fault("fa-cut", Fault(disconnect="mid-stream"))
    url = f"{mock.url}/chat/completions"
    status, lines, broke = asyncio.run(_stream_lines(url, chat_body("fa-cut", stream=True)))
    assert status == 200
    data = [ln for ln in lines if ln.startswith(b"data: ")]
    assert data  # the headers and a first chunk came through...
    assert b"data: [DONE]\n" not in lines  # ...but never the end
    assert broke

    with pytest.raises(openai.APIError):  # the SDK does not take it for a complete answer
        list(direct.chat.completions.create(model="fa-cut", messages=MESSAGES,  # type: ignore[arg-type]
                                            stream=True))

    # Reference: the same request for a healthy model ends with [DONE].
    status, lines, broke = asyncio.run(_stream_lines(url, chat_body("fa-whole", stream=True)))
    assert (status, broke) == (200, False)
    assert lines[-2:] == [b"data: [DONE]\n", b"\n"]


def test_latency_fault_triggers_client_timeout(mock: Mock) -> None:
    stats = mock.server.stats
    cancelled = stats.cancelled
    mock.server.set_fault("fa-slow", Fault(latency_ms=300))
    with pytest.raises(asyncio.TimeoutError):  # aiohttp's timeouts subclass it
        chat(mock, "fa-slow", client_timeout=0.1)
    # The mock really was holding the request: the client's abort cancelled it.
    assert stats.wait_for_cancelled(cancelled + 1, 5)

    start = time.perf_counter()
    assert chat(mock, "fa-slow", client_timeout=10)[0] == 200
    assert time.perf_counter() - start >= 0.3
    assert chat(mock, "fa-fast")[0] == 200  # other models are not delayed


def test_latency_then_error(mock: Mock) -> None:
    mock.server.set_fault("fa-slow-fail", Fault(status=500, latency_ms=300, times=1))
    start = time.perf_counter()
    assert chat(mock, "fa-slow-fail")[0] == 500
    assert time.perf_counter() - start >= 0.3


def test_wildcard(mock: Mock) -> None:
    mock.server.set_fault("*", Fault(status=500))
    assert chat(mock, "fa-anything")[0] == 500
    assert call("POST", f"{mock.url}/embeddings",
                json={"model": "fa-emb", "input": "x"})[0] == 500
    # Only generation endpoints are faulted.
    assert call("GET", f"{mock.url}/models")[0] == 200

    # The exact model is looked up first...
    mock.server.set_fault("fa-exact", Fault(status=404, times=1))
    assert chat(mock, "fa-exact")[0] == 404
    # ...and once it is used up, "*" applies again.
    assert chat(mock, "fa-exact")[0] == 500

    mock.server.clear_faults()
    assert chat(mock, "fa-anything")[0] == 200


def test_header_beats_table(mock: Mock) -> None:
    server = mock.server
    server.set_fault("fa-hdr", Fault(status=500))
    status, _, body = chat(mock, "fa-hdr", headers={"x-mock-error": "404"})
    assert status == 404
    assert error_of(body)["code"] == "not_found"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        chat(mock, "fa-hdr", headers={"x-mock-disconnect": "before-headers"})

    server.set_fault("fa-hdr", Fault(status=429, retry_after=30))
    _, headers, _ = chat(mock, "fa-hdr", headers={"x-mock-error": "429"})
    assert headers["retry-after"] == "7"  # the header's own 429, not the fault's

    server.set_fault("fa-hdr", Fault(disconnect="before-headers"))
    assert chat(mock, "fa-hdr", headers={"x-mock-error": "400"})[0] == 400

    server.set_fault("fa-hdr", Fault(latency_ms=5000))
    assert chat(mock, "fa-hdr", headers={"x-mock-latency-ms": "0"}, client_timeout=2)[0] == 200


def test_fault_validation() -> None:
    for bad in (
        {"status": 200},
        {"status": 600},
        {"status": True},
        {"status": "500"},
        {"disconnect": "sometimes"},
        {"status": 500, "disconnect": "mid-stream"},
        {"latency_ms": -1},
        {"latency_ms": float("inf")},
        {"retry_after": 1},  # without a status
        {"status": 429, "retry_after": -1},
        {"times": 0},
        {"times": 1.5},
    ):
        with pytest.raises(ValueError):
            Fault(**bad)


# ------------------------------------------------------------------ HTTP control route


def test_http_control_route(mock: Mock) -> None:
    stats = mock.server.stats
    before = dict(stats.requests)
    faults_url = f"{mock.url}/mock/faults"

    status, _, body = call("POST", faults_url,
                           json={"model": "fa-http", "status": 500, "times": 2})
    assert status == 200
    assert orjson.loads(body) == {"faults": {"fa-http": {
        "status": 500, "retry_after": None, "disconnect": None, "latency_ms": None, "times": 2}}}
    assert mock.server.faults() == {"fa-http": Fault(status=500, times=2)}
    assert chat(mock, "fa-http")[0] == 500
    status, _, body = call("GET", faults_url)
    assert status == 200
    assert orjson.loads(body)["faults"]["fa-http"]["times"] == 1

    status, _, _ = call("POST", faults_url, json={"model": "*", "status": 429, "retry_after": 1})
    assert status == 200
    assert chat(mock, "fa-http-other")[1]["retry-after-ms"] == "1000"

    for bad in (
        {"status": 500},                                   # no model
        {"model": "", "status": 500},
        {"model": 3, "status": 500},
        {"model": "fa-http", "status": "500"},
        {"model": "fa-http", "status": 700},
        {"model": "fa-http", "disconnect": "later"},
        {"model": "fa-http", "times": 0},
        {"model": "fa-http", "latency_ms": "slow"},
        {"model": "fa-http", "status": 500, "colour": "red"},  # unknown field
        ["fa-http", 500],
    ):
        status, _, body = call("POST", faults_url, json=bad)
        assert status == 400, bad
        assert error_of(body)["type"] == "invalid_request_error"
    status, _, body = call("POST", faults_url, data=b"{not json")
    assert status == 400
    assert error_of(body)["type"] == "invalid_request_error"
    # Bad input left the table alone.
    assert set(mock.server.faults()) == {"fa-http", "*"}

    status, _, body = call("DELETE", faults_url)
    assert status == 200
    assert orjson.loads(body) == {"faults": {}}
    assert mock.server.faults() == {}
    assert chat(mock, "fa-http")[0] == 200

    # Only the chat calls were counted, none of the control calls.
    after = dict(stats.requests)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
        "POST /v1/chat/completions": 3}


# ------------------------------------------------------------------ per-model stats


def test_per_model_counts(mock: Mock) -> None:
    stats = mock.server.stats
    mock.server.set_fault("fa-count-a", Fault(status=500, times=1))
    before = dict(stats.models)

    assert chat(mock, "fa-count-a")[0] == 500  # faulted requests count too
    assert chat(mock, "fa-count-a")[0] == 200
    assert chat(mock, "fa-count-a")[0] == 200
    assert chat(mock, "fa-count-b")[0] == 200
    assert call("POST", f"{mock.url}/embeddings",
                json={"model": "fa-count-b", "input": "x"})[0] == 200
    assert call("GET", f"{mock.url}/models/gpt-4o")[0] == 200  # not a generation request
    assert call("POST", f"{mock.url}/chat/completions", data=b"{oops")[0] == 400  # no model

    assert stats.models["fa-count-a"] - before.get("fa-count-a", 0) == 3
    assert stats.models["fa-count-b"] - before.get("fa-count-b", 0) == 2
    assert stats.models["gpt-4o"] == before.get("gpt-4o", 0)

    status, _, body = call("GET", f"{mock.url}/mock/stats")
    assert status == 200
    doc = orjson.loads(body)
    assert set(doc) == {"requests", "cancelled", "models"}
    assert doc["models"]["fa-count-a"] == stats.models["fa-count-a"]
    assert doc["models"]["fa-count-b"] == stats.models["fa-count-b"]

    recorded = list(stats.last_requests)
    assert [r.model for r in recorded[-4:]] == ["fa-count-b", "fa-count-b", None, None]
    assert recorded[-5].model == "fa-count-a"


def test_stats_reset_clears_model_counts() -> None:
    stats = MockStats()
    stats.record(RecordedRequest("POST", "/v1/chat/completions", "", [], b"", "m"))
    stats.record(RecordedRequest("GET", "/v1/models", "", [], b""))  # model defaults to None
    assert dict(stats.models) == {"m": 1}
    stats.reset()
    assert dict(stats.models) == {}
