"""Whether a request may be answered from the cache, and stored in it.

Only answers that would come out the same again are cached: temperature 0,
or no temperature on a model configured as deterministic by default, one
choice (``n`` = 1; for legacy completions also ``best_of`` = 1), or any
request the client opts in (``x-sidecar-cache: on``, or a model configured as
always cached); a legacy completion of several prompts (several choices) is
cached only when opted in; embeddings are deterministic and cached unless
configured off. The client can also say no:
``x-sidecar-cache: off`` skips the cache, ``Cache-Control: no-cache`` skips
the lookup (the fresh answer is still stored), ``no-store`` skips storing,
and ``x-sidecar-cache-ttl`` sets an entry's lifetime in seconds.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.cache.completions import prompt_count
from proxy.config import CacheConfig
from proxy.wire.canonical import CanonicalRequest, Endpoint

CACHE_HEADER = "x-sidecar-cache"
TTL_HEADER = "x-sidecar-cache-ttl"


@dataclass(frozen=True, slots=True)
class Directive:
    """What to do with the cache for one request."""

    lookup: bool
    store: bool
    ttl_s: int


class BadCacheHeader(ValueError):
    """A cache header the client sent has a value the sidecar cannot use (a 400)."""


class CachePolicy:
    """Decides each request's :class:`Directive` (see the module docstring)."""

    def __init__(self, cfg: CacheConfig) -> None:
        self.ttl_s = cfg.ttl_s
        self.max_ttl_s = cfg.max_ttl_s
        self._deterministic = _globs(cfg.deterministic_models)
        self._always = _globs(cfg.always_models)
        self._embeddings = cfg.embeddings

    def directive(self, headers: CIMultiDictProxy[str],
                  canonical: CanonicalRequest) -> Directive | None:
        """None when the cache stays out of this request; raises BadCacheHeader."""
        opt = headers.get(CACHE_HEADER)
        opted_in = False
        if opt is not None:
            opt = opt.strip().lower()
            if opt == "off":
                return None
            if opt != "on":
                raise BadCacheHeader(f"{CACHE_HEADER} must be 'on' or 'off', got {opt[:20]!r}")
            opted_in = True
        body = canonical.body
        n = body.get("n")
        if n is not None and n != 1:
            return None  # several different answers by design
        if canonical.endpoint is Endpoint.COMPLETIONS:
            best_of = body.get("best_of")
            if best_of is not None and best_of != 1:
                return None  # the upstream samples several and keeps the best: same as n
        model = canonical.model
        if canonical.endpoint is Endpoint.RESPONSES and body.get("conversation") is not None:
            return None  # the upstream appends to the conversation: a hit would skip that
        if canonical.endpoint is Endpoint.EMBEDDINGS:
            if not (opted_in or self._embeddings):
                return None
        else:
            opted_in = opted_in or (self._always is not None
                                    and self._always.fullmatch(model) is not None)
            if not (opted_in or _deterministic(body.get("temperature"), model,
                                               self._deterministic)):
                return None
            if (canonical.endpoint is Endpoint.COMPLETIONS and not opted_in
                    and prompt_count(body.get("prompt")) != 1):
                return None  # several prompts, several choices: cached when opted in only
        lookup = store = True
        control = headers.get("Cache-Control")
        if control:
            tokens = {t.strip().lower().split("=", 1)[0] for t in control.split(",")}
            lookup = "no-cache" not in tokens
            store = "no-store" not in tokens
        ttl_s = self.ttl_s
        ttl_text = headers.get(TTL_HEADER)
        if ttl_text is not None:
            ttl_s = self._ttl(ttl_text)
        if not (lookup or store):
            return None
        return Directive(lookup, store, ttl_s)

    def _ttl(self, text: str) -> int:
        text = text.strip()
        if not text.isdigit() or not 1 <= int(text) <= self.max_ttl_s:
            raise BadCacheHeader(f"{TTL_HEADER} must be a whole number of seconds from 1 to "
                                 f"{self.max_ttl_s}, got {text[:20]!r}")
        return int(text)


def _deterministic(temperature: object, model: str, defaults: re.Pattern[str] | None) -> bool:
    if temperature is None:
        return defaults is not None and defaults.fullmatch(model) is not None
    return (isinstance(temperature, int | float) and not isinstance(temperature, bool)
            and temperature == 0)


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One compiled pattern for a list of globs (None for an empty list)."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
