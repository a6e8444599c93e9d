"""Cache keys: a hash of everything in a request that can change its answer.

The exact key covers the whole body except fields that cannot change the
answer's content: how it is delivered (``stream``, ``stream_options``), who
asks (``user``, ``safety_identifier``, ``metadata``), and provider-side
bookkeeping (``store``, ``service_tier``, ``prompt_cache_key``). Everything
else stays in, including fields this code does not know: an unknown field
might change the answer, and a missed hit costs less than a wrong one.

The normalized key is the same hash after the normalized tier rewrote the
prompt text (``proxy.cache.normalize``: chat messages, or a legacy prompt's
text); both are scoped to the tenant (or
the namespace, when tenants share) so no one is served another's answer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

import orjson

from proxy.cache.normalize import Normalizer
from proxy.wire.canonical import CanonicalRequest, Endpoint

NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "safety_identifier", "metadata",
                         "store", "service_tier", "prompt_cache_key"})
PREFIX = "llm-sidecar:cache:"


def digest(scope: str, endpoint: str, body: dict[str, Any]) -> str:
    """A 128-bit hex digest of ``body`` (keys sorted at every depth) within ``scope``."""
    try:
        data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a value only the stdlib decoder accepted (huge int, lone surrogate)
        data = json.dumps(body, sort_keys=True).encode()
    h = hashlib.blake2b(digest_size=16)
    h.update(scope.encode())
    h.update(b"\x00")
    h.update(endpoint.encode())
    h.update(b"\x00")
    h.update(data)
    return h.hexdigest()


class RequestKeys(NamedTuple):
    """A request's cache keys, and its chat messages as the normalized key saw them."""

    exact: str
    normal: str | None
    # Kept so the semantic tier's context reuses them instead of normalizing again.
    messages: list[Any] | None = None


class KeyBuilder:
    """Builds a request's exact key and, with a normalizer, its normalized key."""

    def __init__(self, normalizer: Normalizer | None) -> None:
        self.normalizer = normalizer
        self._signature = normalizer.signature if normalizer is not None else ""

    def keys(self, scope: str, canonical: CanonicalRequest) -> RequestKeys:
        """The exact key, the normalized key (or None) and the normalized messages."""
        # A stored response can be chained from; one the upstream did not store cannot.
        skip = NOT_IN_KEY - {"store"} if canonical.endpoint is Endpoint.RESPONSES else NOT_IN_KEY
        body = {k: v for k, v in canonical.body.items() if k not in skip}
        endpoint = canonical.endpoint.value
        exact = PREFIX + "x:" + digest(scope, endpoint, body)
        if self.normalizer is None:
            return RequestKeys(exact, None)
        normal = dict(body)
        if canonical.endpoint is Endpoint.COMPLETIONS:
            # A legacy prompt is continued as written: its ending and line breaks
            # stay (``normalize_continued``). Token ids, and an infill (``suffix``:
            # a cursor in a document, nearly always code), are exact only.
            if body.get("suffix") is not None:
                return RequestKeys(exact, None)
            prompt = self.normalizer.normalize_prompt(body.get("prompt"))
            if prompt is None:
                return RequestKeys(exact, None)
            normal["prompt"] = prompt
        else:
            messages = body.get("messages")
            if messages is None:
                return RequestKeys(exact, None)
            normal["messages"] = self.normalizer.normalize_messages(messages)
        # Entries normalized another way (other settings, an older version) never match.
        normal_key = PREFIX + "n:" + digest(scope + "\x00" + self._signature, endpoint, normal)
        messages = normal.get("messages")
        return RequestKeys(exact, normal_key, messages if isinstance(messages, list) else None)
