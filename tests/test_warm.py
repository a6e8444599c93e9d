"""``llm-sidecar warm``: a JSONL file fills the shared cache that live sidecars then serve."""

from __future__ import annotations

import io
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import openai
import orjson
import pytest

from proxy.cli import main
from proxy.config import CacheConfig, SidecarConfig, UpstreamConfig
from proxy.warm import Item, Tally, parse_line, warm
from tests.conftest import CHAT_ROUTE, Mock, SidecarFactory
from tests.redis_server import RedisServer

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
KEY = "sk-warm-tenant"
EMB_ROUTE = "POST /v1/embeddings"


def _chat(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "temperature": 0,
            "messages": [{"role": "user", "content": text}]} | kw


def _lines(*docs: Any) -> io.StringIO:
    return io.StringIO("".join((d if isinstance(d, str) else orjson.dumps(d).decode()) + "\n"
                               for d in docs))


def _cfg(mock: Mock, redis_url: str | None) -> SidecarConfig:
    return SidecarConfig(upstream=UpstreamConfig(base_url=mock.url),
                         cache=CacheConfig(redis_url=redis_url))


def _warm(run: Run[Tally], cfg: SidecarConfig, stream: io.StringIO, **kw: Any) -> Tally:
    kw.setdefault("via", None)
    kw.setdefault("concurrency", 1)
    return run(warm(cfg, stream, total=None, api_key=KEY, **kw))


def test_warmed_entries_are_served_by_a_sidecar_on_the_same_redis(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock,
        run_async: Run[Tally]) -> None:
    given = {"id": "chatcmpl-from-file", "object": "chat.completion", "created": 1,
             "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant",
                                                             "content": "From the file."}}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    stats = mock.server.stats
    chats, embeds = stats.requests[CHAT_ROUTE], stats.requests[EMB_ROUTE]
    stream = _lines(
        _chat("warm question one"),
        {"custom_id": "b-1", "method": "POST", "url": "/v1/chat/completions",
         "body": _chat("warm question two", stream=True)},
        {"custom_id": "b-2", "response": {"status_code": 200, "body": given},
         "body": _chat("answered in the file")},
        {"model": "text-embedding-3-small", "input": ["warm a", "warm b"]},
        _chat("warm question one"),  # a repeat: already cached by then
        _chat("creative", temperature=0.9),  # never looked up, so not cached
        "{not json",
        {"body": {"model": "x"}},
    )
    tally = _warm(run_async, _cfg(mock, redis_server.url), stream)
    assert tally.outcomes == {"stored": 3, "given": 1, "cached": 1, "uncacheable": 1,
                              "invalid": 2}
    assert tally.invalid == ["line 7: not JSON", "line 8: no endpoint: give url, or a body "
                             "with messages, input or prompt"]
    assert stats.requests[CHAT_ROUTE] - chats == 3  # one, two, creative; not the file's
    assert stats.requests[EMB_ROUTE] - embeds == 1

    url = sidecars.start(cache=CacheConfig(redis_url=redis_server.url))
    chats = stats.requests[CHAT_ROUTE]
    with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=20) as client:
        one = client.chat.completions.with_raw_response.create(**_chat("warm question one"))
        two = client.chat.completions.with_raw_response.create(**_chat("warm question two"))
        filed = client.chat.completions.with_raw_response.create(
            **_chat("answered in the file"))
        emb = client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["warm b", "warm a"])
    for reply in (one, two, filed, emb):
        assert reply.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert filed.parse().choices[0].message.content == "From the file."
    assert stats.requests[CHAT_ROUTE] == chats


def test_entries_land_in_the_warming_keys_tenant(
        sidecars: SidecarFactory, redis_server: RedisServer, mock: Mock,
        run_async: Run[Tally]) -> None:
    _warm(run_async, _cfg(mock, redis_server.url), _lines(_chat("tenant scoped")))
    url = sidecars.start(cache=CacheConfig(redis_url=redis_server.url))
    with openai.OpenAI(base_url=url, api_key="sk-someone-else", max_retries=0,
                       timeout=20) as client:
        other = client.chat.completions.with_raw_response.create(**_chat("tenant scoped"))
    assert other.headers["x-sidecar-cache"] == "miss"


def test_via_a_running_sidecar_warms_its_local_cache(
        sidecars: SidecarFactory, mock: Mock, run_async: Run[Tally]) -> None:
    url = sidecars.start()
    tally = _warm(run_async, _cfg(mock, None), _lines(_chat("via one"), _chat("via two")),
                  via=url, concurrency=4)
    assert tally.outcomes == {"stored": 2}
    with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=20) as client:
        hit = client.chat.completions.with_raw_response.create(**_chat("via two"))
    assert hit.headers["x-sidecar-cache"] == "hit; tier=exact"


def test_upstream_failures_are_retried_then_counted(
        redis_server: RedisServer, mock: Mock, run_async: Run[Tally]) -> None:
    before = mock.server.stats.requests[CHAT_ROUTE]
    stream = _lines({"body": _chat("always fails"), "headers": {"x-mock-error": "500"}},
                    _chat("works"))
    tally = _warm(run_async, _cfg(mock, redis_server.url), stream, retries=2,
                  retry_delay_s=0.01)
    assert tally.outcomes == {"failed": 1, "stored": 1}
    assert tally.failures == {"HTTP 500": 1}
    assert mock.server.stats.requests[CHAT_ROUTE] - before == 4  # 1 + 2 retries, then works
    assert "1 fetched and stored, 1 failed (HTTP 500: 1)" in tally.summary()


@pytest.mark.parametrize(("line", "want"), [
    (orjson.dumps(_chat("hi", stream=True, stream_options={"include_usage": True})),
     Item(1, "/chat/completions", orjson.dumps(_chat("hi")), {}, None)),
    (orjson.dumps({"url": "/v1/embeddings?x=1", "body": {"model": "e", "input": "t"},
                   "headers": {"x-sidecar-cache-ttl": "60"}}),
     Item(1, "/embeddings", b'{"model":"e","input":"t"}', {"x-sidecar-cache-ttl": "60"},
          None)),
    (orjson.dumps({"body": {"model": "m", "prompt": "p"},
                   "response": {"status_code": 500, "body": {"error": {}}}}),
     Item(1, "/completions", b'{"model":"m","prompt":"p"}', {}, None)),
    (b"[1, 2]", "not a JSON object"),
    (orjson.dumps({"url": "/v1/files", "body": {}}),
     "no endpoint: give url, or a body with messages, input or prompt"),
    (orjson.dumps({"body": _chat("x"), "headers": {"a": 1}}),
     "headers must map names to strings"),
    (orjson.dumps({"body": _chat("x"), "response": "text"}), "response must be a JSON object"),
])
def test_lines_are_parsed_or_explained(line: bytes, want: Item | str) -> None:
    assert parse_line(1, line.decode()) == want


def test_without_redis_or_via_warm_refuses_and_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text(orjson.dumps(_chat("x")).decode() + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["warm", str(requests)])
    assert exit_.value.code == 2
    assert "cache.redis_url is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["warm", str(tmp_path / "absent.jsonl")])
    assert exit_.value.code == 2
    assert "absent.jsonl: No such file or directory" in capsys.readouterr().err


def test_progress_is_reported_by_tenths_off_a_terminal(
        redis_server: RedisServer, mock: Mock, run_async: Run[Tally]) -> None:
    out = io.StringIO()
    stream = _lines(*(_chat(f"progress {i}") for i in range(20)))
    tally = run_async(warm(_cfg(mock, redis_server.url), stream, total=20, via=None,
                           concurrency=4, api_key=KEY, progress_out=out))
    assert tally.done == 20
    lines = out.getvalue().splitlines()
    assert lines[-1] == "warm: 20/20 (100%)"
    assert len(lines) == 10
