"""The response cache for legacy ``/v1/completions``: the openai SDK through a sidecar."""

from __future__ import annotations

import time
from typing import Any

import openai
import orjson
import pytest

from proxy.cache.completions import TextStreamAssembler, complete_text, prompt_count
from proxy.config import UpstreamConfig
from tests.conftest import Mock, Scripted, SidecarFactory, UpstreamCalls, sdk, settled

ROUTE = "POST /v1/completions"
MODEL = "gpt-3.5-turbo-instruct"


def _complete(client: openai.OpenAI, prompt: Any, **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    kw.setdefault("model", MODEL)
    return client.completions.with_raw_response.create(prompt=prompt, **kw)


def _stream(client: openai.OpenAI, prompt: Any, **kw: Any) -> tuple[str | None, list[Any]]:
    """The x-sidecar-cache header and the chunks the SDK parsed from a streamed answer."""
    kw.setdefault("temperature", 0)
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt,
                                                      stream=True, **kw)
    return raw.headers.get("x-sidecar-cache"), list(raw.parse())


def test_exact_repeat_is_served_from_cache(sidecars: SidecarFactory, local: str,
                                           mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        first = _complete(client, "List three prime numbers above 100:", max_tokens=12)
        settled(sidecars, local)
        second = _complete(client, "List three prime numbers above 100:", max_tokens=12)
    assert first.headers["x-sidecar-cache"] == "miss"
    assert second.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 1
    a, b = first.parse(), second.parse()
    assert b.object == "text_completion"
    assert b.choices[0].text == a.choices[0].text and a.choices[0].text
    assert b.choices[0].finish_reason == a.choices[0].finish_reason
    assert b.usage == a.usage and b.usage is not None  # the original usage
    assert b.model == a.model and b.system_fingerprint == a.system_fingerprint
    assert b.id != a.id and b.id.startswith("cmpl-")  # a fresh id...
    assert abs(b.created - time.time()) < 60  # ...and creation time


def test_token_array_prompt_hits_the_exact_tier(sidecars: SidecarFactory, local: str,
                                                mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        first = _complete(client, [1212, 318, 257, 1332])
        settled(sidecars, local)
        second = _complete(client, [1212, 318, 257, 1332])
        other = _complete(client, [1212, 318, 257, 1333])
    assert second.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert second.parse().choices[0].text == first.parse().choices[0].text
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_streamed_answer_is_stored_and_replayed(sidecars: SidecarFactory, local: str,
                                                mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    prompt = "Once upon a time, in a quiet harbour town,"
    with sdk(local) as client:
        # The client does not ask for usage: the sidecar does, and stores it.
        header, original = _stream(client, prompt, extra_headers={"x-mock-tokens": "40"})
        settled(sidecars, local)
        replays = {include: _stream(client, prompt, extra_headers={"x-mock-tokens": "40"},
                                    **({"stream_options": {"include_usage": True}}
                                       if include else {}))
                   for include in (True, False)}
        plain = _complete(client, prompt)
    assert header == "miss"
    assert upstream.calls == 1
    text = "".join(c.choices[0].text for c in original if c.choices)
    assert len(text) > 64  # replayed in several pieces
    finish = [c.choices[0].finish_reason for c in original if c.choices][-1]
    assert all(c.usage is None for c in original)  # the injected usage stayed hidden
    for include, (header, chunks) in replays.items():
        assert header == "hit; tier=exact"
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
        assert chunks[0].id != original[0].id
        assert all(c.object == "text_completion" for c in chunks)
        with_text = [c for c in chunks if c.choices]
        assert len(with_text) > 2
        assert "".join(c.choices[0].text for c in with_text) == text
        assert [c.choices[0].finish_reason for c in with_text][-1] == finish
        assert all(c.choices[0].finish_reason is None for c in with_text[:-1])
        usage = [c.usage for c in chunks if c.usage is not None]
        if include:
            assert not chunks[-1].choices and len(usage) == 1
            assert usage[0].completion_tokens == 40
        else:
            assert usage == []
    assert plain.headers["x-sidecar-cache"] == "hit; tier=exact"
    answer = plain.parse()
    assert answer.choices[0].text == text
    assert answer.usage is not None and answer.usage.completion_tokens == 40


def test_normalized_tier_matches_spacing_but_not_case(sidecars: SidecarFactory, local: str,
                                                      mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        first = _complete(client, "Q: What is the capital of Portugal?\nA:")
        settled(sidecars, local)
        hit = _complete(client, "Q: What is  the capital of   Portugal? \nA:")
        # The model continues a text in its own case (and unfenced code is common).
        cased = _complete(client, "q: what is the capital of PORTUGAL?\nA:")
    assert hit.headers["x-sidecar-cache"] == "hit; tier=normalized"
    assert hit.parse().choices[0].text == first.parse().choices[0].text
    assert cased.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


@pytest.mark.parametrize("second", [
    "Q: What is the capital of Spain?\nA",  # the ending is what the model continues
    "Q: What is the capital of Spain?\nA: ",
    "Q: What is the capital of Spain? A:",  # line breaks are the prompt's layout
    "  Q: What is the capital of Spain?\nA:",  # so is leading whitespace
])
def test_normalized_tier_keeps_what_the_model_continues(
        sidecars: SidecarFactory, local: str, mock: Mock, second: str) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        first = _complete(client, "Q: What is the capital of Spain?\nA:")
        settled(sidecars, local)
        other = _complete(client, second)
    assert other.headers["x-sidecar-cache"] == "miss"
    # The first is stored by the first case and a hit in the others.
    assert upstream.calls == 1 + (first.headers["x-sidecar-cache"] == "miss")


@pytest.mark.parametrize(("first", "second"), [
    ({"prompt": "What is 2+2?"}, {"prompt": "What is 2+3?"}),
    ({"prompt": "Count to ten:", "max_tokens": 5}, {"prompt": "Count to ten:", "max_tokens": 6}),
    ({"prompt": "def add(a, b):\n", "suffix": "\n\nprint(add(1, 2))"},
     {"prompt": "def add(a, b):\n", "suffix": "\n\nprint(add(1, 3))"}),
    ({"prompt": "The sky is", "model": "gpt-3.5-turbo-instruct"},
     {"prompt": "The sky is", "model": "davinci-002"}),
    ({"prompt": "Echo me", "echo": False}, {"prompt": "Echo me", "echo": True}),
])
def test_near_misses_do_not_hit(sidecars: SidecarFactory, local: str, mock: Mock,
                                first: dict[str, Any], second: dict[str, Any]) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        a = client.completions.with_raw_response.create(temperature=0, **{"model": MODEL,
                                                                          **first})
        settled(sidecars, local)
        b = client.completions.with_raw_response.create(temperature=0, **{"model": MODEL,
                                                                          **second})
    assert a.headers["x-sidecar-cache"] == "miss"
    assert b.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_only_deterministic_requests_are_cached(sidecars: SidecarFactory, local: str,
                                                mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        for kw in ({"temperature": 0.7}, {"temperature": 0, "n": 2},
                   {"temperature": 0, "best_of": 3}):
            for _ in range(2):
                sampled = _complete(client, "Write a haiku about the sea", **kw)
                settled(sidecars, local)
                assert "x-sidecar-cache" not in sampled.headers, kw
        assert upstream.calls == 6
        _complete(client, "Write a haiku about the sea", best_of=1)
        settled(sidecars, local)
        again = _complete(client, "Write a haiku about the sea", best_of=1)
        assert again.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 7


def test_errors_and_cut_streams_are_not_stored(sidecars: SidecarFactory, local: str,
                                               mock: Mock) -> None:
    with sdk(local) as client:
        with pytest.raises(openai.InternalServerError):  # (the sidecar may retry it)
            _complete(client, "A failing prompt", extra_headers={"x-mock-error": "500"})
        settled(sidecars, local)
        upstream = UpstreamCalls(mock, ROUTE)
        assert _complete(client, "A failing prompt").headers["x-sidecar-cache"] == "miss"
        assert upstream.calls == 1
        with pytest.raises(openai.APIError):  # the stream breaks off mid-way
            _stream(client, "A prompt cut short", extra_headers={"x-mock-disconnect": "mid-stream"})
        settled(sidecars, local)
        upstream = UpstreamCalls(mock, ROUTE)
        assert _complete(client, "A prompt cut short").headers["x-sidecar-cache"] == "miss"
        settled(sidecars, local)
        header, _ = _stream(client, "A prompt cut short")  # the whole answer was stored
        assert header == "hit; tier=exact"
    assert upstream.calls == 1


def test_several_prompts_are_cached_only_when_opted_in(sidecars: SidecarFactory, local: str,
                                                       mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    prompts = ["Translate 'cat' to French:", "Translate 'dog' to French:"]
    with sdk(local) as client:
        for _ in range(2):
            raw = _complete(client, prompts)
            settled(sidecars, local)
            assert "x-sidecar-cache" not in raw.headers
        assert upstream.calls == 2
        # Opted in, but the mock answers one choice for two prompts: not whole, not stored.
        opted = {"x-sidecar-cache": "on"}
        assert _complete(client, prompts, extra_headers=opted).headers[
            "x-sidecar-cache"] == "miss"
        settled(sidecars, local)
        assert _complete(client, prompts, extra_headers=opted).headers[
            "x-sidecar-cache"] == "miss"
    assert upstream.calls == 4


def test_opted_in_prompt_list_stores_and_replays_every_choice(
        sidecars: SidecarFactory, scripted: Scripted) -> None:
    def answer(request: dict[str, Any]) -> dict[str, Any]:
        return {"id": "cmpl-scripted", "object": "text_completion", "created": 1_700_000_000,
                "model": request["model"],
                "choices": [{"text": f" answer {i}: " + "x" * 80, "index": i,
                             "logprobs": None, "finish_reason": "stop"}
                            for i in range(len(request["prompt"]))],
                "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}}

    scripted.doc = answer
    url = sidecars.start(upstream=UpstreamConfig(base_url=scripted.url))
    prompts = ["First prompt", "Second prompt", "Third prompt"]
    opted = {"x-sidecar-cache": "on"}
    calls = scripted.calls
    with sdk(url) as client:
        first = _complete(client, prompts, extra_headers=opted)
        settled(sidecars, url)
        second = _complete(client, prompts, extra_headers=opted)
        header, chunks = _stream(client, prompts, extra_headers=opted,
                                 stream_options={"include_usage": True})
    assert scripted.calls - calls == 1
    assert first.headers["x-sidecar-cache"] == "miss"
    assert second.headers["x-sidecar-cache"] == "hit; tier=exact"
    expected = [(c.index, c.text, c.finish_reason) for c in first.parse().choices]
    assert len(expected) == 3
    assert [(c.index, c.text, c.finish_reason) for c in second.parse().choices] == expected
    assert header == "hit; tier=exact"
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finish[choice.index] = choice.finish_reason
    assert [(i, texts[i], finish[i]) for i in sorted(texts)] == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 14


# --- The pieces, in process ----------------------------------------------------

def _chunk(text: str | None, finish: str | None = None, index: int = 0,
           **extra: Any) -> bytes:
    return orjson.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                         "choices": [{"text": text, "index": index, "logprobs": None,
                                      "finish_reason": finish}], **extra})


def test_prompt_count() -> None:
    assert prompt_count("a") == 1
    assert prompt_count([1, 2, 3]) == 1
    assert prompt_count(["a"]) == 1
    assert prompt_count(["a", "b"]) == 2
    assert prompt_count([[1, 2], [3]]) == 2
    assert prompt_count([]) == 0
    assert prompt_count(None) == 0


def test_assembler_needs_a_finish_reason_and_done() -> None:
    whole = TextStreamAssembler()
    for data in (_chunk("Hel"), _chunk("lo"), _chunk("", "stop"),
                 b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
                 b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,'
                 b'"total_tokens":3}}', b"[DONE]"):
        whole.feed_event_data(data)
    doc = whole.result()
    assert doc is not None and complete_text(doc, 1)
    assert doc["choices"] == [{"text": "Hello", "index": 0, "logprobs": None,
                               "finish_reason": "stop"}]
    assert doc["usage"]["total_tokens"] == 3
    no_done = TextStreamAssembler()
    for data in (_chunk("Hel"), _chunk("", "stop")):
        no_done.feed_event_data(data)
    assert no_done.result() is None
    no_finish = TextStreamAssembler()
    for data in (_chunk("Hel"), b"[DONE]"):
        no_finish.feed_event_data(data)
    assert no_finish.result() is None
    filtered = TextStreamAssembler()
    for data in (_chunk("Hel"), _chunk("", "content_filter"), b"[DONE]"):
        filtered.feed_event_data(data)
    assert (doc := filtered.result()) is not None and not complete_text(doc, 1)
    broken = TextStreamAssembler()
    for data in (_chunk("Hel"), b"{not json", _chunk("", "stop"), b"[DONE]"):
        broken.feed_event_data(data)
    assert broken.result() is None
