"""End to end at the HTTP level: pass-through fidelity, faults, bad input, health."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from yarl import URL

from loadtest.bench import free_port
from proxy.config import ServerConfig, UpstreamConfig
from tests.conftest import Mock, SidecarFactory

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}


async def _request(method: str, url: str, **kw: Any) -> tuple[int, Any, bytes]:
    # encoded=True: send the target exactly as written (no requoting by the client).
    async with aiohttp.ClientSession(auto_decompress=False) as s, \
            s.request(method, URL(url, encoded=True), **kw) as r:
        return r.status, r.headers, await r.read()


def call(method: str, url: str, **kw: Any) -> tuple[int, Any, bytes]:
    return asyncio.run(_request(method, url, **kw))


def _error(body: bytes) -> dict[str, Any]:
    doc = orjson.loads(body)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = doc["error"]
    return err


# ------------------------------------------------------------------ pass-through


def test_query_string_method_and_headers_reach_upstream(sidecar: str) -> None:
    status, _, body = call(
        "PUT", f"{sidecar}/mock/echo/a%20b/c?x=1&y=%2F%20&x=2&empty=",
        data=b"\x00\x01payload\xff",
        headers={"X-Custom": "kept", "Authorization": "Bearer sk-agent",
                 "Connection": "X-Hop", "X-Hop": "dropped", "x-sidecar-cache": "off"})
    assert status == 200
    echo = orjson.loads(body)
    assert echo["method"] == "PUT"
    assert echo["path"] == "/v1/mock/echo/a b/c"
    assert echo["query_string"] == "x=1&y=%2F%20&x=2&empty="
    headers = {k.lower(): v for k, v in echo["headers"]}
    assert headers["x-custom"] == "kept"
    assert headers["authorization"] == "Bearer sk-agent"
    assert "x-hop" not in headers and "x-sidecar-cache" not in headers
    assert echo["body_len"] == 10


def test_upstream_cookies_reach_the_client_but_are_never_replayed(
        sidecars: SidecarFactory, mock: Mock) -> None:
    # By host name: a cookie jar would ignore cookies set by a bare IP address.
    url = sidecars.start(upstream=UpstreamConfig(base_url=mock.url.replace("127.0.0.1",
                                                                           "localhost")))
    for _ in range(2):
        status, headers, body = call("GET", f"{url}/mock/echo")
        assert status == 200
        assert headers["Set-Cookie"].startswith("edge_session=abc123")
        sent = {k.lower() for k, _ in orjson.loads(body)["headers"]}
        assert "cookie" not in sent


def test_host_headers_cannot_redirect_the_sidecar(sidecar: str, mock: Mock) -> None:
    status, _, body = call("GET", f"{sidecar}/mock/echo", headers={
        "Host": "evil.example", "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https"})
    assert status == 200
    headers = {k.lower(): v for k, v in orjson.loads(body)["headers"]}
    assert headers["host"] == mock.url.split("//")[1].split("/")[0]


def test_upstream_404_passes_through(sidecar: str, mock: Mock) -> None:
    via = call("GET", f"{sidecar}/no/such/thing?q=1")
    ref = call("GET", f"{mock.url}/no/such/thing?q=1")
    assert via[0] == ref[0] == 404
    assert via[2] == ref[2]
    assert "x-sidecar-error" not in via[1]


def test_unknown_route_outside_v1_gets_openai_404(sidecar: str) -> None:
    root = sidecar.removesuffix("/v1")
    for method in ("GET", "POST", "DELETE"):
        status, _, body = call(method, f"{root}/admin/secret")
        assert status == 404
        assert _error(body)["message"] == f"Invalid URL ({method} /admin/secret)"


def test_configured_key_replaces_agent_key(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(upstream=UpstreamConfig(base_url=mock.url, api_key="sk-upstream"))
    _, _, body = call("GET", f"{url}/mock/echo", headers={"Authorization": "Bearer sk-agent"})
    headers = {k.lower(): v for k, v in orjson.loads(body)["headers"]}
    assert headers["authorization"] == "Bearer sk-upstream"
    with openai.OpenAI(base_url=url, api_key="sk-agent", max_retries=0) as c:
        c.chat.completions.create(model="m", messages=CHAT["messages"])  # type: ignore[arg-type]
    sent = dict((k.lower(), v) for k, v in mock.server.stats.last_requests[-1].headers)
    assert sent["authorization"] == "Bearer sk-upstream"


def test_compressed_passthrough_body_is_not_decoded(sidecar: str) -> None:
    status, headers, _ = call("GET", f"{sidecar}/models",
                              headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert "x-sidecar-overhead-ms" in headers


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe\x00",
                                  b'"just a string"', b"null", b"{" * 100000])
def test_malformed_bodies_get_400(sidecar: str, body: bytes) -> None:
    for path in ("/chat/completions", "/completions", "/embeddings", "/responses"):
        status, headers, out = call("POST", sidecar + path, data=body,
                                    headers={"Content-Type": "application/json"})
        assert status == 400, (path, body[:20])
        assert _error(out)["code"] == "invalid_json"
        assert headers["x-sidecar-error"] == "invalid_json"
        assert float(headers["x-sidecar-overhead-ms"]) >= 0


def test_oversized_bodies_get_413(sidecars: SidecarFactory) -> None:
    url = sidecars.start(server=ServerConfig(port=0, max_body_bytes=2048,
                                             max_passthrough_body_bytes=4096))
    big = orjson.dumps({**CHAT, "pad": "x" * 5000})
    status, _, body = call("POST", f"{url}/chat/completions", data=big)
    assert status == 413 and _error(body)["code"] == "request_too_large"

    async def chunked() -> Any:
        for _ in range(10):
            yield b"y" * 1000

    status, _, body = call("POST", f"{url}/chat/completions", data=chunked())
    assert status == 413, body
    status, _, body = call("POST", f"{url}/files", data=b"z" * 5000)
    assert status == 413 and _error(body)["code"] == "request_too_large"
    status, _, body = call("POST", f"{url}/mock/echo", data=chunked())
    assert status == 413 and _error(body)["code"] == "request_too_large"
    status, _, body = call("POST", f"{url}/mock/echo", data=b"z" * 4000)
    assert status == 200


def test_sdk_sees_bad_input_as_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body=None, cast_to=object,
                    options={"headers": {"Content-Type": "application/json"}})
    assert info.value.code == "invalid_json"


# ------------------------------------------------------------------ upstream faults


def test_upstream_down_gives_502(sidecars: SidecarFactory) -> None:
    url = sidecars.start(upstream=UpstreamConfig(base_url=f"http://127.0.0.1:{free_port()}/v1"))
    for path, kw in (("/chat/completions", {"json": CHAT}), ("/models", {})):
        status, headers, body = call("POST" if kw else "GET", url + path, **kw)
        assert status == 502
        assert _error(body)["code"] == "upstream_unreachable"
        assert "x-sidecar-overhead-ms" in headers
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c, \
            pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="m", messages=CHAT["messages"])  # type: ignore[arg-type]
    assert info.value.status_code == 502
    status, _, body = call("GET", url.removesuffix("/v1") + "/status")
    upstream = orjson.loads(body)["components"]["upstream"]
    assert upstream["details"]["last_failure"] == "connect_error"
    assert upstream["details"]["reachable"] is False
    assert upstream["state"] == "degraded"
    assert upstream["reason"] == "cannot connect to 127.0.0.1"


def test_upstream_timeout_gives_504(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(upstream=UpstreamConfig(base_url=mock.url, read_timeout_s=0.3))
    status, _, body = call("POST", f"{url}/chat/completions", json=CHAT,
                           headers={"x-mock-latency-ms": "3000"})
    assert status == 504
    assert _error(body)["code"] == "upstream_timeout"


def test_stream_idle_timeout_ends_stream_with_error_event(sidecars: SidecarFactory,
                                                          mock: Mock) -> None:
    url = sidecars.start(upstream=UpstreamConfig(base_url=mock.url, stream_idle_timeout_s=0.3))
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c, \
            pytest.raises(openai.APIError) as info:
        list(c.chat.completions.create(model="m", messages=CHAT["messages"],  # type: ignore[arg-type]
                                       stream=True, extra_headers={"x-mock-ttft-ms": "3000"}))
    assert "upstream stream failed" in str(info.value)


def test_upstream_disconnect_before_headers_gives_502(sidecar: str) -> None:
    status, _, body = call("POST", f"{sidecar}/chat/completions", json=CHAT,
                           headers={"x-mock-disconnect": "before-headers"})
    assert status == 502
    assert _error(body)["type"] == "upstream_error"


def test_upstream_disconnect_mid_stream_is_not_silent(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(
            model="m", messages=CHAT["messages"], stream=True,  # type: ignore[arg-type]
            extra_headers={"x-mock-disconnect": "mid-stream"}))


async def _abandon(url: str, mock: Mock, body: dict[str, Any], headers: dict[str, str],
                   read_first: bool) -> bytes:
    """Send a request on a raw socket, then drop the connection the way a dying agent does."""
    key = "POST /v1/chat/completions"
    seen = mock.server.stats.requests[key]
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(url).port)
    payload = orjson.dumps(body)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                 f"{head}\r\n".encode() + payload)
    await writer.drain()
    got = b""
    if read_first:
        while b"data: " not in got:
            got += await reader.read(65536)
    else:  # leave while the upstream is still working on it
        assert await asyncio.to_thread(mock.server.stats.wait_for_requests, key, seen + 1, 5.0)
    writer.transport.abort()  # RST, no goodbye
    return got


@pytest.mark.parametrize(("stream", "read_first", "headers"), [
    (True, True, {"x-mock-tps": "5"}),             # mid-stream, between two slow tokens
    (True, False, {"x-mock-ttft-ms": "5000"}),     # waiting for the first token
    (False, False, {"x-mock-latency-ms": "5000"}),  # waiting for a whole answer
])
def test_client_disconnect_cancels_upstream(sidecar: str, mock: Mock, stream: bool,
                                            read_first: bool, headers: dict[str, str]) -> None:
    stats = mock.server.stats
    before = stats.cancelled
    got = asyncio.run(_abandon(sidecar, mock, {**CHAT, "stream": stream}, headers, read_first))
    assert (b"HTTP/1.1 200" in got) == read_first
    # Well under the upstream's own 5 s: the sidecar passed the cancellation on.
    assert stats.wait_for_cancelled(before + 1, timeout=3.0), "upstream never saw the cancel"


# ------------------------------------------------------------------ health


def test_health_endpoints(sidecar: str) -> None:
    root = sidecar.removesuffix("/v1")
    assert call("GET", f"{root}/healthz")[0] == 200
    status, _, body = call("GET", f"{root}/readyz")
    assert status == 200 and orjson.loads(body) == {"status": "ready"}
    status, _, body = call("GET", f"{root}/status")
    doc = orjson.loads(body)
    assert status == 200
    assert set(doc["components"]) >= {"process", "config", "upstream", "telemetry"}
    assert doc["components"]["upstream"]["details"]["reachable"] is True
    for comp in doc["components"].values():
        assert comp["state"] in ("ok", "degraded", "down")
        assert comp["last_check"] is not None


def test_secrets_never_in_status_or_errors(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(upstream=UpstreamConfig(base_url=f"http://127.0.0.1:{free_port()}/v1",
                                                 api_key="sk-SECRET-upstream"))
    _, _, err = call("POST", f"{url}/chat/completions", json=CHAT,
                     headers={"Authorization": "Bearer sk-SECRET-agent"})
    _, _, status = call("GET", url.removesuffix("/v1") + "/status")
    for blob in (err, status):
        assert b"SECRET" not in blob


# ------------------------------------------------------------------ limits and robustness


def test_bounded_upstream_concurrency(sidecars: SidecarFactory, mock: Mock) -> None:
    url = sidecars.start(upstream=UpstreamConfig(base_url=mock.url, max_connections=2,
                                                 pool_timeout_s=0.3))
    key = "POST /v1/chat/completions"

    async def go() -> list[int]:
        seen = mock.server.stats.requests[key]
        slow = [asyncio.create_task(_request("POST", f"{url}/chat/completions", json=CHAT,
                                             headers={"x-mock-latency-ms": "1500"}))
                for _ in range(2)]
        assert await asyncio.to_thread(mock.server.stats.wait_for_requests, key, seen + 2, 5)
        status, _, body = await _request("POST", f"{url}/chat/completions", json=CHAT)
        assert "no connection in time" in _error(body)["message"]
        return [status] + [s for s, _, _ in await asyncio.gather(*slow)]

    assert asyncio.run(go()) == [504, 200, 200]


def _weird_bodies() -> list[bytes]:
    import random
    rng = random.Random(1234)
    values: list[Any] = [None, True, 0, -1, 1.5, "", "x" * 300, [], {}, [1, "a"],
                         {"include_usage": "yes"}, [{"role": 7}], "\u0000\ud7ff"]
    keys = ["model", "messages", "stream", "stream_options", "prompt", "input", "tools",
            "n", "temperature", "max_tokens"]
    out = [orjson.dumps({k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 6))})
           for _ in range(120)]
    out += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(30)]
    out += [b'{"model":"m","stream":true,"stream_options":[1],"messages":'
            b'[{"role":"user","content":"x"}]}', b'{"a":' * 5000 + b"1" + b"}" * 5000]
    return out


def test_no_input_makes_the_sidecar_fail(sidecar: str) -> None:
    async def go() -> list[tuple[int, bytes]]:
        results = []
        async with aiohttp.ClientSession() as s:
            for i, body in enumerate(_weird_bodies()):
                path = ("/chat/completions", "/completions", "/embeddings", "/responses")[i % 4]
                async with s.post(sidecar + path, data=body) as r:
                    results.append((r.status, await r.read()))
            for method in ("GET", "DELETE", "PATCH", "OPTIONS", "HEAD"):
                for path in ("/chat/completions", "/../../etc/passwd", "/%00", "/files/x/content"):
                    async with s.request(method, URL(sidecar + path, encoded=True)) as r:
                        results.append((r.status, await r.read()))
        return results

    results = asyncio.run(go())
    assert len(results) > 150
    assert all(status != 500 for status, _ in results), [r for r in results if r[0] == 500]
    assert {s for s, _ in results} <= {200, 400, 404, 405}
    assert call("GET", sidecar.removesuffix("/v1") + "/readyz")[0] == 200


def test_compressed_request_bodies(sidecar: str, mock: Mock) -> None:
    import gzip
    import hashlib
    raw = b'{"hello": "' + b"z" * 5000 + b'"}'
    packed = gzip.compress(raw)
    # Pass-through: the compressed bytes travel as they are, with their header.
    status, _, body = call("POST", f"{sidecar}/mock/echo", data=packed,
                           headers={"Content-Encoding": "gzip"})
    echo = orjson.loads(body)
    assert status == 200
    assert echo["body_sha256"] == hashlib.sha256(packed).hexdigest()
    assert ("Content-Encoding", "gzip") in [tuple(h) for h in echo["headers"]]
    # Intercepted: the sidecar reads the JSON, then sends it on uncompressed.
    status, _, body = call("POST", f"{sidecar}/chat/completions",
                           data=gzip.compress(orjson.dumps(CHAT)),
                           headers={"Content-Encoding": "gzip",
                                    "Content-Type": "application/json"})
    assert status == 200, body
    sent = mock.server.stats.last_requests[-1]
    assert orjson.loads(sent.body) == CHAT
    assert "content-encoding" not in {k.lower() for k, _ in sent.headers}
    # A corrupt or unknown encoding is the client's error, and says so.
    for enc, data in (("gzip", b"not gzip at all"), ("zstd-ish", b"{}")):
        status, _, body = call("POST", f"{sidecar}/chat/completions", data=data,
                               headers={"Content-Encoding": enc})
        assert status in (400, 415), (enc, status)
        assert _error(body)["type"] == "invalid_request_error"


def test_compression_bomb_is_refused(sidecars: SidecarFactory) -> None:
    import gzip
    url = sidecars.start(server=ServerConfig(port=0, max_body_bytes=64 * 1024))
    bomb = gzip.compress(b'{"a":"' + b"0" * (50 * 1024 * 1024) + b'"}')
    assert len(bomb) < 64 * 1024
    status, _, body = call("POST", f"{url}/chat/completions", data=bomb,
                           headers={"Content-Encoding": "gzip"})
    assert status == 413
    assert _error(body)["code"] == "request_too_large"
