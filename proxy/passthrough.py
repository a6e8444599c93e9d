"""Every /v1/ call the sidecar does not intercept: relayed byte for byte, streamed both ways."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from aiohttp import StreamReader, web
from multidict import CIMultiDict

from proxy.upstream import Upstream, UpstreamError
from proxy.wire import errors
from proxy.wire.headers import OVERHEAD_HEADER, upstream_request_headers

_PREFIX = "/v1/"


class BodyTooLarge(Exception):
    """A chunked upload went past the pass-through limit."""


class _BoundedBody:
    """A request body of unknown length, streamed upstream until it passes the limit."""

    __slots__ = ("content", "exceeded", "limit")

    def __init__(self, content: StreamReader, limit: int) -> None:
        self.content = content
        self.limit = limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.content.iter_any():
            seen += len(chunk)
            if seen > self.limit:
                # The client library only sees the upload fail; the flag says why.
                self.exceeded = True
                raise BodyTooLarge
            yield chunk


# Told of each finished pass-through request: method, status, upstream failure kind.
Observer = Callable[[str, int, str | None], None]


class Passthrough:
    """Relays a request to the same path upstream and the answer back, unchanged."""

    def __init__(self, upstream: Upstream, max_body: int,
                 observer: Observer | None = None) -> None:
        self.upstream = upstream
        self.max_body = max_body
        self.observer = observer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one pass-through request."""
        response, failure = await self._relay(request)
        if self.observer is not None:
            self.observer(request.method, response.status, failure)
        return response

    async def _relay(self, request: web.Request) -> tuple[web.StreamResponse, str | None]:
        """The response, and the kind of upstream failure if there was one."""
        started = time.perf_counter()
        target = request.rel_url.raw_path_qs
        if not target.startswith(_PREFIX):
            return errors.not_found(request.method, request.rel_url.path), None
        length = request.content_length
        if length is not None and length > self.max_body:
            return errors.body_too_large(self.max_body), None
        data: StreamReader | AsyncIterator[bytes] | None = None
        bounded: _BoundedBody | None = None
        if request.body_exists:
            if length is not None:
                data = request.content
            else:
                bounded = _BoundedBody(request.content, self.max_body)
                data = aiter(bounded)
        headers = upstream_request_headers(request.headers, self.upstream.api_key,
                                           keep_content_length=True)
        sent = time.perf_counter()
        try:
            resp = await self.upstream.send(request.method, self.upstream.url(target[3:]),
                                            headers, data)
        except (UpstreamError, BodyTooLarge) as exc:
            failure = None
            if (bounded is not None and bounded.exceeded) or isinstance(exc, BodyTooLarge):
                reply = errors.body_too_large(self.max_body)
            else:
                assert isinstance(exc, UpstreamError)
                reply, failure = exc.response, exc.kind
            upstream_s = time.perf_counter() - sent
            reply.headers[OVERHEAD_HEADER] = _overhead(started, upstream_s)
            return reply, failure
        upstream_s = time.perf_counter() - sent

        def on_head(h: CIMultiDict[str]) -> None:
            h[OVERHEAD_HEADER] = _overhead(started, upstream_s)

        return await self.upstream.relay(request, resp, on_head), None


def _overhead(started: float, upstream_s: float) -> str:
    return f"{(time.perf_counter() - started - upstream_s) * 1000:.3f}"
