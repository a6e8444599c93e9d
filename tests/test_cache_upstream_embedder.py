"""The semantic tier with the provider's embeddings endpoint as its embedder.

The embeddings server here is a real aiohttp server on loopback that answers
``POST /v1/embeddings`` in the OpenAI format with the static model's vectors
(so paraphrases are close, as with a real provider), and records what it got.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.app import HEALTH
from proxy.cache.embedder import StaticEmbedder
from proxy.cache.remote_embedder import UpstreamEmbedder
from proxy.config import CacheConfig, ConfigError, UpstreamConfig, load_config
from proxy.upstream import Upstream
from tests.conftest import (
    LoopThread,
    Mock,
    SidecarFactory,
    UpstreamCalls,
    sdk,
    serving,
    settled,
)
from tests.test_cache_semantic_e2e import SEMANTIC, _ask


@dataclass
class Embeddings:
    """A provider's embeddings endpoint, with switches a test flips."""

    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    status: int = 200
    dims: int | None = None  # answer with vectors of another size
    release: asyncio.Event | None = None  # hold answers until set


@pytest.fixture(scope="module")
def embeddings(loop_thread: LoopThread) -> Iterator[Embeddings]:
    model = StaticEmbedder.packaged()
    state = Embeddings()

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        state.seen.append(body)
        state.authorizations.append(request.headers.get("Authorization"))
        if state.release is not None:
            await state.release.wait()
        if state.status != 200:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}},
                                     status=state.status)
        vector = model.embed(body["input"])
        if state.dims is not None:
            vector = vector[: state.dims]
        data = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return web.json_response({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": 0, "embedding": data}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5}})

    app = web.Application()
    app.router.add_post("/v1/embeddings", handle)
    with serving(loop_thread, app) as url:
        state.url = url
        yield state


@pytest.fixture
def fresh(embeddings: Embeddings) -> Embeddings:
    embeddings.seen.clear()
    embeddings.authorizations.clear()
    embeddings.status, embeddings.dims, embeddings.release = 200, None, None
    return embeddings


def _sidecar(sidecars: SidecarFactory, embeddings: Embeddings, **cache: Any) -> str:
    return sidecars.start(
        upstreams={"emb": UpstreamConfig(base_url=embeddings.url, api_key="sk-emb-own")},
        cache=CacheConfig(semantic=True, semantic_embedder="upstream",
                          semantic_embedder_upstream="emb", **cache))


def test_paraphrase_hits_through_provider_embeddings(sidecars: SidecarFactory, mock: Mock,
                                                     fresh: Embeddings) -> None:
    url = _sidecar(sidecars, fresh)
    upstream = UpstreamCalls(mock)
    with sdk(url, "sk-agent-secret") as client:
        first = _ask(client, "How do I rotate my webhook signing secret?")
        settled(sidecars, url)
        second = _ask(client, "How can I rotate my webhook signing secret?")
    assert first.headers["x-sidecar-cache"] == "miss"
    assert SEMANTIC.fullmatch(second.headers["x-sidecar-cache"])
    assert upstream.calls == 1
    # One embedding per distinct prompt: the first at store time, the second at lookup.
    assert [s["input"] for s in fresh.seen] == ["How do I rotate my webhook signing secret?",
                                                "How can I rotate my webhook signing secret?"]
    assert all(s["dimensions"] == 256 and s["model"] == "text-embedding-3-small"
               and s["encoding_format"] == "base64" for s in fresh.seen)
    # A named upstream gets its own key, never the agent's.
    assert fresh.authorizations == ["Bearer sk-emb-own"] * 2


def test_failing_embeddings_cost_only_the_semantic_lookup(sidecars: SidecarFactory, mock: Mock,
                                                          fresh: Embeddings) -> None:
    url = _sidecar(sidecars, fresh)
    fresh.status = 500
    upstream = UpstreamCalls(mock)
    with sdk(url) as client:
        _ask(client, "Where do I see failed payment retries?")
        settled(sidecars, url)
        second = _ask(client, "Where can I see failed payment retries?")
    assert second.headers["x-sidecar-cache"] == "miss"
    assert second.parse().choices[0].message.content
    assert upstream.calls == 2
    health = sidecars.apps[url][HEALTH]
    sidecars.lt.call(health.check_all())
    component = health.snapshot()["components"]["semantic_embedder"]
    assert component["state"] == "degraded"
    assert "status 500" in component["reason"] and "sk-" not in str(component)
    assert component["details"]["failures"] >= 2


def test_slow_embeddings_time_out_and_the_request_goes_on(
        sidecars: SidecarFactory, mock: Mock, fresh: Embeddings) -> None:
    url = _sidecar(sidecars, fresh, semantic_embedder_timeout_ms=100)
    fresh.release = asyncio.Event()  # never set: every embedding hangs
    with sdk(url) as client:
        answer = _ask(client, "Can I export audit logs to S3?")
    assert answer.headers["x-sidecar-cache"] == "miss"
    health = sidecars.apps[url][HEALTH]
    sidecars.lt.call(health.check_all())
    assert "no answer within 0.1 s" in health.snapshot()["components"][
        "semantic_embedder"]["reason"]
    sidecars.lt.call(_set(fresh.release))


async def _set(event: asyncio.Event) -> None:
    event.set()


def _embedder(loop_thread: LoopThread, url: str, api_key: str | None, *,
              pass_agent_key: bool, dims: int = 256) -> tuple[UpstreamEmbedder, Upstream]:
    upstream = Upstream(UpstreamConfig(base_url=url, api_key=api_key))
    loop_thread.call(upstream.start())
    return UpstreamEmbedder(upstream, "text-embedding-3-small", dims, timeout_s=2,
                            pass_agent_key=pass_agent_key), upstream


def test_default_upstream_bills_its_own_key_else_the_agents(loop_thread: LoopThread,
                                                            fresh: Embeddings) -> None:
    agent = "Bearer sk-agent-own"
    with_key, a = _embedder(loop_thread, fresh.url, "sk-sidecar", pass_agent_key=True)
    without, b = _embedder(loop_thread, fresh.url, None, pass_agent_key=True)
    named, c = _embedder(loop_thread, fresh.url, None, pass_agent_key=False)
    try:
        assert loop_thread.call(with_key.embed("one", agent)) is not None
        assert loop_thread.call(without.embed("two", agent)) is not None
        assert loop_thread.call(named.embed("three", agent)) is not None
        # Memoised: the same text again is not sent.
        assert loop_thread.call(without.embed("two", agent)) is not None
    finally:
        for u in (a, b, c):
            loop_thread.call(u.close())
    assert fresh.authorizations == ["Bearer sk-sidecar", agent, None]
    assert without.memo_hits == 1


def test_vectors_of_another_size_are_refused_with_a_clear_reason(
        loop_thread: LoopThread, fresh: Embeddings) -> None:
    fresh.dims = 64
    embedder, upstream = _embedder(loop_thread, fresh.url, None, pass_agent_key=False)
    try:
        assert loop_thread.call(embedder.embed("hello there", None)) is None
    finally:
        loop_thread.call(upstream.close())
    assert embedder.last_error == ("vectors of 64 dimensions, configured 256 "
                                   "(set cache.semantic_embedder_dims)")


def test_unknown_embedder_upstream_is_a_config_error(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(orjson.dumps({"cache": {
        "semantic": True, "semantic_embedder": "upstream",
        "semantic_embedder_upstream": "nowhere"}}))
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), environ={})
    assert ("cache.semantic_embedder_upstream: no upstream named 'nowhere' in upstreams"
            in exc.value.problems)
