"""The semantic tier: answer a prompt that means the same as one already answered.

Only chat requests whose last message is a user turn of plain text take
part. Everything before that turn, and every parameter, forms the request's
*context* (a digest, with the tenant scope and the embedder's name): an
entry can answer only a request of the same context, so a different system
prompt, earlier turn, tool list or temperature never matches. The last turn
is embedded and searched among that context's entries; the most similar
candidate at or above the model's threshold that the guard accepts
(``proxy.cache.guard``: same numbers, negations, quotes, identifiers and
names) is the hit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import translate
from typing import Any

import numpy as np

from proxy.cache.embedder import Embedder, Vector
from proxy.cache.guard import Features, Guard
from proxy.cache.keys import NOT_IN_KEY, PREFIX, digest
from proxy.cache.semantic_index import Candidate, IndexEntry, SemanticIndex
from proxy.wire.canonical import CanonicalRequest, Endpoint


@dataclass(slots=True)
class Probe:
    """A request's semantic view: its context, and its last user turn embedded."""

    context: str
    vector: Vector
    features: Features


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a semantic lookup found.

    ``outcome`` is ``hit``, ``below_threshold`` (the best candidate was not
    close enough), ``refused`` (close enough, but the guard said no; ``reason``
    says why) or ``empty`` (no entry in this context).
    """

    outcome: str
    similarity: float = 0.0
    key: str = ""
    reason: str = ""


class Thresholds:
    """The similarity a hit needs, per model glob (first match wins), else the default."""

    def __init__(self, default: float, per_model: Mapping[str, float]) -> None:
        self.default = default
        self._rules = [(re.compile(translate(glob)), value) for glob, value in per_model.items()]
        self._memo: dict[str, float] = {}

    def for_model(self, model: str) -> float:
        """The threshold for requests to ``model``."""
        value = self._memo.get(model)
        if value is None:
            value = next((v for pattern, v in self._rules if pattern.match(model)), self.default)
            if len(self._memo) < 4096:
                self._memo[model] = value
        return value


class SemanticTier:
    """Embed, search, guard; and index the answers that get stored."""

    def __init__(self, embedder: Embedder, guard: Guard, index: SemanticIndex,
                 thresholds: Thresholds, *, max_chars: int = 2000, candidates: int = 4) -> None:
        self.embedder = embedder
        self.guard = guard
        self.index = index
        self.thresholds = thresholds
        self.max_chars = max_chars
        self.candidates = candidates
        self._namespace = "\x00semantic\x00" + embedder.name

    def probe(self, scope: str, canonical: CanonicalRequest) -> Probe | None:
        """The request's context and embedded last turn, or None if it cannot take part."""
        if canonical.endpoint is not Endpoint.CHAT:
            return None
        messages = canonical.body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = _plain_text(last.get("content"))
        if text is None or not text.strip() or len(text) > self.max_chars:
            return None
        body = {k: v for k, v in canonical.body.items() if k not in NOT_IN_KEY}
        body["messages"] = [*messages[:-1],
                            {k: v for k, v in last.items() if k != "content"}]
        context = PREFIX + "c:" + digest(scope + self._namespace, canonical.endpoint.value, body)
        vector = self.embedder.embed(text)
        if not np.any(vector):
            return None  # no known token: nothing to compare by
        return Probe(context, vector, self.guard.features(text))

    def lookup(self, probe: Probe, model: str, now: float | None = None) -> Lookup:
        """The best acceptable stored prompt for ``probe`` (see :class:`Lookup`)."""
        now = time.time() if now is None else now
        found: list[Candidate] = self.index.search(probe.context, probe.vector,
                                                   self.candidates, now)
        if not found:
            return Lookup("empty")
        threshold = self.thresholds.for_model(model)
        best = found[0].similarity
        reason = ""
        for candidate in found:
            if candidate.similarity < threshold:
                break
            reason = self.guard.refuses(probe.features, candidate.entry.features) or ""
            if not reason:
                return Lookup("hit", candidate.similarity, candidate.entry.key)
        if reason:
            return Lookup("refused", best, reason=reason)
        return Lookup("below_threshold", best)

    def add(self, probe: Probe, key: str, ttl_s: float, now: float | None = None) -> IndexEntry:
        """Index the stored answer under ``key`` for ``probe``'s prompt."""
        now = time.time() if now is None else now
        entry = IndexEntry(key, probe.context, probe.features, now + ttl_s)
        self.index.add(entry, probe.vector)
        return entry


def _plain_text(content: Any) -> str | None:
    """The text of a message's content if it is only text (an image or audio part: None)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            return None
        text = part.get("text")
        if not isinstance(text, str):
            return None
        texts.append(text)
    return "\n".join(texts)
