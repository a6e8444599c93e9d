"""A small pipelined Redis client for the per-request calls (limiter, cache).

redis-py's asyncio client spends about 150-300 us of CPU per command here
(pool checkout, command packing, the response reader), as much as the rest of
the sidecar's work on a request. The sidecar needs a handful of commands
(EVALSHA, SCRIPT LOAD, GET/MGET/SET, AUTH/SELECT at connect), so this client speaks RESP directly on
one connection: requests are written as they come, replies are matched to
callers in order (Redis answers a connection's commands in order), and many
requests share the connection without waiting for each other.

It raises redis-py's exception types, so callers handle both clients alike.
Redis Cluster and unix sockets go through redis-py (see ``limiter._client``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

Reply = bytes | int | str | list[Any] | None | ResponseError


class _Incomplete(Exception):
    """The buffer ends inside a reply; wait for more bytes."""


def encode(args: tuple[object, ...]) -> bytes:
    """A RESP array of bulk strings (how clients send commands)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse(buf: bytes | bytearray, pos: int) -> tuple[Reply, int]:
    """One RESP2 reply starting at ``pos``; raises _Incomplete if it is not all there."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    pos = end + 2
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + size]), pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == b"+":
        return line.decode(), pos
    if kind == b"-":
        text = line.decode(errors="replace")
        return (NoScriptError(text) if text.startswith("NOSCRIPT")
                else ResponseError(text)), pos
    raise RedisConnectionError(f"protocol error: unexpected reply type {kind!r}")


class _Protocol(asyncio.Protocol):
    """One connection: writes commands, resolves their futures in reply order."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.pending: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()  # loop time, per pending
        self.buffer = bytearray()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass; it writes.
        self.transport = transport  # type: ignore[assignment]

    def call(self, payload: bytes) -> asyncio.Future[Reply]:
        if self.closed or self.transport is None:
            raise RedisConnectionError("connection closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self.pending.append(future)
        self.sent_at.append(loop.time())
        self.transport.write(payload)
        return future

    def oldest_wait(self, now: float) -> float:
        """How long the oldest unanswered command has been waiting."""
        return now - self.sent_at[0] if self.sent_at else 0.0

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = parse(buf, pos)
                if not self.pending:
                    raise RedisConnectionError("reply without a request")
                future = self.pending.popleft()
                self.sent_at.popleft()
                if not future.done():  # a caller that timed out no longer waits
                    future.set_result(reply)
        except _Incomplete:
            pass
        except (RedisConnectionError, ValueError) as exc:
            self._fail(RedisConnectionError(f"protocol error: {exc}"))
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("connection to Redis lost"))

    def close(self) -> None:
        self._fail(RedisConnectionError("connection closed"))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        self.sent_at.clear()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class RespClient:
    """Pipelined commands on one connection to ``redis://`` or ``rediss://`` URL's server.

    Connects on first use and again after the connection is lost or reset.
    """

    def __init__(self, url: str, connect_timeout_s: float, stale_after_s: float = 1.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported scheme {parts.scheme!r}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.db = int(parts.path.strip("/") or 0)
        self.ssl = ssl.create_default_context() if parts.scheme == "rediss" else None
        self.connect_timeout_s = connect_timeout_s
        # Callers give up after their own timeout, but their replies are still owed
        # on this connection. If the oldest is this late the server or the path is
        # hung (no RST ever comes): start over rather than queue behind it forever.
        self.stale_after_s = stale_after_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def execute(self, *args: object) -> Any:
        """Send one command and return its reply (raising its error)."""
        proto = self._proto
        if proto is not None and proto.pending and proto.oldest_wait(
                asyncio.get_running_loop().time()) > self.stale_after_s:
            self.reset()
            proto = None
        if proto is None or proto.closed:
            proto = await self._connection()
        reply = await proto.call(encode(args))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def execute_command(self, *args: object) -> Any:
        """The same as :meth:`execute`, under redis-py's name, so callers take either client."""
        return await self.execute(*args)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: object) -> Any:
        """EVALSHA (raises NoScriptError when the server lacks the script)."""
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> str:
        """SCRIPT LOAD; returns the SHA."""
        sha = await self.execute("SCRIPT", "LOAD", source)
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    def reset(self) -> None:
        """Drop the connection; the next call reconnects."""
        if self._proto is not None:
            self._proto.close()
            self._proto = None

    async def aclose(self) -> None:
        """Close the connection."""
        if self._connecting is not None:
            self._connecting.cancel()
        self.reset()

    async def _connection(self) -> _Protocol:
        # Callers arriving while a connection is being made share that attempt.
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        task = self._connecting
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(
                    _Protocol, self.host, self.port, ssl=self.ssl)
                if self.password is not None:
                    auth = ((self.username, self.password) if self.username
                            else (self.password,))
                    await self._checked(proto, "AUTH", *auth)
                if self.db:
                    await self._checked(proto, "SELECT", self.db)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        self._proto = proto
        return proto

    @staticmethod
    async def _checked(proto: _Protocol, *args: object) -> None:
        reply = await proto.call(encode(args))
        if isinstance(reply, ResponseError):
            proto.close()
            raise reply
