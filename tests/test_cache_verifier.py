"""The semantic tier's verifier, write-back and normalized context, through real sidecars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from proxy.cache.bert import BertEncoder
from proxy.cache.semantic import THRESHOLD_WITH_VERIFIER
from proxy.cache.stage import CacheStage
from proxy.cache.verifier import Verifier, VerifierUnavailable, model_directory
from proxy.config import CacheConfig, ConfigError, load_config
from proxy.wire.canonical import Endpoint, parse_request
from tests.conftest import Mock, SidecarFactory, UpstreamCalls, sdk, settled
from tests.redis_server import RedisServer
from tests.test_cache_semantic_e2e import SEMANTIC, _ask, _stage

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"
VERIFIED = CacheConfig(semantic=True, semantic_verifier="minilm-l6")


@pytest.fixture(scope="module")
def encoder() -> BertEncoder:
    return BertEncoder(model_directory("minilm-l6"))


@pytest.fixture(scope="module")
def verified(sidecars: SidecarFactory) -> str:
    return sidecars.start(cache=VERIFIED)


@pytest.fixture(scope="module")
def semantic(sidecars: SidecarFactory) -> str:
    return sidecars.start(cache=CacheConfig(semantic=True))


def test_numpy_forward_pass_matches_the_torch_reference(encoder: BertEncoder) -> None:
    """Vectors made by torch + transformers for the same weights (tests/data)."""
    reference = json.loads(REFERENCE.read_text("utf-8"))
    for item in reference["items"]:
        ours = encoder.embed(item["text"])
        theirs = np.asarray(item["vector"], dtype=np.float32)
        assert ours.shape == (384,)
        assert float(np.abs(ours - theirs).max()) < 1e-5, item["text"][:40]


def test_verifier_separates_what_the_static_embedder_cannot(encoder: BertEncoder) -> None:
    paraphrase = float(encoder.embed("How do I reverse a list in Python?")
                       @ encoder.embed("What's the way to reverse a Python list?"))
    near_miss = float(encoder.embed("A man is playing a guitar.")
                      @ encoder.embed("A man is playing a flute."))
    assert paraphrase > 0.95
    assert near_miss < 0.6


def test_unknown_verifier_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  semantic: true\n  semantic_verifier: no-such-model\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), environ={})
    assert any(p.startswith("cache.semantic_verifier:") and "no-such-model" in p
               for p in exc.value.problems)
    with pytest.raises(VerifierUnavailable):
        Verifier.load(str(tmp_path))  # a directory, but no model in it


def test_verified_paraphrase_hits_and_is_written_back(sidecars: SidecarFactory, verified: str,
                                                      mock: Mock) -> None:
    upstream = UpstreamCalls(mock)
    with sdk(verified) as client:
        _ask(client, "How do I reset my password?")
        settled(sidecars, verified)
        second = _ask(client, "How can I reset my password?")
        settled(sidecars, verified)
        third = _ask(client, "How can I reset my password?")
    assert SEMANTIC.fullmatch(second.headers["x-sidecar-cache"])
    # Written back under its own keys: the same words again are an exact hit.
    assert third.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 1
    assert _stage(sidecars, verified).written_back >= 1


@pytest.mark.parametrize(("first", "second"), [
    ("What happens to the stash entry after I run git stash apply?",
     "What happens to the stash entry after I run git stash pop?"),
    ("In CSS, does an element's background color extend under its margin?",
     "In CSS, does an element's background color extend under its padding?"),
])
def test_verifier_refuses_what_guard_and_static_embedder_accept(
        sidecars: SidecarFactory, verified: str, mock: Mock, first: str, second: str) -> None:
    stage = _stage(sidecars, verified)
    semantic = stage.semantic
    assert semantic is not None
    # The premise: without the verifier this pair would be a hit.
    probe_a = semantic.probe("x", _canonical(first))
    probe_b = semantic.probe("x", _canonical(second))
    assert probe_a is not None and probe_b is not None
    assert float(probe_a.vector @ probe_b.vector) >= THRESHOLD_WITH_VERIFIER
    assert semantic.guard.refuses(probe_a.features, probe_b.features) is None
    upstream = UpstreamCalls(mock)
    with sdk(verified) as client:
        _ask(client, first)
        settled(sidecars, verified)
        other = _ask(client, second)
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def _store_then_ask(sidecars: SidecarFactory, storer: str, asker: str, stored: str,
                    asked: str) -> Any:
    """``stored`` answered through ``storer``; once ``asker`` has indexed it, ask ``asked``."""
    with sdk(storer) as a:
        _ask(a, stored)
        settled(sidecars, storer)
    key = _only_key(_stage(sidecars, storer))
    feed = _stage(sidecars, asker).feed
    assert feed is not None and sidecars.lt.call(feed.wait_until(key))
    with sdk(asker) as b:
        return _ask(b, asked)


def test_candidates_without_a_verifier_vector_are_refused(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock) -> None:
    """A replica without the verifier shares entries; a verifying replica will not trust them."""
    plain = sidecars.start(cache=CacheConfig(redis_url=redis_server.url, semantic=True,
                                             semantic_threshold=THRESHOLD_WITH_VERIFIER))
    checking = sidecars.start(cache=CacheConfig(
        redis_url=redis_server.url, semantic=True, semantic_verifier="minilm-l6"))
    upstream = UpstreamCalls(mock)
    other = _store_then_ask(sidecars, plain, checking, "How do I rotate my API key?",
                            "How can I rotate my API key?")
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_verifier_vector_travels_to_other_replicas(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock) -> None:
    cfg = CacheConfig(redis_url=redis_server.url, semantic=True, semantic_verifier="minilm-l6")
    first, second = sidecars.start(cache=cfg), sidecars.start(cache=cfg)
    upstream = UpstreamCalls(mock)
    hit = _store_then_ask(sidecars, first, second, "Where do I find my billing history?",
                          "Where can I find my billing history?")
    assert SEMANTIC.fullmatch(hit.headers["x-sidecar-cache"])
    assert upstream.calls == 1


def test_stamped_system_prompt_still_meets_its_context(sidecars: SidecarFactory, semantic: str,
                                                       mock: Mock) -> None:
    """Agents that stamp the time into the system prompt: the context is the normalized one."""
    upstream = UpstreamCalls(mock)
    with sdk(semantic) as client:
        _ask(client, "How do I change my shipping address?",
             system="You are a support agent. Now: 2026-11-25T04:10:00Z")
        settled(sidecars, semantic)
        hit = _ask(client, "How can I change my shipping address?",
                   system="You are a support agent. Now: 2026-11-25T04:11:37Z")
        other = _ask(client, "How can I change my shipping address?",
                     system="You are a sales agent. Now: 2026-11-25T04:12:00Z")
    assert SEMANTIC.fullmatch(hit.headers["x-sidecar-cache"])
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def _only_key(stage: CacheStage) -> str:
    assert stage.semantic is not None
    [key] = stage.semantic.index.keys()
    return key


def _canonical(text: str) -> Any:
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": text}]}
    return parse_request(Endpoint.CHAT, json.dumps(body).encode())


def test_sdk_client_unaffected_by_verifier_refusal(sidecars: SidecarFactory, verified: str,
                                                   mock: Mock) -> None:
    """A refused candidate is an ordinary miss: the SDK gets the upstream's full answer."""
    with sdk(verified) as client:
        _ask(client, "Does the free plan include SSO?")
        settled(sidecars, verified)
        answer = _ask(client, "Does the free plan include SCIM?")
    assert answer.headers["x-sidecar-cache"] == "miss"
    parsed = answer.parse()
    assert isinstance(parsed, openai.types.chat.ChatCompletion)
    assert parsed.choices[0].message.content
