"""Rate limits end to end: the openai SDK through sidecars, local buckets and a real Redis."""

from __future__ import annotations

import threading
import time
from typing import Any

import openai
import orjson
import pytest

from proxy.app import PIPELINE
from proxy.config import QuotaConfig, RateLimitConfig, RuleConfig
from proxy.ratelimit.limiter import Limiter
from proxy.ratelimit.stage import LimitStage
from tests.conftest import Mock, SidecarFactory
from tests.redis_server import RedisServer

MESSAGES: list[Any] = [{"role": "user", "content": "limit me"}]


def _seconds(duration: str) -> float:
    import re
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", duration)
    assert parts is not None, duration
    h, m, sec = parts.groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(sec or 0)


def _rules(*rules: RuleConfig, **kw: Any) -> RateLimitConfig:
    return RateLimitConfig(rules=rules, **kw)


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, **kw)


def _limiter(sidecars: SidecarFactory, url: str) -> Limiter:
    [limiter] = [s.limiter for s in sidecars.apps[url][PIPELINE].stages
                 if isinstance(s, LimitStage)]
    return limiter


def _settled(sidecars: SidecarFactory, url: str) -> None:
    """Every finished request settled, and its corrections sent to the buckets."""
    sidecars.lt.call(sidecars.apps[url][PIPELINE].settler.join())
    sidecars.lt.call(_limiter(sidecars, url).drain())


def test_local_limit_headers_and_openai_style_429(sidecars: SidecarFactory) -> None:
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="agent-rpm", per=("agent",), requests=QuotaConfig(amount=3, period="1m"))))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        hdrs = {"x-agent-id": "planner"}
        seen = [_chat(c, extra_headers=hdrs).headers for _ in range(3)]
        assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
        assert all(h["x-ratelimit-limit-requests"] == "3" for h in seen)
        # Reset = time until the bucket is full again, in OpenAI's duration format.
        resets = [_seconds(h["x-ratelimit-reset-requests"]) for h in seen]
        assert resets == pytest.approx([20, 40, 60], abs=0.1)
        with pytest.raises(openai.RateLimitError) as info:
            _chat(c, extra_headers=hdrs)
        err = info.value
        assert err.code == "rate_limit_exceeded"
        assert "agent-rpm" in err.message and "3 requests per 1m0s" in err.message
        assert 1 <= int(err.response.headers["retry-after"]) <= 20
        assert int(err.response.headers["retry-after-ms"]) > 19_000
        # Another agent has its own bucket.
        assert _chat(c, extra_headers={"x-agent-id": "coder"}).headers[
            "x-ratelimit-remaining-requests"] == "2"


def test_request_larger_than_capacity_says_waiting_will_not_help(
        sidecars: SidecarFactory) -> None:
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="tpm", tokens=QuotaConfig(amount=500, period="1m"))))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=2) as c, \
            pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4000)
    assert info.value.response.headers["x-should-retry"] == "false"  # the SDK did not retry
    assert "Waiting will not help" in info.value.message


def test_sdk_backs_off_and_retries_our_429(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="one-per-second", requests=QuotaConfig(amount=1, period="1s"))))
    key = "POST /v1/chat/completions"
    with openai.OpenAI(base_url=url, api_key="k", max_retries=3) as c:
        before = mock.server.stats.requests[key]
        started = time.monotonic()
        c.chat.completions.create(model="m", messages=MESSAGES)
        c.chat.completions.create(model="m", messages=MESSAGES)  # 429 first, then admitted
        elapsed = time.monotonic() - started
    assert mock.server.stats.requests[key] - before == 2  # the denied try never went upstream
    assert elapsed >= 0.5  # the SDK honoured retry-after / retry-after-ms


def test_token_estimate_is_reconciled_with_real_usage(sidecars: SidecarFactory) -> None:
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="tpm", tokens=QuotaConfig(amount=100_000, period="1h"))))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        first = _chat(c, max_tokens=5000)
        after_estimate = int(first.headers["x-ratelimit-remaining-tokens"])
        used = first.parse().usage.total_tokens
        _settled(sidecars, url)
        second = _chat(c, max_tokens=1)
        after_second = int(second.headers["x-ratelimit-remaining-tokens"])
        _settled(sidecars, url)
        stream = c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                           max_tokens=3000)
        list(stream)
        _settled(sidecars, url)
        third = _chat(c, max_tokens=1)
    assert after_estimate <= 100_000 - 5000  # charged up front, estimate included output
    # The 5000-token estimate was corrected to the real usage once the answer was known.
    estimate_second = 100_000 - used - after_second
    assert 0 < estimate_second < 100  # only the second request's small estimate is pending
    # Streaming reconciles too (the sidecar asked upstream for the usage chunk).
    third_remaining = int(third.headers["x-ratelimit-remaining-tokens"])
    assert third_remaining > after_second - 3000


def test_limit_holds_across_replicas_sharing_redis(sidecars: SidecarFactory,
                                                   redis_server: RedisServer) -> None:
    limits = _rules(RuleConfig(name="fleet", requests=QuotaConfig(amount=5, period="1h")),
                    redis_url=redis_server.url, timeout_ms=200)
    urls = [sidecars.start(ratelimit=limits) for _ in range(2)]
    admitted = denied = 0
    clients = [openai.OpenAI(base_url=u, api_key="k", max_retries=0) for u in urls]
    try:
        for i in range(8):
            try:
                clients[i % 2].chat.completions.create(model="m", messages=MESSAGES)
                admitted += 1
            except openai.RateLimitError:
                denied += 1
    finally:
        for c in clients:
            c.close()
    assert (admitted, denied) == (5, 3)


def test_local_buckets_alone_let_each_replica_admit_the_full_limit(
        sidecars: SidecarFactory) -> None:
    # The problem Redis solves: without it, N replicas admit N times the limit.
    limits = _rules(RuleConfig(name="fleet", requests=QuotaConfig(amount=5, period="1h")))
    urls = [sidecars.start(ratelimit=limits) for _ in range(2)]
    admitted = 0
    for i in range(10):
        with openai.OpenAI(base_url=urls[i % 2], api_key="k", max_retries=0) as c:
            try:
                c.chat.completions.create(model="m", messages=MESSAGES)
                admitted += 1
            except openai.RateLimitError:
                pass
    assert admitted == 10


@pytest.mark.parametrize("stream", [False, True])
def test_estimate_too_low_is_charged_up_to_the_real_usage(sidecars: SidecarFactory,
                                                          stream: bool) -> None:
    # No max_tokens and a default of 1 output token: the estimate is far below what
    # the answer (400 completion tokens) really uses; reconciliation charges the rest.
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="tpm", tokens=QuotaConfig(amount=100_000, period="1h")), default_max_tokens=1))
    long = {"x-mock-tokens": "400"}
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        if stream:
            chunks = list(c.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=long))
            assert not any(ch.usage for ch in chunks)  # the client asked for no usage...
            first_remaining = None
        else:
            first = _chat(c, extra_headers=long)
            first_remaining = int(first.headers["x-ratelimit-remaining-tokens"])
        _settled(sidecars, url)
        probe = _chat(c, max_tokens=1)
        probe_used = probe.parse().usage.total_tokens
        _settled(sidecars, url)
        after = _chat(c, max_tokens=1)
    estimate = 100_000 - int(probe.headers["x-ratelimit-remaining-tokens"])
    if first_remaining is not None:
        assert 100_000 - first_remaining < 100  # charged only the small estimate up front
    # ...yet the sidecar reconciled with the usage it requested upstream: the first
    # answer's 400+ tokens are charged, not the estimate.
    assert estimate > 400
    charged_after_probe = 100_000 - int(after.headers["x-ratelimit-remaining-tokens"])
    assert charged_after_probe - estimate < probe_used + 100


def _get(url: str) -> dict[str, Any]:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as r:
        doc: dict[str, Any] = orjson.loads(r.read())
    return doc


def _status(url: str) -> dict[str, Any]:
    return _get(url.removesuffix("/v1") + "/status")


def test_redis_down_falls_back_then_recovers(sidecars: SidecarFactory,
                                             redis_server: RedisServer) -> None:
    limits = _rules(RuleConfig(name="fleet", requests=QuotaConfig(amount=100, period="1h")),
                    redis_url=redis_server.url, timeout_ms=100, breaker_failures=2,
                    breaker_reset_s=0.3, local_share=0.05)
    url = sidecars.start(ratelimit=limits)
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        ok = _chat(c)
        assert ok.headers["x-ratelimit-remaining-requests"] == "99"  # from Redis
        redis_server.stop()
        # Requests keep flowing on the local share (5 of 100) while Redis is away.
        statuses = []
        for _ in range(7):
            try:
                _chat(c)
                statuses.append(200)
            except openai.RateLimitError:
                statuses.append(429)
        assert statuses == [200] * 5 + [429] * 2
        status = _status(url)
        comp = status["components"]["ratelimit"]
        assert comp["state"] == "degraded" and comp["details"]["breaker"] in ("open",
                                                                              "half-open")
        assert status["components"]["process"]["state"] == "ok"  # still serving
        ready = _get(url.removesuffix("/v1") + "/readyz")
        assert ready["status"] == "degraded" and "ratelimit" in ready["degraded"]
        redis_server.start()  # same port: shared limits resume
        time.sleep(0.35)  # the breaker's own reset period elapsing (behaviour under test)
        back = _chat(c)
        assert back.headers["x-ratelimit-remaining-requests"] == "99"  # Redis restarted empty
        assert _status(url)["components"]["ratelimit"]["details"]["breaker"] == "closed"
        assert _get(url.removesuffix("/v1") + "/readyz") == {"status": "ready"}


def test_use_admitted_on_the_fallback_is_charged_to_redis_when_it_returns(
        sidecars: SidecarFactory, redis_server: RedisServer) -> None:
    limits = _rules(RuleConfig(name="fleet", requests=QuotaConfig(amount=10, period="1h")),
                    redis_url=redis_server.url, timeout_ms=100, breaker_failures=1,
                    breaker_reset_s=0.3, local_share=1.0)
    url = sidecars.start(ratelimit=limits)
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        redis_server.stop()
        for _ in range(3):  # admitted by this replica alone; Redis knows nothing of them
            _chat(c)
        details = _status(url)["components"]["ratelimit"]["details"]
        assert details["decisions"]["local"] == 3 and details["owed_buckets"] == 1
        redis_server.start()  # restarted empty
        time.sleep(0.35)  # the breaker's own reset period elapsing (behaviour under test)
        first = _chat(c)
        _settled(sidecars, url)  # includes the repayment
        second = _chat(c)
    assert first.headers["x-ratelimit-remaining-requests"] == "9"
    # The 3 fallback admissions now count in the shared bucket: 10 - 1 - 3 - 1.
    assert second.headers["x-ratelimit-remaining-requests"] == "5"
    assert _status(url)["components"]["ratelimit"]["details"]["owed_buckets"] == 0


def test_fail_closed_rule_denies_while_redis_is_down(sidecars: SidecarFactory,
                                                     redis_server: RedisServer) -> None:
    limits = _rules(RuleConfig(name="strict", requests=QuotaConfig(amount=100, period="1h"),
                               on_redis_down="closed"),
                    redis_url=redis_server.url, timeout_ms=100)
    url = sidecars.start(ratelimit=limits)
    redis_server.stop()
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c, \
            pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="m", messages=MESSAGES)
    assert "limiter unavailable" in info.value.message
    assert int(info.value.response.headers["retry-after"]) >= 1


def _in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_concurrent_quota_limits_requests_in_flight(
        sidecars: SidecarFactory, mock: Mock, tmp_path: Any, backend: str) -> None:
    server = None
    if backend == "redis":
        server = RedisServer(tmp_path)
        server.start()
    try:
        url = sidecars.start(ratelimit=_rules(
            RuleConfig(name="inflight", per=("agent",), concurrent=2),
            redis_url=server.url if server else None, timeout_ms=200))
        key = "POST /v1/chat/completions"
        slow = {"x-agent-id": "a", "x-mock-latency-ms": "600"}
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
            before = mock.server.stats.requests[key]
            holders = [_in_background(lambda: _chat(c, extra_headers=slow)) for _ in range(2)]
            assert mock.server.stats.wait_for_requests(key, before + 2, 10)  # both in flight
            with pytest.raises(openai.RateLimitError) as info:
                _chat(c, extra_headers={"x-agent-id": "a"})
            # Another agent has its own slots.
            assert _chat(c, extra_headers={"x-agent-id": "b"}).parse().choices
            for thread, out in holders:
                thread.join(10)
                assert "error" not in out, out
            _settled(sidecars, url)  # the slots are released after the answers
            again = _chat(c, extra_headers={"x-agent-id": "a"})
        err = info.value
        assert "Concurrency limit" in err.message and "'inflight'" in err.message
        assert err.response.headers["retry-after"] == "1"
        assert again.parse().choices
        decisions = _status(url)["components"]["ratelimit"]["details"]["decisions"]
        assert set(decisions) == {backend}
    finally:
        if server is not None:
            server.stop()


def test_client_that_leaves_gives_its_slot_back(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(ratelimit=_rules(RuleConfig(name="solo", concurrent=1)))
    cancelled = mock.server.stats.cancelled
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=0.3) as c, \
            pytest.raises(openai.APITimeoutError):
        _chat(c, extra_headers={"x-mock-latency-ms": "5000"})
    assert mock.server.stats.wait_for_cancelled(cancelled + 1, 10)
    _settled(sidecars, url)
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        assert _chat(c).parse().choices  # the abandoned request no longer holds the slot


def test_queue_mode_holds_requests_instead_of_429(sidecars: SidecarFactory) -> None:
    # 2 per second with no burst: one request every 500 ms; hold up to 3 s.
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="paced", requests=QuotaConfig(amount=2, period="1s", capacity=1),
        max_wait="3s")))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        replies = [_chat(c) for _ in range(3)]
    assert "x-sidecar-ratelimit-wait-ms" not in replies[0].headers
    waits = [int(r.headers["x-sidecar-ratelimit-wait-ms"]) for r in replies[1:]]
    # Each later request waited for its refill (up to 500 ms), never got a 429.
    assert all(250 <= w <= 2000 for w in waits), waits


def test_queue_mode_paces_a_crowd_without_hammering_the_limiter(
        sidecars: SidecarFactory) -> None:
    # 12 requests at once against 20 per second with no burst: all are admitted,
    # one every 50 ms, and the held ones wait in line instead of all re-asking the
    # limiter at every refill.
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="paced", requests=QuotaConfig(amount=20, period="1s", capacity=1),
        max_wait="5s")))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        started = time.monotonic()
        crowd = [_in_background(lambda: _chat(c)) for _ in range(12)]
        for thread, _ in crowd:
            thread.join(15)
        elapsed = time.monotonic() - started
    assert all("error" not in out for _, out in crowd), [o.get("error") for _, o in crowd]
    waits = sorted(int(out["result"].headers.get("x-sidecar-ratelimit-wait-ms", 0))
                   for _, out in crowd)
    assert elapsed >= 11 * 0.05 * 0.9  # one admission per refill, 11 refills
    assert waits[0] == 0 and waits[-1] >= 200  # (arrivals spread a little)
    decisions = _status(url)["components"]["ratelimit"]["details"]["decisions"]["local"]
    assert decisions <= 3 * 12  # first try, a look on reaching the head, the admission


def test_queue_mode_gives_up_at_once_when_the_wait_would_be_too_long(
        sidecars: SidecarFactory) -> None:
    url = sidecars.start(ratelimit=_rules(RuleConfig(
        name="hourly", requests=QuotaConfig(amount=1, period="1h"), max_wait="1s")))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        _chat(c)
        with pytest.raises(openai.RateLimitError) as info:
            _chat(c)
    assert "x-sidecar-ratelimit-wait-ms" not in info.value.response.headers
    assert int(info.value.response.headers["retry-after"]) > 3000  # an hour's refill


def test_queue_mode_waits_for_a_free_slot(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(ratelimit=_rules(RuleConfig(name="one-at-a-time", concurrent=1,
                                                     max_wait="10s")))
    key = "POST /v1/chat/completions"
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        before = mock.server.stats.requests[key]
        thread, out = _in_background(
            lambda: _chat(c, extra_headers={"x-mock-latency-ms": "300"}))
        assert mock.server.stats.wait_for_requests(key, before + 1, 10)
        second = _chat(c)  # held while the first is in flight, then admitted
        thread.join(10)
    assert "error" not in out, out
    assert int(second.headers["x-sidecar-ratelimit-wait-ms"]) > 0
    assert second.parse().choices


def test_openai_duration_format() -> None:
    from proxy.ratelimit.policy import format_duration
    assert [format_duration(s) for s in (0.02, 1, 6 * 60, 61.5, 3723)] == [
        "20ms", "1s", "6m0s", "1m1.5s", "1h2m3s"]
