"""The provider's embeddings endpoint as the semantic tier's embedder (opt-in).

For fleets that would rather pay a fraction of a cent per thousand prompts
and a round trip than run the static model: ``cache.semantic_embedder:
upstream``. The last user turn is sent to ``POST /v1/embeddings`` of the
configured upstream (the default one, or a named one from ``upstreams:``),
as base64 float32 with the configured ``dimensions``, and the answer becomes
the prompt's vector. Recent vectors are memoised by the text's digest, so a
re-asked prompt costs nothing.

Which key pays: a named upstream's own key, or none; the default upstream's
configured key, else the agent's own ``Authorization`` (the same key its
chat request is about to use). A named upstream never receives the agent's
key.

Any failure (timeout, error status, malformed answer, a vector of another
size) costs the request its semantic lookup, never the request itself; it
is counted, and ``/status`` shows the embedder degraded with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections import OrderedDict

import numpy as np
import orjson
from multidict import CIMultiDict

from proxy.cache.embedder import Vector
from proxy.health import Health, State
from proxy.upstream import Upstream, UpstreamError

# Models that accept the ``dimensions`` parameter (OpenAI's third generation).
_SHORTENABLE = ("text-embedding-3",)
_RECENT_S = 60.0  # a failure this recent makes the embedder degraded


class _Unusable(Exception):
    """An answer that gives no vector (the message says why; it holds no secret)."""


class UpstreamEmbedder:
    """Vectors from an OpenAI-compatible embeddings endpoint."""

    def __init__(self, upstream: Upstream, model: str, dims: int, *, timeout_s: float,
                 pass_agent_key: bool, memo_entries: int = 4096) -> None:
        self.upstream = upstream
        self.model = model
        self.dims = dims
        self.name = f"upstream:{model}:{dims}"
        self.timeout_s = timeout_s
        self._pass_agent_key = pass_agent_key
        self._memo: OrderedDict[bytes, Vector] = OrderedDict()
        self._memo_entries = memo_entries
        body: dict[str, object] = {"model": model, "encoding_format": "base64"}
        if model.startswith(_SHORTENABLE):
            body["dimensions"] = dims
        self._body = body
        self._url = upstream.url("/embeddings")
        self.requests = 0
        self.failures = 0
        self.memo_hits = 0
        self.last_error = ""
        self._last_failure_at: float | None = None

    async def embed(self, text: str, authorization: str | None) -> Vector | None:
        """``text``'s unit vector, or None if the endpoint could not give one."""
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        vector = self._memo.get(digest)
        if vector is not None:
            self._memo.move_to_end(digest)
            self.memo_hits += 1
            return vector
        headers = CIMultiDict({"Content-Type": "application/json"})
        key = self.upstream.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif authorization and self._pass_agent_key:
            headers["Authorization"] = authorization
        self.requests += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self.upstream.send("POST", self._url, headers,
                                                orjson.dumps({**self._body, "input": text}))
                try:
                    body = await self.upstream.read_body(resp)
                finally:
                    resp.release()
            if resp.status != 200:
                raise _Unusable(f"status {resp.status}")
            vector = self._vector(body)
        except TimeoutError:
            self._fail(f"no answer within {self.timeout_s:g} s")
            return None
        except UpstreamError as exc:
            self._fail(exc.kind)
            return None
        except _Unusable as exc:
            self._fail(str(exc))
            return None
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self._fail(f"malformed answer ({type(exc).__name__})")
            return None
        self._memo[digest] = vector
        if len(self._memo) > self._memo_entries:
            self._memo.popitem(last=False)
        return vector

    def _vector(self, body: bytes) -> Vector:
        item = orjson.loads(body)["data"][0]["embedding"]
        if isinstance(item, str):
            vector = np.frombuffer(base64.b64decode(item), dtype="<f4").astype(np.float32)
        else:
            vector = np.asarray(item, dtype=np.float32)
        if vector.shape != (self.dims,):
            raise _Unusable(f"vectors of {vector.size} dimensions, configured {self.dims} "
                            "(set cache.semantic_embedder_dims)")
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise _Unusable("a zero or non-finite vector")
        out: Vector = vector / norm
        return out

    def _fail(self, reason: str) -> None:
        # The reason names a status or a shape, never the key or the prompt.
        self.failures += 1
        self.last_error = reason
        self._last_failure_at = time.monotonic()

    async def health(self) -> Health:
        """Degraded while failures are recent (the tier then skips those requests)."""
        details = {"model": self.model, "dims": self.dims, "requests": self.requests,
                   "failures": self.failures, "memo_hits": self.memo_hits}
        recent = (self._last_failure_at is not None
                  and time.monotonic() - self._last_failure_at < _RECENT_S)
        if recent:
            return Health(State.DEGRADED, f"embeddings failing: {self.last_error}", details)
        return Health(State.OK, "", details)
