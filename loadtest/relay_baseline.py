"""The "Python floor": the leanest sensible aiohttp reverse proxy, for benchmarks.

llm-sidecar is written in Python on aiohttp, so its overhead is compared with
what *any* aiohttp relay costs, not only with talking to the upstream directly.
This relay does the minimum a correct proxy must do and nothing else:

- one pooled ``ClientSession`` (keep-alive, 512 connections, no decompression),
  opened and closed with the application;
- a single catch-all route under ``/v1`` that reads the request body and sends
  it unchanged to the same path below the upstream base URL, with the client's
  headers minus ``Host``, ``Content-Length`` and hop-by-hop headers;
- the answer goes back with its status, body and end-to-end headers;
  ``text/event-stream`` answers are streamed chunk by chunk as they arrive.

No parsing, no pipeline, no logging per request. Run it with
``python -m loadtest.relay_baseline --port 8002 --upstream http://127.0.0.1:8001/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.server import loop_factory, wait_for_stop_signal

__all__ = ["build_app", "main"]

_PREFIX = "/v1"
_SSE_TYPE = "text/event-stream"

# RFC 9110 section 7.6.1: these belong to one connection and are never relayed.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})
# Host comes from the upstream URL; the client library recomputes the length.
_DROP_REQUEST = _HOP_BY_HOP | {"host", "content-length"}
# aiohttp's server frames the body it sends itself.
_DROP_RESPONSE = _HOP_BY_HOP | {"content-length"}


@dataclass(slots=True)
class _Pool:
    """Holds the session; created before startup so the frozen app is never mutated."""

    session: aiohttp.ClientSession | None = None


POOL = web.AppKey("pool", _Pool)
UPSTREAM_BASE = web.AppKey("upstream_base", str)


def _relayed(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without the names in ``drop`` (or named by ``Connection``)."""
    items = list(headers)
    extra = {token.strip().lower() for name, value in items if name.lower() == "connection"
             for token in value.split(",")}
    return CIMultiDict((name, value) for name, value in items
                       if name.lower() not in drop and name.lower() not in extra)


async def _relay(request: web.Request) -> web.StreamResponse:
    """Forward one request to the same path upstream and relay the answer."""
    target = request.rel_url.raw_path_qs
    if target != _PREFIX and not target.startswith(_PREFIX + "/"):
        return web.Response(status=404, text="not found\n")
    session = request.app[POOL].session
    assert session is not None, "the session is opened by the cleanup context"
    body = await request.read()
    url = URL(request.app[UPSTREAM_BASE] + target[len(_PREFIX):], encoded=True)
    headers = _relayed(request.headers.items(), _DROP_REQUEST)
    try:
        resp = await session.request(request.method, url, headers=headers,
                                     data=body or None, allow_redirects=False)
    except aiohttp.ClientError as exc:
        return web.Response(status=502, text=f"upstream failed: {type(exc).__name__}\n")
    try:
        out_headers = _relayed(resp.headers.items(), _DROP_RESPONSE)
        if resp.content_type != _SSE_TYPE:
            data = await resp.read()
            return web.Response(status=resp.status, reason=resp.reason, body=data,
                                headers=out_headers)
        # Events must reach the client as soon as upstream produces them.
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=out_headers)
        await out.prepare(request)
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out
    finally:
        # release() keeps a fully read connection pooled; a cancelled or failed
        # exchange leaves it unread, and release() then closes it.
        resp.release()


def build_app(upstream_base: str) -> web.Application:
    """Create the relay application forwarding ``/v1/...`` to ``upstream_base``."""
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM_BASE] = upstream_base.rstrip("/")
    pool = _Pool()
    app[POOL] = pool

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=512, limit_per_host=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trust_env=False,
                # A shared session must not replay one client's cookies for another
                # (the sidecar does the same), and no jar is the cheapest jar.
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
                # Relay what the client sent and add nothing it did not.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as session:
            pool.session = session
            yield
            pool.session = None

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", _relay)
    return app


async def _serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(build_app(upstream), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"relay listening on http://{host}:{bound}{_PREFIX}", flush=True)
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the relay until SIGINT/SIGTERM (on uvloop when installed)."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.relay_baseline",
                                     description="Minimal aiohttp relay (benchmark baseline).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument("--upstream", required=True,
                        help="upstream base URL, e.g. http://127.0.0.1:8001/v1")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt), \
            asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
