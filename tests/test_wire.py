"""Units of the wire package: SSE splitting, the usage tap, parsing, header rules."""

from __future__ import annotations

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.wire.canonical import BadRequestBody, Endpoint, parse_request
from proxy.wire.headers import bearer_token, client_response_headers, upstream_request_headers
from proxy.wire.sse import SSESplitter, StreamTap, event_data
from proxy.wire.usage import ResponseSummary, Usage

STREAM = (b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
          b'data: {"id":"a","choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
          b'data: {"id":"a","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
          b'"total_tokens":5}}\n\n'
          b"data: [DONE]\n\n")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 1000])
def test_splitter_returns_whole_events_whatever_the_read_sizes(size: int) -> None:
    splitter = SSESplitter()
    events = []
    for i in range(0, len(STREAM), size):
        events += splitter.feed(STREAM[i:i + size])
    assert b"".join(events) == STREAM
    assert len(events) == 4
    assert all(e.endswith(b"\n\n") for e in events)
    assert splitter.remainder() == b""


def test_splitter_handles_crlf_and_keeps_unterminated_tail() -> None:
    splitter = SSESplitter()
    events = splitter.feed(b"event: x\r\ndata: 1\r\n\r\ndata: 2\n\ndata: 3")
    assert events == [b"event: x\r\ndata: 1\r\n\r\n", b"data: 2\n\n"]
    assert splitter.remainder() == b"data: 3"
    assert event_data(events[0]) == b"1"


def test_event_data_joins_multiline_data() -> None:
    assert event_data(b"event: e\ndata: {\"a\":\ndata:1}\n\n") == b'{"a":\n1}'


def test_tap_hides_injected_usage_exactly() -> None:
    tap = StreamTap(Endpoint.CHAT, hide_usage=True)
    out = [tap.process(e) for e in SSESplitter().feed(STREAM)]
    assert out == [
        b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}]}\n\n',
        b'data: {"id":"a","choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
        None,
        b"data: [DONE]\n\n",
    ]
    assert tap.usage == Usage(3, 2, 5)
    assert tap.done


def test_tap_hides_usage_null_that_is_not_last_key() -> None:
    tap = StreamTap(Endpoint.CHAT, hide_usage=True)
    event = b'data: {"id":"a","usage": null,"choices":[{"delta":{"content":"x"}}]}\n\n'
    out = tap.process(event)
    assert out is not None
    assert orjson.loads(event_data(out)) == {"id": "a", "choices": [{"delta": {"content": "x"}}]}


def test_tap_passes_everything_when_client_asked_for_usage() -> None:
    tap = StreamTap(Endpoint.CHAT, hide_usage=False)
    events = SSESplitter().feed(STREAM)
    assert [tap.process(e) for e in events] == events
    assert tap.usage == Usage(3, 2, 5)


def test_tap_reads_usage_from_responses_completed_event() -> None:
    tap = StreamTap(Endpoint.RESPONSES, hide_usage=False)
    event = (b'event: response.completed\ndata: {"type":"response.completed","response":'
             b'{"usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10,'
             b'"output_tokens_details":{"reasoning_tokens":2}}}}\n\n')
    assert tap.process(event) == event
    assert tap.usage == Usage(4, 6, 10, reasoning_tokens=2)
    assert tap.done


def test_usage_from_body() -> None:
    def usage_from_body(body: bytes) -> Usage | None:
        return ResponseSummary.from_body(body).usage

    body = orjson.dumps({"usage": {"prompt_tokens": 7, "total_tokens": 7,
                                   "prompt_tokens_details": {"cached_tokens": 3}}})
    assert usage_from_body(body) == Usage(7, 0, 7, cached_input_tokens=3)
    assert usage_from_body(b'{"no": 1}') is None
    assert usage_from_body(b'not json "usage"') is None


def test_parse_request_keeps_raw_bytes_until_changed() -> None:
    raw = b'{"model":"gpt-4o", "stream":true, "messages":[]}'
    req = parse_request(Endpoint.CHAT, raw)
    assert (req.model, req.stream, req.client_wants_usage) == ("gpt-4o", True, False)
    assert req.wire_body() is raw
    req.set("stream_options", {"include_usage": True})
    assert orjson.loads(req.wire_body())["stream_options"] == {"include_usage": True}


def test_parse_request_accepts_json_that_orjson_refuses() -> None:
    # A lone surrogate escape is valid JSON text; orjson refuses it, json does not.
    req = parse_request(Endpoint.CHAT, b'{"model":"m","user":"\\ud800"}')
    assert req.body["user"] == "\ud800"
    req.set("model", "other")
    assert orjson.loads(req.wire_body().replace(b"\\ud800", b"x"))["model"] == "other"


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]", b'"text"', b"\xff\xfe", b"null"])
def test_parse_request_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(BadRequestBody):
        parse_request(Endpoint.CHAT, raw)


def _proxy(pairs: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_request_headers_drop_hop_by_hop_and_connection_named() -> None:
    incoming = _proxy([("Host", "evil.example"), ("Connection", "keep-alive, X-Secret-Hop"),
                       ("X-Secret-Hop", "1"), ("Keep-Alive", "5"), ("Content-Length", "10"),
                       ("Authorization", "Bearer sk-agent"), ("X-Custom", "a"),
                       ("X-Custom", "b"), ("x-sidecar-cache", "off"), ("TE", "trailers")])
    out = upstream_request_headers(incoming, None)
    assert list(out.items()) == [("Authorization", "Bearer sk-agent"), ("X-Custom", "a"),
                                 ("X-Custom", "b")]
    replaced = upstream_request_headers(incoming, "sk-upstream", identity_encoding=True)
    assert replaced["Authorization"] == "Bearer sk-upstream"
    assert replaced["Accept-Encoding"] == "identity"
    kept = upstream_request_headers(incoming, None, keep_content_length=True)
    assert kept["Content-Length"] == "10"


def test_response_headers_keep_provider_headers() -> None:
    upstream = _proxy([("x-request-id", "req_1"), ("retry-after", "7"),
                       ("Transfer-Encoding", "chunked"), ("Content-Length", "5"),
                       ("Content-Type", "application/json")])
    assert list(client_response_headers(upstream).keys()) == [
        "x-request-id", "retry-after", "Content-Type"]
    assert "Content-Length" in client_response_headers(upstream, keep_content_length=True)


def test_bearer_token() -> None:
    assert bearer_token(_proxy([("Authorization", "Bearer  sk-1 ")])) == "sk-1"
    assert bearer_token(_proxy([("Authorization", "Basic abc")])) is None
    assert bearer_token(_proxy([])) is None


@pytest.mark.parametrize("size", [1, 5, 64, 4096])
def test_tap_feed_gives_the_same_stream_whatever_the_read_sizes(size: int) -> None:
    tap = StreamTap(Endpoint.CHAT, hide_usage=True)
    out = b"".join(tap.feed(STREAM[i:i + size]) for i in range(0, len(STREAM), size))
    assert out == (b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}]}\n\n'
                   b'data: {"id":"a","choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
                   b"data: [DONE]\n\n")
    assert tap.remainder() == b""
    assert tap.usage == Usage(3, 2, 5)


def test_decode_body_codings() -> None:
    import gzip
    import zlib

    from proxy.wire.encoding import (
        CorruptBody,
        DecodedTooLarge,
        UnsupportedEncoding,
        decode_body,
    )
    body = b'{"model":"m"}' * 10
    raw_deflate = zlib.compressobj(wbits=-15)
    raw_deflated = raw_deflate.compress(body) + raw_deflate.flush()
    assert decode_body(gzip.compress(body), "gzip", 1000) == body
    assert decode_body(zlib.compress(body), "deflate", 1000) == body
    assert decode_body(raw_deflated, "Deflate", 1000) == body  # raw deflate, as some send
    assert decode_body(gzip.compress(zlib.compress(body)), "deflate, gzip", 1000) == body
    assert decode_body(body, "identity", 1000) == body
    with pytest.raises(DecodedTooLarge):
        decode_body(gzip.compress(body), "gzip", len(body) - 1)
    with pytest.raises(CorruptBody):
        decode_body(gzip.compress(body)[:-12], "gzip", 1000)  # truncated
    with pytest.raises(UnsupportedEncoding):
        decode_body(body, "br", 1000)
