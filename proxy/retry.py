"""When a failed upstream attempt is tried again, on which model, and after how long.

Retried: 429 and 5xx answers, timeouts and connection failures before the
response head. Never: other 4xx (the request itself is wrong, another try
gets the same answer), and never once a stream has begun reaching the client
(the pipeline only asks before relaying). A model gets ``max_retries`` more
tries with exponential backoff and jitter, honouring the upstream's
``retry-after`` unless it asks for longer than ``max_retry_after_s``; then
each model of its fallback chain gets one try.
"""

from __future__ import annotations

import fnmatch
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import RetryConfig
from proxy.routing.catalog import Catalog, ModelSpec

# UpstreamError kinds worth another try (see proxy.upstream); "session_closed"
# means the sidecar is stopping, and body errors come after the head.
RETRYABLE_KINDS = frozenset({"connect_error", "timeout", "disconnected", "client_error"})


def retryable_status(status: int) -> bool:
    """Whether an upstream answer with this status may be retried."""
    return status == 429 or status >= 500


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The delay an upstream asked for (``retry-after-ms`` or ``retry-after`` seconds)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None  # an HTTP date: rare from LLM APIs; fall back to backoff
    return None


@dataclass(frozen=True, slots=True)
class Next:
    """The next attempt: which model (catalog name and the name sent), where, after how long."""

    model: str
    serves: str
    upstream: str | None
    delay_s: float
    fallback: bool


class Attempts:
    """The attempts of one request, consumed as each one fails."""

    __slots__ = ("_chain", "_policy", "_retries", "model")

    def __init__(self, policy: RetryPolicy, model: str) -> None:
        self._policy = policy
        self._retries = 0
        self._chain: list[ModelSpec] | None = None
        self.model = model

    def next(self, retry_after: float | None = None) -> Next | None:
        """The attempt after a failure, or None when the request has no tries left."""
        policy = self._policy
        if self._retries < policy.max_retries and (
                retry_after is None or retry_after <= policy.max_retry_after_s):
            delay = retry_after if retry_after is not None else policy.backoff(self._retries)
            self._retries += 1
            return Next(self.model, "", None, delay, fallback=False)
        if self._chain is None:
            self._chain = list(policy.chain(self.model))
        if not self._chain:
            return None
        spec = self._chain.pop(0)
        # A fallback gets one try: the chain itself is the retry.
        self._retries = policy.max_retries
        self.model = spec.name
        return Next(spec.name, spec.serves, spec.upstream, 0.0, fallback=True)


class RetryPolicy:
    """Retry limits and fallback chains from ``routing.retry``, with the catalog to place models."""

    def __init__(self, cfg: RetryConfig, catalog: Catalog,
                 rng: random.Random | None = None) -> None:
        self.max_retries = cfg.max_retries
        self.max_retry_after_s = cfg.max_retry_after_s
        self._backoff_s = cfg.backoff_ms / 1000
        self._max_backoff_s = cfg.max_backoff_ms / 1000
        self._rng = rng or random.Random()
        self._catalog = catalog
        self._globs = [(re.compile(fnmatch.translate(g)), chain)
                       for g, chain in cfg.fallbacks.items()]
        self._chains: dict[str, tuple[ModelSpec, ...]] = {}

    @property
    def active(self) -> bool:
        """Whether a failed attempt can ever be tried again."""
        return self.max_retries > 0 or bool(self._globs)

    def attempts(self, model: str) -> Attempts:
        """A fresh attempt sequence for a request to ``model``."""
        return Attempts(self, model)

    def backoff(self, retry: int) -> float:
        """Delay before retry number ``retry`` (0-based): doubling, capped, with jitter."""
        full: float = min(self._max_backoff_s, self._backoff_s * 2.0 ** retry)
        return full * (0.5 + self._rng.random() / 2)

    def chain(self, model: str) -> tuple[ModelSpec, ...]:
        """The fallback models for ``model`` (first matching glob), without ``model`` itself."""
        try:
            return self._chains[model]
        except KeyError:
            pass
        found: tuple[ModelSpec, ...] = ()
        for pattern, names in self._globs:
            if pattern.match(model):
                found = tuple(s for n in names if n != model
                              and (s := self._catalog.get(n)) is not None)
                break
        if len(self._chains) > 4096:
            self._chains.clear()
        self._chains[model] = found
        return found
