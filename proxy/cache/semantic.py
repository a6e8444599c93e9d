"""The semantic tier: answer a prompt that means the same as one already answered.

Only chat requests whose last message is a user turn of plain text take
part. Everything before that turn, and every parameter, forms the request's
*context* (a digest, with the tenant scope and the embedder's name): an
entry can answer only a request of the same context, so a different system
prompt, earlier turn, tool list or temperature never matches. The last turn
is embedded and searched among that context's entries; the most similar
candidate at or above the model's threshold that the guard accepts
(``proxy.cache.guard``: same numbers, negations, quotes, identifiers and
names) is the hit. With a verifier (``proxy.cache.verifier``), such a
candidate is a hit only if a sentence transformer also rates the two prompts
at or above its own threshold; a candidate stored without the verifier's
vector (by a replica that runs none) is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any

import numpy as np

from proxy.cache.embedder import Embedder, Vector
from proxy.cache.guard import Features, Guard
from proxy.cache.keys import NOT_IN_KEY, PREFIX, digest
from proxy.cache.normalize import Normalizer
from proxy.cache.remote_embedder import UpstreamEmbedder
from proxy.cache.semantic_index import Candidate, IndexEntry, SemanticIndex
from proxy.cache.verifier import Verifier
from proxy.wire.canonical import CanonicalRequest, Endpoint

# Static-embedder thresholds chosen by loadtest/bench_semantic.py: alone, and
# as the candidate filter in front of a verifier (which then decides).
DEFAULT_THRESHOLD = 0.90
THRESHOLD_WITH_VERIFIER = 0.85


@dataclass(slots=True)
class Probe:
    """A request's semantic view: its context, and its last user turn embedded."""

    context: str
    vector: Vector | None  # None until a remote embedder answered (``SemanticTier.embed``)
    features: Features
    text: str
    check: bytes | None = None  # the verifier's vector, once computed
    # The agent's Authorization, for a remote embedder that may bill it; never logged.
    authorization: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a semantic lookup found.

    ``outcome`` is ``hit``, ``below_threshold`` (the best candidate was not
    close enough), ``refused`` (close enough, but the guard or the verifier
    said no; ``reason`` says why), ``empty`` (no entry in this context) or
    ``verify`` (candidates the verifier must still check: ``pending``).
    """

    outcome: str
    similarity: float = 0.0
    key: str = ""
    reason: str = ""
    expires_at: float = 0.0
    verified: float | None = None  # the verifier's similarity, for a verified hit
    pending: tuple[Candidate, ...] = ()


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

    def __init__(self, embedder: Embedder | UpstreamEmbedder, guard: Guard, index: SemanticIndex,
                 thresholds: Thresholds, *, max_chars: int = 2000, candidates: int = 4,
                 verifier: Verifier | None = None,
                 normalizer: Normalizer | None = None) -> None:
        self.embedder = embedder
        self.verifier = verifier
        self.normalizer = normalizer
        self.guard = guard
        self.index = index
        self.thresholds = thresholds
        self.max_chars = max_chars
        self.candidates = candidates
        self._namespace = "\x00semantic\x00" + embedder.name + (
            "\x00" + normalizer.signature if normalizer is not None else "")

    def probe(self, scope: str, canonical: CanonicalRequest, authorization: str | None = None,
              normalized: list[Any] | None = None) -> Probe | None:
        """The request's context and embedded last turn, or None if it cannot take part.

        ``normalized``: the request's messages as this tier's normalizer already
        rewrote them (``RequestKeys.messages``), to skip doing it again. With a
        remote embedder the vector is not there yet: :meth:`embed` fetches it.
        """
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
        earlier = messages[:-1]
        normalizer = self.normalizer
        if normalizer is not None:
            # The context matches as the normalized tier would: an agent that
            # stamps the time or a request id into its system prompt still
            # meets its earlier requests. The namespace holds the normalizer's
            # signature, so differently configured replicas never mix.
            earlier = (normalized[:-1] if normalized is not None
                       else normalizer.normalize_messages(earlier))
            text = normalizer.mask_volatile(text)
        body["messages"] = [*earlier, {k: v for k, v in last.items() if k != "content"}]
        context = PREFIX + "c:" + digest(scope + self._namespace, canonical.endpoint.value, body)
        embedder = self.embedder
        if isinstance(embedder, UpstreamEmbedder):
            return Probe(context, None, self.guard.features(text), text,
                         authorization=authorization)
        vector = embedder.embed(text)
        if not np.any(vector):
            return None  # no known token: nothing to compare by
        return Probe(context, vector, self.guard.features(text), text)

    async def embed(self, probe: Probe) -> bool:
        """Fetch ``probe``'s vector from a remote embedder; False if it has none to give."""
        if probe.vector is not None:
            return True
        embedder = self.embedder
        if not isinstance(embedder, UpstreamEmbedder):
            return False
        probe.vector = await embedder.embed(probe.text, probe.authorization)
        return probe.vector is not None

    def lookup(self, probe: Probe, model: str, now: float | None = None) -> Lookup:
        """The best acceptable stored prompt for ``probe`` (see :class:`Lookup`)."""
        now = time.time() if now is None else now
        if probe.vector is None:
            return Lookup("empty")
        found: list[Candidate] = self.index.search(probe.context, probe.vector,
                                                   self.candidates, now)
        if not found:
            return Lookup("empty")
        threshold = self.thresholds.for_model(model)
        best = found[0].similarity
        reason = ""
        accepted: list[Candidate] = []
        for candidate in found:
            if candidate.similarity < threshold:
                break
            reason = self.guard.refuses(probe.features, candidate.entry.features) or ""
            if not reason:
                if self.verifier is None:
                    return Lookup("hit", candidate.similarity, candidate.entry.key,
                                  expires_at=candidate.entry.expires_at)
                accepted.append(candidate)
        if accepted:
            return Lookup("verify", best, pending=tuple(accepted))
        if reason:
            return Lookup("refused", best, reason=reason)
        return Lookup("below_threshold", best)

    async def verify(self, probe: Probe, looked: Lookup) -> Lookup:
        """The first of ``looked.pending`` the verifier accepts, else a refusal."""
        verifier = self.verifier
        if verifier is None or looked.outcome != "verify":
            return looked
        await self.prepare(probe)
        assert probe.check is not None
        reason = "unverified"  # only candidates stored without the verifier's vector
        for candidate in looked.pending:
            if candidate.entry.check is None:
                continue
            similarity = verifier.similarity(probe.check, candidate.entry.check)
            if similarity is None:
                continue
            if similarity >= verifier.threshold:
                return Lookup("hit", candidate.similarity, candidate.entry.key,
                              expires_at=candidate.entry.expires_at, verified=similarity)
            reason = "verifier"
        return Lookup("refused", looked.similarity, reason=reason)

    async def prepare(self, probe: Probe) -> bool:
        """Everything :meth:`add` needs: the prompt's vector (a remote embedder's, if
        not fetched yet) and the verifier's. False if the vector cannot be had."""
        if not await self.embed(probe):
            return False
        if self.verifier is not None and probe.check is None:
            probe.check = await self.verifier.embed(probe.text)
        return True

    def add(self, probe: Probe, key: str, ttl_s: float, now: float | None = None) -> IndexEntry:
        """Index the stored answer under ``key`` for ``probe``'s prompt.

        With a verifier, call :meth:`prepare` first so the entry carries its vector.
        """
        if probe.vector is None:
            raise ValueError("the probe has no vector yet: call prepare() first")
        now = time.time() if now is None else now
        entry = IndexEntry(key, probe.context, probe.features, now + ttl_s, probe.check)
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
