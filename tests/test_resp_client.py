"""proxy.resp against a real Redis: replies, pipelining, auth, reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from proxy.resp import RespClient, _Incomplete, encode, parse
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("resp"),
                         extra_args=("--requirepass", "s3cret"))
    server.start()
    yield server
    server.stop()


def _url(server: RedisServer, password: str = "s3cret", db: int = 0) -> str:
    return f"redis://:{password}@127.0.0.1:{server.port}/{db}"


def test_parse_every_reply_type_and_partial_input() -> None:
    wire = b"+OK\r\n:-42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n-ERR bad\r\n"
    pos, replies = 0, []
    while pos < len(wire):
        reply, pos = parse(wire, pos)
        replies.append(reply)
    assert replies[:5] == ["OK", -42, b"abc", None, [1, [b""]]]
    assert isinstance(replies[5], ResponseError) and str(replies[5]) == "ERR bad"
    for cut in range(1, len(b"*2\r\n:1\r\n$3\r\nabc\r\n")):
        with pytest.raises(_Incomplete):
            parse(b"*2\r\n:1\r\n$3\r\nabc\r\n"[:cut], 0)
    assert encode(("SET", b"k", 1.5)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n1.5\r\n"


def test_pipelined_calls_get_their_own_replies(redis_server: RedisServer) -> None:
    async def go() -> list[Any]:
        client = RespClient(_url(redis_server, db=3), connect_timeout_s=2)
        try:
            await asyncio.gather(*(client.execute("SET", f"k{i}", i) for i in range(200)))
            return await asyncio.gather(*(client.execute("GET", f"k{i}") for i in range(200)))
        finally:
            await client.aclose()

    assert asyncio.run(go()) == [str(i).encode() for i in range(200)]


def test_auth_failure_and_script_errors_raise_redis_py_types(
        redis_server: RedisServer) -> None:
    async def go() -> None:
        bad = RespClient(_url(redis_server, password="wrong"), connect_timeout_s=2)
        with pytest.raises(ResponseError):
            await bad.execute("PING")
        await bad.aclose()
        client = RespClient(_url(redis_server), connect_timeout_s=2)
        with pytest.raises(NoScriptError):
            await client.evalsha("0" * 40, 0)
        sha = await client.script_load("return 7")
        assert await client.evalsha(sha, 0) == 7
        await client.aclose()

    asyncio.run(go())


def test_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()

    async def go() -> tuple[Any, type[Exception], Any]:
        client = RespClient(f"redis://127.0.0.1:{server.port}/0", connect_timeout_s=2)
        first = await client.execute("PING")
        server.stop()
        try:
            await client.execute("PING")
        except RedisConnectionError as exc:
            error: type[Exception] = type(exc)
        server.start()
        again = await client.execute("PING")
        await client.aclose()
        return first, error, again

    try:
        assert asyncio.run(go()) == ("PONG", RedisConnectionError, "PONG")
    finally:
        server.stop()


def test_a_server_that_never_answers_gets_a_new_connection() -> None:
    async def go() -> int:
        connections = 0

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            await reader.read()  # reads commands, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RespClient(f"redis://127.0.0.1:{port}/0", connect_timeout_s=2,
                            stale_after_s=0.0)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await client.execute("PING")
        await client.aclose()
        server.close()
        return connections

    # The second call found the first still unanswered and started over.
    assert asyncio.run(go()) == 2
