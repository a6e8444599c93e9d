"""Responses API answers in the cache: the openai SDK through a sidecar, JSON and streams."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from proxy.cache.responses import ResponsesStreamAssembler, complete_response, response_events
from proxy.config import UpstreamConfig
from tests.conftest import Mock, Scripted, SidecarFactory, UpstreamCalls, sdk, settled

ROUTE = "POST /v1/responses"


def _ask(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    return client.responses.with_raw_response.create(model="gpt-4o-mini", input=text, **kw)


def test_repeat_is_a_hit_that_keeps_the_response_id(
        sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    calls = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        first = _ask(client, "Name a prime above 50.")
        settled(sidecars, local)
        second = _ask(client, "Name a prime above 50.")
    assert first.headers["x-sidecar-cache"] == "miss"
    assert second.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert calls.calls == 1
    a, b = first.parse(), second.parse()
    assert b.id == a.id  # a handle the upstream resolves: previous_response_id works
    assert b.output_text == a.output_text and b.usage == a.usage
    assert b.created_at >= a.created_at


def test_stream_hit_from_a_json_entry_satisfies_the_sdk_stream_helper(
        sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    calls = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        stored = _ask(client, "Describe a cache in one sentence.").parse()
        settled(sidecars, local)
        with client.responses.stream(model="gpt-4o-mini", temperature=0,
                                     input="Describe a cache in one sentence.") as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
    assert calls.calls == 1
    assert final.output_text == stored.output_text and final.id == stored.id
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds


def test_json_hit_from_a_streamed_entry(sidecars: SidecarFactory, local: str,
                                        mock: Mock) -> None:
    calls = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        with client.responses.stream(model="gpt-4o-mini", temperature=0,
                                     input="Stream me first.") as stream:
            streamed = stream.get_final_response()
        settled(sidecars, local)
        hit = _ask(client, "Stream me first.")
    assert hit.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert hit.parse().output_text == streamed.output_text
    assert calls.calls == 1


@pytest.mark.parametrize(("first", "second"), [
    ({}, {"store": False}),
    ({"previous_response_id": "resp_a"}, {"previous_response_id": "resp_b"}),
    ({"instructions": "Be brief."}, {"instructions": "Be thorough."}),
])
def test_store_chain_and_instructions_are_in_the_key(
        sidecars: SidecarFactory, local: str, mock: Mock, first: dict[str, Any],
        second: dict[str, Any]) -> None:
    calls = UpstreamCalls(mock, ROUTE)
    text = f"keyed {sorted(first)} {sorted(second)}"
    with sdk(local) as client:
        _ask(client, text, **first)
        settled(sidecars, local)
        other = _ask(client, text, **second)
    assert other.headers["x-sidecar-cache"] == "miss"
    assert calls.calls == 2


def test_conversation_requests_are_never_cached(sidecars: SidecarFactory, local: str,
                                                mock: Mock) -> None:
    calls = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        for _ in range(2):
            reply = _ask(client, "In a conversation.", conversation="conv_123")
            settled(sidecars, local)
            assert "x-sidecar-cache" not in reply.headers
    assert calls.calls == 2


@pytest.fixture(scope="module")
def rich(scripted: Scripted, sidecars: SidecarFactory) -> tuple[Scripted, str]:
    """The scripted upstream, and a sidecar in front of it."""
    return scripted, sidecars.start(upstream=UpstreamConfig(base_url=scripted.url))


RICH: dict[str, Any] = {
    "id": "resp_rich", "object": "response", "created_at": 1, "status": "completed",
    "model": "gpt-4o-mini-2024-07-18", "error": None, "incomplete_details": None,
    "instructions": None, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
    "temperature": 0.0, "top_p": 1.0, "metadata": {},
    "output": [
        {"id": "rs_1", "type": "reasoning", "summary": []},
        {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Lisbon", "unit": "celsius", "days": 3}',
         "status": "completed"},
        {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                      "text": "Checking the weather in Lisbon for the next three days."},
                     {"type": "refusal", "refusal": "I cannot book flights."}]}],
    "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
              "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 8},
              "total_tokens": 42}}


def test_function_calls_reasoning_and_refusals_replay_through_the_sdk(
        sidecars: SidecarFactory, rich: tuple[Scripted, str]) -> None:
    upstream, url = rich
    upstream.doc = RICH
    before = upstream.calls
    with sdk(url) as client:
        first = client.responses.create(model="gpt-4o-mini", input="rich", temperature=0)
        settled(sidecars, url)
        with client.responses.stream(model="gpt-4o-mini", input="rich",
                                     temperature=0) as stream:
            final = stream.get_final_response()
    assert upstream.calls - before == 1
    # exclude_none: the stream helper adds parse-only fields (parsed_arguments: None).
    assert final.model_dump(exclude={"created_at"}, exclude_none=True) == first.model_dump(
        exclude={"created_at"}, exclude_none=True)
    assert [o.type for o in final.output] == ["reasoning", "function_call", "message"]


def test_incomplete_responses_are_not_stored(sidecars: SidecarFactory,
                                             rich: tuple[Scripted, str]) -> None:
    upstream, url = rich
    upstream.doc = RICH | {"id": "resp_cut", "status": "incomplete",
                           "incomplete_details": {"reason": "max_output_tokens"}}
    before = upstream.calls
    with sdk(url) as client:
        client.responses.create(model="gpt-4o-mini", input="cut short", temperature=0)
        settled(sidecars, url)
        again = client.responses.with_raw_response.create(model="gpt-4o-mini",
                                                          input="cut short", temperature=0)
    assert again.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls - before == 2


def test_replayed_events_number_in_sequence_and_reassemble() -> None:
    events = response_events(RICH)
    docs = [orjson.loads(e.split(b"data: ", 1)[1]) for e in events]
    assert [d["sequence_number"] for d in docs] == list(range(len(docs)))
    assert all(e.startswith(b"event: " + d["type"].encode() + b"\n")
               for e, d in zip(events, docs, strict=True))
    text = "".join(d["delta"] for d in docs if d["type"] == "response.output_text.delta")
    args = "".join(d["delta"] for d in docs
                   if d["type"] == "response.function_call_arguments.delta")
    assert text == RICH["output"][2]["content"][0]["text"]
    assert args == RICH["output"][1]["arguments"]
    assembler = ResponsesStreamAssembler()
    for doc in docs:
        assembler.feed_event_data(orjson.dumps(doc))
    assert assembler.result() == RICH


@pytest.mark.parametrize(("doc", "ok"), [
    (RICH, True), (RICH | {"status": "in_progress"}, False), (RICH | {"output": None}, False),
    (RICH | {"error": {"code": "server_error"}}, False), ({"object": "list"}, False)])
def test_only_completed_responses_are_stored(doc: dict[str, Any], ok: bool) -> None:
    assert complete_response(doc) is ok
