"""Cache replay and stream assembly, checked against the official SDK's own parsing.

A cached ``chat.completion`` replayed as SSE must be rebuilt by the OpenAI SDK
into the same message, and a streamed answer fed to ``ChatStreamAssembler``
must give back the ``chat.completion`` the cache stores.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import orjson
import pytest
from openai._streaming import SSEDecoder
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from proxy.cache.assemble import ChatStreamAssembler
from proxy.cache.replay import fresh_completion, new_completion_id, sse_chunks

NOW = 1_760_000_000
NEW_ID = "chatcmpl-NEWid0123456789abcdefghijklmnopq"

USAGE: dict[str, Any] = {
    "prompt_tokens": 412,
    "completion_tokens": 97,
    "total_tokens": 509,
    "prompt_tokens_details": {"cached_tokens": 256, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                  "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}


def _completion(message: dict[str, Any], finish_reason: str,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-BxOriginal0000000000000000000",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
        "usage": copy.deepcopy(USAGE),
        "service_tier": "default",
        "system_fingerprint": "fp_0ba0d124f1",
    }


TEXT = _completion({
    "role": "assistant",
    "content": ("Sure! Here is a short answer with some unicode: café, naïve, 日本語, "
                "and an emoji 🚀🎉 that must survive slicing. " * 4).strip(),
    "refusal": None,
}, "stop")

TOOLS = _completion({
    "role": "assistant",
    "content": None,
    "refusal": None,
    "tool_calls": [
        {"id": "call_Q2FsbCBvbmUgZm9yIHdlYXRoZXI", "type": "function",
         "function": {"name": "get_weather",
                      "arguments": '{"location": "Paris, France", "unit": "celsius", '
                                   '"include_forecast": true, "days": 3}'}},
        {"id": "call_U2Vjb25kIGNhbGwgZm9yIHRpbWU", "type": "function",
         "function": {"name": "get_local_time",
                      "arguments": '{"timezone": "Europe/Paris"}'}},
    ],
}, "tool_calls")

REFUSAL = _completion({
    "role": "assistant",
    "content": None,
    "refusal": "I'm sorry, but I can't help with creating that kind of content.",
}, "stop")

LOGPROBS = _completion(
    {"role": "assistant", "content": "Hello there", "refusal": None},
    "stop",  # not "length": the SDK's get_final_completion() raises on it
    logprobs={"content": [
        {"token": "Hello", "logprob": -0.01, "bytes": [72, 101, 108, 108, 111],
         "top_logprobs": [{"token": "Hello", "logprob": -0.01,
                           "bytes": [72, 101, 108, 108, 111]}]},
        {"token": " there", "logprob": -0.5, "bytes": [32, 116, 104, 101, 114, 101],
         "top_logprobs": [{"token": " there", "logprob": -0.5,
                           "bytes": [32, 116, 104, 101, 114, 101]}]},
    ], "refusal": None},
)

CASES = {"text": TEXT, "tools": TOOLS, "refusal": REFUSAL, "logprobs": LOGPROBS}
ALL = pytest.mark.parametrize("stored", list(CASES.values()), ids=list(CASES))


def _sdk_events(events: list[bytes]) -> list[str]:
    """The ``data`` of every event, as the SDK's SSE decoder reads the byte stream."""
    body = b"".join(events)
    # Cut the stream at awkward places, as a socket would.
    pieces = [body[i:i + 13] for i in range(0, len(body), 13)]
    return [sse.data for sse in SSEDecoder().iter_bytes(iter(pieces))]


def _sdk_final(events: list[bytes]) -> Any:
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    datas = _sdk_events(events)
    assert datas[-1] == "[DONE]"
    for data in datas[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(orjson.loads(data)))
    return state.get_final_completion()


def _payloads(events: list[bytes]) -> list[bytes]:
    for event in events:
        assert event.startswith(b"data: ")
        assert event.endswith(b"\n\n")
        assert event.count(b"\n") == 2
    return [event[len(b"data: "):-2] for event in events]


def _chunks(events: list[bytes]) -> list[dict[str, Any]]:
    payloads = _payloads(events)
    assert payloads[-1] == b"[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]]


def _as_stored(stored: dict[str, Any], new_id: str = NEW_ID, now: int = NOW) -> dict[str, Any]:
    return {**stored, "id": new_id, "created": now}


# -- replay parsed by the SDK ------------------------------------------------------------


@ALL
@pytest.mark.parametrize("piece_chars", [1, 7, 64])
@pytest.mark.parametrize("include_usage", [False, True])
def test_sdk_rebuilds_the_stored_message(stored: dict[str, Any], piece_chars: int,
                                         include_usage: bool) -> None:
    events = sse_chunks(stored, now=NOW, new_id=NEW_ID, include_usage=include_usage,
                        piece_chars=piece_chars)
    final = _sdk_final(events)
    want = stored["choices"][0]

    assert final.id == NEW_ID
    assert final.created == NOW
    assert final.model == stored["model"]
    assert final.system_fingerprint == stored["system_fingerprint"]
    assert final.service_tier == stored["service_tier"]
    assert len(final.choices) == 1
    choice = final.choices[0]
    assert choice.finish_reason == want["finish_reason"]
    assert choice.message.role == "assistant"
    assert choice.message.content == want["message"]["content"]
    assert choice.message.refusal == want["message"]["refusal"]
    got_calls = [{"id": c.id, "type": c.type,
                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                 for c in choice.message.tool_calls or []]
    assert got_calls == want["message"].get("tool_calls", [])
    if want["logprobs"] is None:
        assert choice.logprobs is None
    else:
        assert choice.logprobs is not None
        assert choice.logprobs.model_dump() == want["logprobs"]
    if include_usage:
        assert final.usage is not None
        assert final.usage.model_dump(exclude_none=True) == stored["usage"]
    else:
        assert final.usage is None


@ALL
def test_every_chunk_validates_as_a_sdk_chunk(stored: dict[str, Any]) -> None:
    events = sse_chunks(stored, now=NOW, new_id=NEW_ID, include_usage=True, piece_chars=5)
    for chunk in _chunks(events):
        parsed = ChatCompletionChunk.model_validate(chunk)
        assert parsed.object == "chat.completion.chunk"
        assert parsed.id == NEW_ID
        assert parsed.created == NOW
        assert parsed.model == stored["model"]
        assert parsed.system_fingerprint == stored["system_fingerprint"]


@ALL
def test_fresh_completion_validates_as_a_sdk_completion(stored: dict[str, Any]) -> None:
    parsed = ChatCompletion.model_validate(orjson.loads(fresh_completion(stored, NOW, NEW_ID)))
    assert parsed.id == NEW_ID
    assert parsed.choices[0].message.content == stored["choices"][0]["message"]["content"]


def test_chunk_sequence_follows_openai() -> None:
    chunks = _chunks(sse_chunks(TEXT, now=NOW, new_id=NEW_ID, include_usage=False,
                                piece_chars=64))
    first, *middle, last = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "",
                                                       "refusal": None},
                                 "logprobs": None, "finish_reason": None}]
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": "stop"}]
    content = TEXT["choices"][0]["message"]["content"]
    pieces = [c["choices"][0]["delta"]["content"] for c in middle]
    assert "".join(pieces) == content
    assert all(len(p) <= 64 for p in pieces)
    assert len(pieces) == -(-len(content) // 64)
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    for chunk in chunks:
        assert list(chunk)[:4] == ["id", "object", "created", "model"]


def test_tool_calls_are_announced_then_streamed() -> None:
    chunks = _chunks(sse_chunks(TOOLS, now=NOW, new_id=NEW_ID, include_usage=False,
                                piece_chars=10))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    # A tool-call answer keeps its null content, as OpenAI streams it.
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    calls = TOOLS["choices"][0]["message"]["tool_calls"]
    first_for = {}
    for position, delta in enumerate(deltas[1:-1], start=1):
        (call,) = delta["tool_calls"]
        if "id" in call:
            first_for[call["index"]] = position
            want = calls[call["index"]]
            assert call == {"index": call["index"], "id": want["id"], "type": "function",
                            "function": {"name": want["function"]["name"], "arguments": ""}}
        else:
            assert set(call) == {"index", "function"}
            assert set(call["function"]) == {"arguments"}
            assert 0 < len(call["function"]["arguments"]) <= 10
    assert sorted(first_for) == [0, 1]
    assert first_for[0] == 1
    assert first_for[1] == 2 + -(-len(calls[0]["function"]["arguments"]) // 10)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_refusal_is_streamed_in_pieces() -> None:
    chunks = _chunks(sse_chunks(REFUSAL, now=NOW, new_id=NEW_ID, include_usage=False,
                                piece_chars=8))
    pieces = [c["choices"][0]["delta"]["refusal"] for c in chunks[1:-1]]
    assert "".join(pieces) == REFUSAL["choices"][0]["message"]["refusal"]
    assert all(0 < len(p) <= 8 for p in pieces)


def test_piece_chars_must_be_positive() -> None:
    with pytest.raises(ValueError, match="piece_chars"):
        sse_chunks(TEXT, now=NOW, new_id=NEW_ID, include_usage=False, piece_chars=0)


# -- include_usage ---------------------------------------------------------------------


@ALL
def test_without_include_usage_there_is_no_usage(stored: dict[str, Any]) -> None:
    events = sse_chunks(stored, now=NOW, new_id=NEW_ID, include_usage=False)
    assert events[-1] == b"data: [DONE]\n\n"
    for chunk in _chunks(events):
        assert "usage" not in chunk
        assert chunk["choices"] != []


@ALL
def test_with_include_usage_the_last_chunk_carries_it(stored: dict[str, Any]) -> None:
    events = sse_chunks(stored, now=NOW, new_id=NEW_ID, include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    *others, usage_chunk = _chunks(events)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == stored["usage"]
    assert usage_chunk["id"] == NEW_ID
    assert others
    for chunk in others:
        assert "usage" in chunk
        assert chunk["usage"] is None
        assert len(chunk["choices"]) == 1


# -- assembler -------------------------------------------------------------------------


def _assemble(events: list[bytes]) -> dict[str, Any] | None:
    assembler = ChatStreamAssembler()
    for payload in _payloads(events):
        assembler.feed_event_data(payload)
    return assembler.result()


@ALL
@pytest.mark.parametrize("piece_chars", [1, 64])
def test_assembler_gives_back_the_stored_completion(stored: dict[str, Any],
                                                    piece_chars: int) -> None:
    events = sse_chunks(stored, now=NOW, new_id=NEW_ID, include_usage=True,
                        piece_chars=piece_chars)
    assembled = _assemble(events)
    assert assembled == _as_stored(stored)
    ChatCompletion.model_validate(assembled)


def test_assembler_without_usage_chunk_has_no_usage() -> None:
    assembled = _assemble(sse_chunks(TOOLS, now=NOW, new_id=NEW_ID, include_usage=False))
    assert assembled is not None
    assert "usage" not in assembled
    assert assembled["choices"] == TOOLS["choices"]


def test_assembler_accepts_decoded_chunks_and_ignores_done() -> None:
    events = sse_chunks(TEXT, now=NOW, new_id=NEW_ID, include_usage=True)
    assembler = ChatStreamAssembler()
    for chunk in _chunks(events):
        assembler.feed(chunk)
    assembler.feed_event_data(b"[DONE]")
    assembler.feed_event_data(b"")  # an event with no data (keep-alive comment)
    assert not assembler.broken
    assert assembler.result() == _as_stored(TEXT)


@ALL
def test_stream_without_finish_is_not_cached(stored: dict[str, Any]) -> None:
    events = sse_chunks(stored, now=NOW, new_id=NEW_ID, include_usage=True)
    # events: ..., finish chunk, usage chunk, [DONE]
    assert b'"finish_reason":"' in events[-3]
    assert _assemble(events[:-3] + events[-2:]) is None
    assert _assemble(events[:-3]) is None  # cut mid-stream


def test_two_choices_are_not_cached() -> None:
    events = sse_chunks(TEXT, now=NOW, new_id=NEW_ID, include_usage=False)
    second = [e.replace(b'"index":0', b'"index":1') for e in events[:-1]]
    assert _assemble(events[:-1] + second + [events[-1]]) is None
    # Only a choice with index 1: not a single-choice answer either.
    assert _assemble(second) is None


def test_garbage_event_data_breaks_the_stream() -> None:
    events = sse_chunks(TEXT, now=NOW, new_id=NEW_ID, include_usage=True)
    payloads = _payloads(events)
    assembler = ChatStreamAssembler()
    assembler.feed_event_data(payloads[0])
    assembler.feed_event_data(b'{"id": "chatcmpl-x", "choices": [')
    for payload in payloads[1:]:
        assembler.feed_event_data(payload)
    assert assembler.broken
    assert assembler.result() is None

    assembler = ChatStreamAssembler()
    for payload in payloads:
        assembler.feed_event_data(payload)
    assembler.feed_event_data(b"\xff\xfe not json")
    assert assembler.result() is None


def test_error_chunk_breaks_the_stream() -> None:
    chunks = _chunks(sse_chunks(TEXT, now=NOW, new_id=NEW_ID, include_usage=False))
    assembler = ChatStreamAssembler()
    for chunk in chunks[:-1]:
        assembler.feed(chunk)
    assembler.feed({"error": {"message": "The server had an error", "type": "server_error"}})
    assembler.feed(chunks[-1])
    assert assembler.result() is None


def _openai_like_stream() -> list[dict[str, Any]]:
    """Chunks shaped as OpenAI sends them for two parallel tool calls with logprobs."""
    head = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1_700_000_001,
            "model": "gpt-4o-2024-08-06", "service_tier": "default",
            "system_fingerprint": "fp_abc", "usage": None}

    def chunk(delta: dict[str, Any] | None, finish: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}]}

    token = {"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}
    return [
        chunk({"role": "assistant", "content": None, "refusal": None,
               "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "lookup", "arguments": ""}}]},
              logprobs={"content": [token], "refusal": None}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "t'}}]},
              logprobs={"content": [token, token], "refusal": None}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ea"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "now", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk(None),  # a null delta is tolerated
        chunk({}, "tool_calls"),
        {**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9,
                                          "total_tokens": 14}},
    ]


def test_assembler_merges_an_upstream_tool_call_stream() -> None:
    assembler = ChatStreamAssembler()
    for chunk in _openai_like_stream():
        assembler.feed(chunk)
    token = {"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}
    assert assembler.result() == {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1_700_000_001,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant", "content": None, "refusal": None,
                "tool_calls": [
                    {"id": "call_a", "type": "function",
                     "function": {"name": "lookup", "arguments": '{"q": "tea"}'}},
                    {"id": "call_b", "type": "function",
                     "function": {"name": "now", "arguments": "{}"}},
                ],
            },
            "logprobs": {"content": [token, token, token], "refusal": None},
            "finish_reason": "tool_calls",
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        "service_tier": "default",
        "system_fingerprint": "fp_abc",
    }


def test_tool_call_deltas_without_index_are_merged() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    assembler = ChatStreamAssembler()
    for delta in [
        {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
        {"tool_calls": [{"function": {"arguments": '{"x":'}}]},
        {"tool_calls": [{"function": {"arguments": " 1}"}}]},
        {"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "{}"}}]},
    ]:
        assembler.feed({**head, "choices": [{"index": 0, "delta": delta}]})
    assembler.feed({**head, "choices": [{"index": 0, "delta": {},
                                         "finish_reason": "tool_calls"}]})
    result = assembler.result()
    assert result is not None
    assert result["choices"][0]["message"]["tool_calls"] == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


BAD_CHUNKS: dict[str, Any] = {
    "not an object": [1, 2, 3],
    "choices not a list": {"choices": {"index": 0}},
    "choice not an object": {"choices": ["x"]},
    "choice without index": {"choices": [{"delta": {"content": "x"}}]},
    "bool index": {"choices": [{"index": True, "delta": {}}]},
    "delta not an object": {"choices": [{"index": 0, "delta": "hi"}]},
    "content not a string": {"choices": [{"index": 0, "delta": {"content": 5}}]},
    "tool_calls not a list": {"choices": [{"index": 0, "delta": {"tool_calls": {}}}]},
    "tool call not an object": {"choices": [{"index": 0, "delta": {"tool_calls": [3]}}]},
    "arguments not a string": {"choices": [{"index": 0, "delta": {
        "tool_calls": [{"index": 0, "function": {"arguments": {"a": 1}}}]}}]},
    "negative tool index": {"choices": [{"index": 0, "delta": {
        "tool_calls": [{"index": -1, "id": "x"}]}}]},
    "logprobs not an object": {"choices": [{"index": 0, "delta": {}, "logprobs": [1]}]},
    "created not an int": {"created": "yesterday", "choices": []},
    "usage not an object": {"usage": "lots", "choices": []},
    "audio delta": {"choices": [{"index": 0, "delta": {"audio": {"id": "a", "data": "AA"}}}]},
}


@pytest.mark.parametrize("bad", list(BAD_CHUNKS.values()), ids=list(BAD_CHUNKS))
def test_odd_chunks_make_the_result_none_without_raising(bad: Any) -> None:
    chunks = _chunks(sse_chunks(TEXT, now=NOW, new_id=NEW_ID, include_usage=False))
    assembler = ChatStreamAssembler()
    for chunk in chunks[:2]:
        assembler.feed(chunk)
    assembler.feed(bad)
    for chunk in chunks[2:]:
        assembler.feed(chunk)
    assert assembler.result() is None


def test_missing_keys_are_tolerated_when_harmless() -> None:
    head = {"id": "c", "created": 1, "model": "m"}
    assembler = ChatStreamAssembler()
    assembler.feed({**head})  # no choices at all
    assembler.feed({**head, "choices": None})
    assembler.feed({**head, "choices": [{"index": 0}]})  # no delta
    assembler.feed({**head, "choices": [{"index": 0, "delta": {"content": "hi"}}]})
    assembler.feed({**head, "choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]})
    assembler.feed({**head, "choices": [{"index": 0, "delta": None, "finish_reason": "stop"}]})
    assert assembler.result() == {
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi",
                                             "refusal": None, "reasoning_content": "hm"},
                     "logprobs": None, "finish_reason": "stop"}],
    }


def test_empty_stream_has_no_result() -> None:
    assembler = ChatStreamAssembler()
    assert assembler.result() is None
    assembler.feed_event_data(b"[DONE]")
    assert assembler.result() is None


# -- fresh id and created --------------------------------------------------------------


@ALL
def test_fresh_completion_has_new_id_and_created_but_original_usage(
        stored: dict[str, Any]) -> None:
    before = copy.deepcopy(stored)
    out = orjson.loads(fresh_completion(stored, NOW, NEW_ID))
    assert out["id"] == NEW_ID != stored["id"]
    assert out["created"] == NOW != stored["created"]
    assert out["usage"] == USAGE
    assert out["choices"] == stored["choices"]
    assert out["model"] == stored["model"]
    assert out == _as_stored(stored)
    assert stored == before  # the cached object is not modified


def test_replay_does_not_modify_the_stored_object() -> None:
    before = copy.deepcopy(TOOLS)
    sse_chunks(TOOLS, now=NOW, new_id=NEW_ID, include_usage=True, piece_chars=3)
    assert before == TOOLS


def test_new_completion_ids_are_random_and_shaped_like_openai() -> None:
    ids = {new_completion_id() for _ in range(2000)}
    assert len(ids) == 2000
    pattern = re.compile(r"^chatcmpl-[A-Za-z0-9]{29}$")
    assert all(pattern.fullmatch(i) for i in ids)
    # Every symbol of the alphabet shows up: no truncated or biased table.
    assert len(set("".join(i[len("chatcmpl-"):] for i in ids))) == 62
