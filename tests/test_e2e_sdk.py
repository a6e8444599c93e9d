"""End to end with the official openai SDK: agent -> sidecar -> mock upstream.

Each test compares what the agent sees through the sidecar with what it sees
talking to the mock directly: the sidecar must be invisible.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import Mock

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
MESSAGES: list[Any] = [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": "Say something about proxies."}]


def _dump(objs: list[Any]) -> list[dict[str, Any]]:
    return [o.model_dump() for o in objs]


def test_chat_non_streaming_is_identical(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    via = raw.parse()
    ref = direct.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert via.model_dump() == ref.model_dump()
    assert via.choices[0].message.content
    assert float(raw.headers["x-sidecar-overhead-ms"]) >= 0
    assert raw.headers["x-request-id"].startswith("req_")


def test_chat_tool_call_non_streaming(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
    ref = direct.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
    assert via.model_dump() == ref.model_dump()
    call = via.choices[0].message.tool_calls
    assert call and call[0].function.name == "get_weather"
    assert via.choices[0].finish_reason == "tool_calls"


def test_stream_without_usage_hides_the_injected_usage(
        client: openai.OpenAI, direct: openai.OpenAI, mock: Mock) -> None:
    via = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    sent = orjson.loads(mock.server.stats.last_requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}  # asked upstream ...
    ref = list(direct.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert _dump(via) == _dump(ref)  # ... yet the client sees exactly the plain stream
    assert all(c.usage is None and c.choices for c in via)
    assert via[-1].choices[0].finish_reason == "stop"


def test_stream_with_usage_passes_usage_chunk(client: openai.OpenAI,
                                              direct: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "stream": True,
                              "stream_options": {"include_usage": True}}
    via = list(client.chat.completions.create(**kwargs))
    ref = list(direct.chat.completions.create(**kwargs))
    assert _dump(via) == _dump(ref)
    assert via[-1].choices == [] and via[-1].usage is not None
    assert via[-1].usage.completion_tokens == len(via) - 3  # role chunk, words, stop chunk


def test_stream_tool_calls(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "tools": TOOLS,
                              "stream": True}
    via = list(client.chat.completions.create(**kwargs))
    ref = list(direct.chat.completions.create(**kwargs))
    assert _dump(via) == _dump(ref)
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                   for c in via if c.choices and c.choices[0].delta.tool_calls)
    assert "city" in orjson.loads(args)


def test_async_client_chat_and_stream(sidecar: str, mock: Mock,
                                      run_async: Callable[[Coroutine[Any, Any, Any]], Any],
                                      ) -> None:
    async def go() -> tuple[list[Any], list[Any]]:
        out = []
        for base in (sidecar, mock.url):
            async with openai.AsyncOpenAI(base_url=base, api_key="sk-a", max_retries=0) as c:
                plain = await c.chat.completions.create(model="m", messages=MESSAGES)
                stream = await c.chat.completions.create(model="m", messages=MESSAGES,
                                                         stream=True)
                chunks = [ch.model_dump() async for ch in stream]
                out.append([plain.model_dump(), chunks])
        return out[0], out[1]

    via, ref = run_async(go())
    assert via == ref
    assert len(via[1]) > 3


def test_completions(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon")
    ref = direct.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon")
    assert via.model_dump() == ref.model_dump()
    via_s = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once",
                                           stream=True))
    ref_s = list(direct.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once",
                                           stream=True))
    assert _dump(via_s) == _dump(ref_s)
    assert all(c.usage is None for c in via_s)


def test_embeddings_base64_and_float(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    inputs = ["alpha", "beta gamma"]
    via = client.embeddings.create(model="text-embedding-3-small", input=inputs)
    ref = direct.embeddings.create(model="text-embedding-3-small", input=inputs)
    assert via.model_dump() == ref.model_dump()
    assert len(via.data) == 2 and len(via.data[0].embedding) > 0
    fl = client.embeddings.create(model="text-embedding-3-small", input="alpha",
                                  encoding_format="float", dimensions=8)
    assert len(fl.data[0].embedding) == 8


def test_responses_plain_and_streamed(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via = client.responses.create(model="gpt-4o", input="Tell me a fact.")
    ref = direct.responses.create(model="gpt-4o", input="Tell me a fact.")
    assert via.output_text and via.output_text == ref.output_text
    assert via.usage is not None and via.usage.output_tokens > 0
    via_events = [e.model_dump() for e in
                  client.responses.create(model="gpt-4o", input="Hi", stream=True)]
    ref_events = [e.model_dump() for e in
                  direct.responses.create(model="gpt-4o", input="Hi", stream=True)]
    assert [e["type"] for e in via_events] == [e["type"] for e in ref_events]
    assert via_events[-1]["type"] == "response.completed"
    assert via_events[-1]["response"]["output"] == ref_events[-1]["response"]["output"]


def test_models_list_and_unknown_model_404(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert "gpt-4o" in ids
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.status_code == 404


def test_file_upload_and_byte_exact_download(client: openai.OpenAI) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    created = client.files.create(file=("blob.bin", data), purpose="assistants")
    assert created.bytes == len(data)
    assert client.files.retrieve(created.id).filename == "blob.bin"
    assert client.files.content(created.id).read() == data
    assert client.files.delete(created.id).deleted


@pytest.mark.parametrize(("status", "exc"), [
    (400, openai.BadRequestError), (401, openai.AuthenticationError),
    (429, openai.RateLimitError), (500, openai.InternalServerError)])
def test_upstream_errors_pass_through_unchanged(client: openai.OpenAI, direct: openai.OpenAI,
                                                status: int, exc: type[Exception]) -> None:
    hdrs = {"x-mock-error": str(status)}
    with pytest.raises(exc) as via:
        client.chat.completions.create(model="m", messages=MESSAGES, extra_headers=hdrs)
    with pytest.raises(exc) as ref:
        direct.chat.completions.create(model="m", messages=MESSAGES, extra_headers=hdrs)
    v, r = via.value, ref.value
    assert isinstance(v, openai.APIStatusError) and isinstance(r, openai.APIStatusError)
    assert v.status_code == status
    assert v.body == r.body
    assert "x-sidecar-error" not in v.response.headers  # the upstream's error, not ours
    for name in ("retry-after", "retry-after-ms", "x-ratelimit-remaining-requests"):
        assert v.response.headers.get(name) == r.response.headers.get(name)
    if status == 429:
        assert v.response.headers["retry-after"] == "7"

