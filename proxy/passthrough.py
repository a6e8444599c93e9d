"""Every /v1/ call the sidecar does not intercept: relayed byte for byte, streamed both ways."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from aiohttp import StreamReader, web
from multidict import CIMultiDict

from proxy.upstream import Upstream, UpstreamError
from proxy.wire import errors
from proxy.wire.headers import upstream_request_headers

OVERHEAD_HEADER = "x-sidecar-overhead-ms"
_PREFIX = "/v1/"


class BodyTooLarge(Exception):
    """A chunked upload went past the pass-through limit."""


class Passthrough:
    """Relays a request to the same path upstream and the answer back, unchanged."""

    def __init__(self, upstream: Upstream, max_body: int) -> None:
        self.upstream = upstream
        self.max_body = max_body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one pass-through request."""
        started = time.perf_counter()
        target = request.rel_url.raw_path_qs
        if not target.startswith(_PREFIX):
            return errors.not_found(request.method, request.rel_url.path)
        length = request.content_length
        if length is not None and length > self.max_body:
            return errors.body_too_large(self.max_body)
        data: StreamReader | AsyncIterator[bytes] | None = None
        if request.body_exists:
            data = request.content if length is not None else self._bounded(request.content)
        headers = upstream_request_headers(request.headers, self.upstream.api_key,
                                           keep_content_length=True)
        sent = time.perf_counter()
        try:
            resp = await self.upstream.send(request.method, self.upstream.url(target[3:]),
                                            headers, data)
        except UpstreamError as exc:
            if isinstance(exc.__context__, BodyTooLarge):
                return errors.body_too_large(self.max_body)
            return exc.response
        except BodyTooLarge:
            return errors.body_too_large(self.max_body)
        upstream_s = time.perf_counter() - sent

        def on_head(h: CIMultiDict[str]) -> None:
            overhead = time.perf_counter() - started - upstream_s
            h[OVERHEAD_HEADER] = f"{overhead * 1000:.3f}"

        return await self.upstream.relay_bytes(request, resp, on_head)

    async def _bounded(self, content: StreamReader) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in content.iter_any():
            seen += len(chunk)
            if seen > self.max_body:
                raise BodyTooLarge
            yield chunk
