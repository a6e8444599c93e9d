"""The response cache end to end: the openai SDK through sidecars, local and Redis-backed."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from proxy.app import HEALTH
from proxy.config import CacheConfig, QuotaConfig, RateLimitConfig, RuleConfig
from tests.conftest import Mock, SidecarFactory, UpstreamCalls, sdk, settled
from tests.redis_server import RedisServer

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def _ask(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], **kw)


def test_exact_repeat_is_served_from_cache(sidecars: SidecarFactory, local: str,
                                           mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        first = _ask(client, "Name three prime numbers above 100.")
        settled(sidecars, local)
        second = _ask(client, "Name three prime numbers above 100.")
    assert first.headers["x-sidecar-cache"] == "miss"
    assert second.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 1
    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage == a.usage  # the original usage
    assert b.id != a.id and b.id.startswith("chatcmpl-")  # a fresh id


def test_normalized_tier_matches_case_whitespace_and_punctuation(
        sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        _ask(client, "What is the capital of Portugal?")
        settled(sidecars, local)
        hit = _ask(client, "what is the   capital of portugal")
    assert hit.headers["x-sidecar-cache"] == "hit; tier=normalized"
    assert upstream.calls == 1


@pytest.mark.parametrize(("first", "second"), [
    ("What is 2+2?", "What is 2+3?"),
    ("The service is healthy", "The service is not healthy"),
    ("Rename `getUser` please", "Rename `getuser` please"),
    ("Book a flight to Paris on 3 May", "Book a flight to Paris on 4 May"),
])
def test_near_misses_do_not_hit(sidecars: SidecarFactory, local: str, mock: Mock,
                                first: str, second: str) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        _ask(client, first)
        settled(sidecars, local)
        other = _ask(client, second)
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_context_changes_the_key(sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    base: list[Any] = [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": "Summarise the report."}]
    variants: list[dict[str, Any]] = [
        {"messages": base},
        {"messages": [{"role": "system", "content": "You are verbose."}, base[1]]},
        {"messages": [base[0], {"role": "assistant", "content": "Which report?"}, base[1]]},
        {"messages": base, "tools": TOOLS},
        {"messages": base, "max_tokens": 7},
        {"messages": base, "seed": 3},
    ]
    with sdk(local) as client:
        for v in variants:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", temperature=0, **v)
            settled(sidecars, local)
            assert raw.headers["x-sidecar-cache"] == "miss", v
    assert upstream.calls == len(variants)


def test_other_tenant_never_gets_the_entry(sidecars: SidecarFactory, local: str,
                                           mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local, "sk-tenant-one") as one, sdk(local, "sk-tenant-two") as two:
        _ask(one, "Tenant isolation check")
        settled(sidecars, local)
        assert _ask(two, "Tenant isolation check").headers["x-sidecar-cache"] == "miss"
        settled(sidecars, local)
        assert _ask(one, "Tenant isolation check").headers["x-sidecar-cache"].startswith("hit")
    assert upstream.calls == 2


def test_only_deterministic_requests_are_cached_unless_opted_in(
        sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        for _ in range(2):
            sampled = _ask(client, "Write a haiku", temperature=0.7)
            settled(sidecars, local)
        assert "x-sidecar-cache" not in sampled.headers
        assert upstream.calls == 2
        opted = {"x-sidecar-cache": "on"}
        _ask(client, "Write a limerick", temperature=0.7, extra_headers=opted)
        settled(sidecars, local)
        again = _ask(client, "Write a limerick", temperature=0.7, extra_headers=opted)
        assert again.headers["x-sidecar-cache"] == "hit; tier=exact"
        off = _ask(client, "Write a limerick", temperature=0.7,
                   extra_headers={"x-sidecar-cache": "off"})
        assert "x-sidecar-cache" not in off.headers
    assert upstream.calls == 4


def test_cache_control_no_cache_and_no_store(sidecars: SidecarFactory, local: str,
                                             mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        _ask(client, "no-store question", extra_headers={"Cache-Control": "no-store"})
        settled(sidecars, local)
        assert _ask(client, "no-store question").headers["x-sidecar-cache"] == "miss"
        settled(sidecars, local)
        fresh = _ask(client, "no-store question", extra_headers={"Cache-Control": "no-cache"})
        assert fresh.headers["x-sidecar-cache"] == "miss"  # looked past the entry
        assert _ask(client, "no-store question").headers["x-sidecar-cache"].startswith("hit")
    assert upstream.calls == 3


def test_bad_cache_headers_get_an_openai_style_400(local: str) -> None:
    with sdk(local) as client:
        for headers in ({"x-sidecar-cache-ttl": "soon"}, {"x-sidecar-cache": "maybe"}):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model="gpt-4o-mini", temperature=0,
                                               messages=[{"role": "user", "content": "x"}],
                                               extra_headers=headers)
            assert err.value.code == "invalid_cache_header"
            assert next(iter(headers)) in err.value.message


def test_errors_and_cut_streams_are_not_stored(sidecars: SidecarFactory, local: str,
                                               mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        with pytest.raises(openai.InternalServerError):
            _ask(client, "failing question", extra_headers={"x-mock-error": "500"})
        settled(sidecars, local)
        assert _ask(client, "failing question").headers["x-sidecar-cache"] == "miss"
        with pytest.raises(openai.APIError):  # the stream breaks off mid-way
            stream = client.chat.completions.create(
                model="gpt-4o-mini", temperature=0, stream=True,
                messages=[{"role": "user", "content": "cut question"}],
                extra_headers={"x-mock-disconnect": "mid-stream"})
            for _ in stream:
                pass
        settled(sidecars, local)
        assert _ask(client, "cut question").headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 5  # the 500 was retried once by the sidecar


def test_streamed_answer_is_stored_and_replayed_both_ways(
        sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Oslo?"}]
    with sdk(local) as client:
        with client.chat.completions.stream(model="gpt-4o-mini", temperature=0,
                                            messages=messages, tools=TOOLS) as stream:
            original = stream.get_final_completion()
        settled(sidecars, local)
        # A streaming client replays through the SDK's own stream helpers...
        with client.chat.completions.stream(model="gpt-4o-mini", temperature=0,
                                            messages=messages, tools=TOOLS) as stream:
            replayed = stream.get_final_completion()
            assert stream._raw_stream.response.headers["x-sidecar-cache"] == "hit; tier=exact"
        # ...and a non-streaming one gets the same answer as JSON.
        plain = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, messages=messages, tools=TOOLS)
    assert upstream.calls == 1
    assert plain.headers["x-sidecar-cache"] == "hit; tier=exact"
    for got in (replayed, plain.parse()):
        message = got.choices[0].message
        assert got.choices[0].finish_reason == original.choices[0].finish_reason
        assert message.content == original.choices[0].message.content
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert calls == [(c.function.name, c.function.arguments)
                         for c in original.choices[0].message.tool_calls or []]
        assert calls  # the mock answered with a tool call


def test_replayed_stream_has_usage_only_when_asked(sidecars: SidecarFactory, local: str) -> None:
    with sdk(local) as client:
        _ask(client, "usage replay")
        settled(sidecars, local)
        for include in (False, True):
            chunks = list(client.chat.completions.create(
                model="gpt-4o-mini", temperature=0, stream=True,
                messages=[{"role": "user", "content": "usage replay"}],
                **({"stream_options": {"include_usage": True}} if include else {})))
            with_usage = [c for c in chunks if c.usage is not None]
            assert len(with_usage) == (1 if include else 0)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_ttl_header_sets_the_lifetime(sidecars: SidecarFactory, redis_server: RedisServer,
                                      mock: Mock) -> None:
    import redis as redis_sync

    url = sidecars.start(cache=CacheConfig(redis_url=redis_server.url))
    with sdk(url) as client:
        _ask(client, "short-lived", extra_headers={"x-sidecar-cache-ttl": "30"})
        _ask(client, "long-lived")
        settled(sidecars, url)
    r = redis_sync.Redis.from_url(redis_server.url)
    ttls = sorted(r.pttl(k) for k in r.keys("llm-sidecar:cache:*") if b":sem:" not in k)
    r.close()
    assert len(ttls) == 4  # exact + normalized key each
    assert all(25_000 < t <= 30_000 for t in ttls[:2])
    assert all(3_500_000 < t <= 3_600_000 for t in ttls[2:])  # the default hour


def test_entry_stored_by_one_sidecar_is_served_by_another(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock) -> None:
    cfg = CacheConfig(redis_url=redis_server.url)
    first, second = sidecars.start(cache=cfg), sidecars.start(cache=cfg)
    upstream = UpstreamCalls(mock)
    with sdk(first) as a, sdk(second) as b:
        _ask(a, "Shared across the fleet?")
        settled(sidecars, first)
        exact = _ask(b, "Shared across the fleet?")
        normal = _ask(b, "shared across the fleet")
    assert exact.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert normal.headers["x-sidecar-cache"] == "hit; tier=normalized"
    assert upstream.calls == 1


def test_redis_stopped_mid_run_degrades_to_local_only(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock) -> None:
    import urllib.request

    import orjson

    url = sidecars.start(cache=CacheConfig(redis_url=redis_server.url, breaker_failures=1,
                                           breaker_reset_s=60))
    upstream = UpstreamCalls(mock)
    with sdk(url) as client:
        assert _ask(client, "before the outage").headers["x-sidecar-cache"] == "miss"
        settled(sidecars, url)
        redis_server.stop()
        # Stored before the outage: still answered, from the local LRU.
        assert _ask(client, "before the outage").headers["x-sidecar-cache"] == "hit; tier=exact"
        # New questions still flow (a miss each) and are kept locally meanwhile.
        assert _ask(client, "during the outage").headers["x-sidecar-cache"] == "miss"
        settled(sidecars, url)
        assert _ask(client, "during the outage").headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 2
    base = url.removesuffix("/v1")
    with urllib.request.urlopen(base + "/readyz") as resp:
        ready = orjson.loads(resp.read())
    assert resp.status == 200 and "cache" in ready["degraded"]
    cache = sidecars.apps[url][HEALTH].snapshot()["components"]["cache"]
    assert cache["state"] == "degraded" and cache["details"]["breaker_opened"] == 1


def test_cache_hits_take_no_quota_by_default(sidecars: SidecarFactory, mock: Mock) -> None:
    rule = RuleConfig(name="two-rpm", requests=QuotaConfig(2, "1m"))
    url = sidecars.start(ratelimit=RateLimitConfig(rules=(rule,)))
    with sdk(url) as client:
        for _ in range(5):  # 1 miss + 4 hits: only the miss is charged
            raw = _ask(client, "quota-free hits")
            settled(sidecars, url)
        assert raw.headers["x-sidecar-cache"] == "hit; tier=exact"
        assert _ask(client, "another question").headers["x-ratelimit-remaining-requests"] == "0"


def test_cache_hits_can_be_made_to_count(sidecars: SidecarFactory, mock: Mock) -> None:
    rule = RuleConfig(name="two-rpm", requests=QuotaConfig(2, "1m"))
    url = sidecars.start(ratelimit=RateLimitConfig(rules=(rule,), count_cache_hits=True))
    with sdk(url) as client:
        _ask(client, "counted hits")
        settled(sidecars, url)
        hit = _ask(client, "counted hits")
        assert hit.headers["x-sidecar-cache"] == "hit; tier=exact"
        assert hit.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError):
            _ask(client, "counted hits")


def test_volatile_values_in_the_system_prompt_still_hit(
        sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock)

    def ask(client: openai.OpenAI, stamp: str, request_id: str) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, messages=[
                {"role": "system", "content": f"Now: {stamp}. Request {request_id}."},
                {"role": "user", "content": "List the open incidents."}])

    with sdk(local) as client:
        ask(client, "2026-11-25T01:53:21Z", "req_8f3a9c0d1e2b4a5f")
        settled(sidecars, local)
        hit = ask(client, "2026-11-25T02:10:07Z", "req_0b1c2d3e4f5a6b7c")
    assert hit.headers["x-sidecar-cache"] == "hit; tier=normalized"
    assert upstream.calls == 1


def test_a_date_in_the_user_turn_is_the_question(sidecars: SidecarFactory, local: str,
                                                 mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        _ask(client, "Which weekday is 2026-11-25?")
        settled(sidecars, local)
        other = _ask(client, "Which weekday is 2026-11-26?")
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_answer_quoting_another_prompts_id_is_refused() -> None:
    from proxy.cache.normalize import Normalizer

    normalizer = Normalizer()
    answer = '{"order_id": "5f0c2d9e-8a61-4c1b-9d2e-3b7a6f1e0c44", "action": "cancel"}'
    asked_other = '{"messages": [{"role": "system", "content": "order ' \
        '0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"}]}'
    asked_same = asked_other.replace("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                                     "5f0c2d9e-8a61-4c1b-9d2e-3b7a6f1e0c44")
    assert normalizer.echoes_other_values(answer, asked_other)
    assert not normalizer.echoes_other_values(answer, asked_same)
    assert not normalizer.echoes_other_values("Three incidents are open.", asked_other)
