"""The semantic tier end to end: the openai SDK through sidecars, local and sharing Redis."""

from __future__ import annotations

import re
import time
from typing import Any

import openai
import pytest
import redis as redis_sync

from proxy.app import HEALTH, PIPELINE
from proxy.cache.stage import CacheStage
from proxy.config import CacheConfig
from tests.conftest import Mock, SidecarFactory, UpstreamCalls, sdk, settled
from tests.redis_server import RedisServer

SEMANTIC = re.compile(r"hit; tier=semantic; similarity=(0\.\d{3}|1\.000)")
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "lookup_order", "description": "Find an order",
    "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def local(sidecars: SidecarFactory) -> str:
    return sidecars.start(cache=CacheConfig(semantic=True))


def _ask(client: openai.OpenAI, text: str, *, system: str = "You are a support agent.",
         earlier: list[dict[str, Any]] | None = None, **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    messages = [{"role": "system", "content": system}, *(earlier or []),
                {"role": "user", "content": text}]
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, **kw)


def _stage(sidecars: SidecarFactory, url: str) -> CacheStage:
    stage = next(s for s in sidecars.apps[url][PIPELINE].stages if s.name == "cache")
    assert isinstance(stage, CacheStage)
    return stage


def _status(sidecars: SidecarFactory, url: str) -> dict[str, Any]:
    health = sidecars.apps[url][HEALTH]
    sidecars.lt.call(health.check_all())
    components: dict[str, Any] = health.snapshot()["components"]
    return components


def test_paraphrase_is_served_by_the_semantic_tier(sidecars: SidecarFactory, local: str,
                                                   mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        first = _ask(client, "How do I reset my password?")
        settled(sidecars, local)
        second = _ask(client, "How can I reset my password?")
    assert first.headers["x-sidecar-cache"] == "miss"
    assert SEMANTIC.fullmatch(second.headers["x-sidecar-cache"])
    similarity = float(second.headers["x-sidecar-cache"].rsplit("=", 1)[1])
    assert 0.90 <= similarity < 1.0
    assert upstream.calls == 1
    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.id != a.id and b.usage == a.usage


def test_semantic_hit_streams_through_the_sdk_helpers(sidecars: SidecarFactory, local: str,
                                                      mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        first = _ask(client, "Where can I download my invoices?").parse()
        settled(sidecars, local)
        with client.chat.completions.stream(
                model="gpt-4o-mini", temperature=0,
                messages=[{"role": "system", "content": "You are a support agent."},
                          {"role": "user", "content": "Where do I download my invoices?"}],
        ) as stream:
            text = "".join(e.delta for e in stream if e.type == "content.delta")
            final = stream.get_final_completion()
    assert upstream.calls == 1
    assert text == first.choices[0].message.content == final.choices[0].message.content


@pytest.mark.parametrize(("first", "second"), [
    ("What is 2+2?", "What's 2+3?"),
    ("Is the invoice paid?", "Is the invoice not paid?"),
    ("Why does get_user fail?", "Why does get_users fail?"),
    ('Translate "good morning" into French', 'Translate "good evening" into French'),
    ("How do I ship an order to Canada?", "How do I ship an order to Mexico?"),
])
def test_near_paraphrases_that_change_the_answer_do_not_hit(
        sidecars: SidecarFactory, local: str, mock: Mock, first: str, second: str) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(local) as client:
        _ask(client, first)
        settled(sidecars, local)
        other = _ask(client, second)
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_semantic_tier_stays_within_the_context(sidecars: SidecarFactory, local: str,
                                                mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    question, paraphrase = "How do I close my account?", "How can I close my account?"
    earlier: list[dict[str, Any]] = [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello! How can I help?"}]
    with sdk(local) as client, sdk(local, "sk-semantic-b") as other_tenant:
        _ask(client, question)
        settled(sidecars, local)
        misses = [
            _ask(client, paraphrase, system="You are a sales agent."),
            _ask(client, paraphrase, earlier=earlier),
            _ask(client, paraphrase, tools=TOOLS),
            _ask(client, paraphrase, max_tokens=50),
            _ask(other_tenant, paraphrase),
        ]
        hit = _ask(client, paraphrase)
    assert [m.headers["x-sidecar-cache"] for m in misses] == ["miss"] * len(misses)
    assert SEMANTIC.fullmatch(hit.headers["x-sidecar-cache"])
    assert upstream.calls == 1 + len(misses)


def _assert_paraphrase_misses(sidecars: SidecarFactory, url: str, mock: Mock, first: str,
                              paraphrase: str) -> None:
    """The paraphrase, asked after ``first`` was stored, goes upstream."""
    upstream = UpstreamCalls(mock)
    with sdk(url) as client:
        _ask(client, first)
        settled(sidecars, url)
        other = _ask(client, paraphrase)
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_semantic_tier_can_be_turned_off_per_model(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(cache=CacheConfig(semantic=True,
                                           semantic_thresholds={"gpt-4o-mini*": 1.0}))
    _assert_paraphrase_misses(sidecars, url, mock, "How do I update my billing address?",
                              "How can I update my billing address?")


def test_semantic_entry_is_shared_through_redis_and_caught_up_by_late_starters(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock) -> None:
    cfg = CacheConfig(redis_url=redis_server.url, semantic=True)
    first, second = sidecars.start(cache=cfg), sidecars.start(cache=cfg)
    upstream = UpstreamCalls(mock)
    with sdk(first) as a:
        _ask(a, "How do I export my data to CSV?")
        settled(sidecars, first)
    [key] = _stage(sidecars, first).semantic.index.keys()  # type: ignore[union-attr]
    feed = _stage(sidecars, second).feed
    assert feed is not None and sidecars.lt.call(feed.wait_until(key))
    late = sidecars.start(cache=cfg)
    late_feed = _stage(sidecars, late).feed
    assert late_feed is not None and sidecars.lt.call(late_feed.wait_until(key))
    with sdk(second) as b, sdk(late) as c:
        on_second = _ask(b, "How can I export my data to CSV?")
        on_late = _ask(c, "How can I export my data as CSV?")
    assert SEMANTIC.fullmatch(on_second.headers["x-sidecar-cache"])
    assert SEMANTIC.fullmatch(on_late.headers["x-sidecar-cache"])
    assert upstream.calls == 1
    index = _status(sidecars, late)["semantic_index"]
    assert index["state"] == "ok" and index["details"]["applied_from_stream"] >= 1


def test_expired_entry_leaves_the_semantic_tier(sidecars: SidecarFactory,
                                                redis_server: RedisServer, mock: Mock) -> None:
    url = sidecars.start(cache=CacheConfig(redis_url=redis_server.url, local_max_bytes=0,
                                           semantic=True))
    upstream = UpstreamCalls(mock)
    with sdk(url) as client:
        _ask(client, "How do I change my username?", extra_headers={"x-sidecar-cache-ttl": "1"})
        settled(sidecars, url)
        [key] = _stage(sidecars, url).semantic.index.keys()  # type: ignore[union-attr]
        r = redis_sync.Redis.from_url(redis_server.url)
        try:
            # The answer expires on Redis's clock: wait for that condition (a TTL
            # cannot be tested without a second passing), bounded.
            deadline = time.monotonic() + 10
            while r.exists(key) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not r.exists(key)
        finally:
            r.close()
        other = _ask(client, "How can I change my username?")
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2
    assert key not in _stage(sidecars, url).semantic.index  # type: ignore[union-attr]


def test_redis_down_leaves_the_semantic_tier_local_and_says_so(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock) -> None:
    url = sidecars.start(cache=CacheConfig(redis_url=redis_server.url, breaker_failures=1,
                                           timeout_ms=50, semantic=True))
    feed = _stage(sidecars, url).feed
    assert feed is not None and sidecars.lt.call(feed.wait_until())
    redis_server.stop()
    upstream = UpstreamCalls(mock)
    with sdk(url) as client:
        _ask(client, "How do I add a team member?")
        settled(sidecars, url)
        hit = _ask(client, "How can I add a team member?")
    assert SEMANTIC.fullmatch(hit.headers["x-sidecar-cache"])
    assert upstream.calls == 1
    index = _status(sidecars, url)["semantic_index"]
    assert index["state"] == "degraded" and "semantic stream" in index["reason"]


def test_semantic_tier_is_off_by_default(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start()
    _assert_paraphrase_misses(sidecars, url, mock, "How do I rotate my API key?",
                              "How can I rotate my API key?")
    assert "semantic_index" not in _status(sidecars, url)
