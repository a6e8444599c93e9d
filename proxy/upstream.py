"""The upstream API: one pooled ClientSession, timeouts, relays, and their failure modes.

The session is opened and closed by the app's lifecycle, never per request.
It does not decompress, so pass-through bodies reach the client byte for byte;
intercepted calls ask upstream for ``identity`` encoding because the sidecar
reads those bodies.

A client that goes away cancels its handler (the server runs with handler
cancellation), and every relay here closes the upstream connection on the way
out unless the exchange completed, so the provider sees the cancellation at
once and stops generating.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.health import Health, State
from proxy.wire import errors
from proxy.wire.headers import client_response_headers
from proxy.wire.sse import StreamTap

log = logging.getLogger("proxy.upstream")

_SSE_TYPE = "text/event-stream"
_READ_SIZE = 2 ** 16
# Outcomes remembered for the error-rate part of health.
_WINDOW = 200
_DEGRADED_ERROR_RATE = 0.5
# Reachability probe: only after this long without a successful call, cached,
# and well inside the health check's latency budget.
_PROBE_AFTER_S = 30.0
_PROBE_CACHE_S = 10.0
_PROBE_TIMEOUT_S = 0.2


class UpstreamError(Exception):
    """The upstream exchange failed before a response could be relayed."""

    def __init__(self, response: web.Response, kind: str) -> None:
        super().__init__(kind)
        self.response = response
        self.kind = kind


class Upstream:
    """A configured upstream API and the connection pool that reaches it."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.api_key = cfg.resolved_api_key()
        base = cfg.base_url.rstrip("/")
        self._base = base
        url = URL(base)
        self.host = url.host or ""
        self.port = url.port
        self._session: aiohttp.ClientSession | None = None
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=_WINDOW)
        self.requests = 0
        self.failures = 0
        self.last_failure: str | None = None
        self.last_failure_at: float | None = None
        self._last_ok: float | None = None
        self._probe: tuple[float, bool] | None = None
        # aiohttp's sock_read is a per-read silence limit, so it already is the
        # idle-between-chunks timeout; streams get their own bound through it
        # instead of a timer per event.
        self.stream_timeout = aiohttp.ClientTimeout(
            total=cfg.total_timeout_s, connect=cfg.pool_timeout_s,
            sock_connect=cfg.connect_timeout_s, sock_read=cfg.stream_idle_timeout_s)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the pooled session (called once by the app's cleanup context)."""
        cfg = self.cfg
        connector = aiohttp.TCPConnector(
            limit=cfg.max_connections, limit_per_host=0,
            keepalive_timeout=cfg.keepalive_timeout_s, ttl_dns_cache=300,
            enable_cleanup_closed=False)
        timeout = aiohttp.ClientTimeout(
            total=cfg.total_timeout_s, connect=cfg.pool_timeout_s,
            sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            # One session serves every agent: a cookie one response sets must
            # never ride along on another agent's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Relay what the client sent, add nothing it did not.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            raise_for_status=False, trust_env=False)

    async def close(self) -> None:
        """Close the pool; in-flight exchanges are over by the time the app stops."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def is_open(self) -> bool:
        """Whether requests can be sent (the pool exists and is not closed)."""
        return self._session is not None and not self._session.closed

    def url(self, tail: str) -> URL:
        """The upstream URL for a client path below /v1 (``tail`` keeps its query, encoded).

        Only the configured base decides scheme, host and port.
        """
        return URL(self._base + tail, encoded=True)

    # ------------------------------------------------------------ exchange

    async def send(self, method: str, url: URL, headers: CIMultiDict[str],
                   data: Any, *, stream: bool = False) -> aiohttp.ClientResponse:
        """Send a request and return the response once its head has arrived.

        ``stream`` applies the stream idle timeout instead of the read timeout.
        Raises UpstreamError carrying the OpenAI-style error to return instead.
        """
        session = self._session
        if session is None or session.closed:
            raise UpstreamError(errors.upstream_unreachable(), "session_closed")
        try:
            if stream:
                resp = await session.request(method, url, headers=headers, data=data,
                                             allow_redirects=False,
                                             timeout=self.stream_timeout)
            else:
                resp = await session.request(method, url, headers=headers, data=data,
                                             allow_redirects=False)
        except aiohttp.ClientConnectorError as exc:
            raise self._failed(errors.upstream_unreachable(), "connect_error", exc) from None
        except TimeoutError as exc:
            # ConnectionTimeoutError (pool wait or connect) is a TimeoutError too.
            what = ("no connection in time" if isinstance(exc, aiohttp.ConnectionTimeoutError)
                    else "no response in time")
            raise self._failed(errors.upstream_timeout(what), "timeout", exc) from None
        except aiohttp.ServerDisconnectedError as exc:
            raise self._failed(errors.upstream_failed("server closed the connection"),
                               "disconnected", exc) from None
        except aiohttp.ClientError as exc:
            raise self._failed(errors.upstream_failed(type(exc).__name__),
                               "client_error", exc) from None
        self.requests += 1
        self._outcomes.append(resp.status < 500)
        if resp.status < 500:
            self._last_ok = time.monotonic()
        return resp

    def _failed(self, response: web.Response, kind: str, exc: BaseException) -> UpstreamError:
        self.requests += 1
        self.failures += 1
        self._outcomes.append(False)
        self.last_failure = kind
        self.last_failure_at = time.time()
        log.warning("upstream %s: %s (%s)", kind, type(exc).__name__, self.host)
        return UpstreamError(response, kind)

    async def read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read a whole (non-streamed) response body, mapping failures to UpstreamError."""
        try:
            return await resp.read()
        except TimeoutError as exc:
            resp.close()
            raise self._failed(errors.upstream_timeout("response body stalled"),
                               "timeout", exc) from None
        except aiohttp.ClientError as exc:
            resp.close()
            raise self._failed(errors.upstream_failed("response body cut short"),
                               "body_error", exc) from None

    # ------------------------------------------------------------ relays

    @staticmethod
    def is_event_stream(resp: aiohttp.ClientResponse) -> bool:
        """Whether the upstream answered with server-sent events."""
        return resp.content_type == _SSE_TYPE

    async def relay(self, request: web.Request, resp: aiohttp.ClientResponse,
                    on_head: Callable[[CIMultiDict[str]], None],
                    tap: StreamTap | None = None) -> web.StreamResponse:
        """Relay a response to the client as it arrives, never buffering it whole.

        With a ``tap`` the body is server-sent events: each complete event is
        flushed at once, after the tap has seen (and possibly rewritten or
        dropped) it. Without one, bytes are relayed untouched, Content-Length
        included. ``on_head`` may add headers just before they are sent.
        """
        headers = client_response_headers(resp.headers, keep_content_length=tap is None)
        on_head(headers)
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
        complete = False
        try:
            await out.prepare(request)
            async for data in self._chunks(resp):
                chunk = data if tap is None else tap.feed(data)
                if chunk:
                    await out.write(chunk)
            complete = True
            if tap is not None and (tail := tap.remainder()):
                await out.write(tail)  # an unterminated last event is still upstream's
            await out.write_eof()
        except ConnectionResetError:
            log.info("client went away mid-response; upstream request cancelled")
        except UpstreamError as exc:
            if tap is not None:
                tap.failure = exc.kind
            await self._relay_failed(request, out, exc.kind, sse=tap is not None)
        finally:
            if complete:
                resp.release()
            else:
                resp.close()
        return out

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        read = resp.content.readany
        try:
            while data := await read():
                yield data
        except TimeoutError as exc:
            raise self._failed(errors.upstream_timeout("upstream went silent"), "idle_timeout",
                               exc) from None
        except aiohttp.ClientError as exc:
            raise self._failed(errors.upstream_failed("stream cut short"), "stream_error",
                               exc) from None

    @staticmethod
    async def _relay_failed(request: web.Request, out: web.StreamResponse, kind: str,
                            *, sse: bool) -> None:
        # The status line is gone. An SSE client still gets an error event, which
        # makes the OpenAI SDKs raise instead of ending a truncated answer
        # quietly; for anything else a broken connection is the honest signal.
        log.warning("upstream failed mid-response (%s)", kind)
        if not sse:
            if request.transport is not None:
                request.transport.close()
            return
        event = b"data: " + errors.error_body(
            "The upstream stream failed before it completed.", "upstream_error",
            f"upstream_{kind}") + b"\n\n"
        try:
            await out.write(event)
            await out.write_eof()
        except ConnectionResetError:
            pass

    # ------------------------------------------------------------ health

    async def reachable(self) -> bool:
        """Whether a TCP connection to the upstream opens (cached; no HTTP, no key sent).

        Only probed when no call succeeded recently: real traffic is the better
        signal, and probes must not add load.
        """
        now = time.monotonic()
        if self._last_ok is not None and now - self._last_ok < _PROBE_AFTER_S:
            return True
        if self._probe is not None and now - self._probe[0] < _PROBE_CACHE_S:
            return self._probe[1]
        port = self.port or (443 if self._base.startswith("https") else 80)
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                _, writer = await asyncio.open_connection(self.host, port)
            writer.close()
            ok = True
        except (OSError, TimeoutError):
            ok = False
        self._probe = (now, ok)
        return ok

    async def health(self) -> Health:
        """Pool open, reachability, recent error rate."""
        details: dict[str, Any] = {
            "base_url": self._base, "requests": self.requests, "failures": self.failures,
            "last_failure": self.last_failure, "last_failure_at": self.last_failure_at,
        }
        if not self.is_open:
            return Health(State.DOWN, "upstream session is not open", details)
        details["reachable"] = reachable = await self.reachable()
        if not reachable:
            # Degraded, not down: readiness failing would take the agent's whole
            # pod out of service, and cached answers may still be served.
            return Health(State.DEGRADED, f"cannot connect to {self.host}", details)
        window = self._outcomes
        if len(window) >= 20:
            rate = 1 - sum(window) / len(window)
            details["error_rate"] = round(rate, 3)
            if rate >= _DEGRADED_ERROR_RATE:
                return Health(State.DEGRADED,
                              f"{rate:.0%} of the last {len(window)} upstream calls failed",
                              details)
        return Health(State.OK, "", details)


class Upstreams:
    """The default upstream and the named ones models may be placed on (``upstreams``)."""

    def __init__(self, default: Upstream, named: dict[str, Upstream] | None = None) -> None:
        self.default = default
        self.named = dict(named or {})

    def get(self, name: str | None) -> Upstream:
        """The upstream called ``name`` (None: the default); unknown names were refused at load."""
        if name is None:
            return self.default
        return self.named[name]

    def all(self) -> list[tuple[str, Upstream]]:
        """Every upstream with its name, the default first."""
        return [("default", self.default), *self.named.items()]

    async def start(self) -> None:
        """Open every pool."""
        for _, upstream in self.all():
            await upstream.start()

    async def close(self) -> None:
        """Close every pool."""
        for _, upstream in self.all():
            await upstream.close()
