"""Token usage as the provider reports it, in one shape for every endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens billed for one request."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read a ``usage`` object from chat, completions, embeddings or responses."""
        if not isinstance(usage, dict):
            return None
        inp = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
        out = _int(usage.get("completion_tokens", usage.get("output_tokens")))
        total = _int(usage.get("total_tokens")) or inp + out
        in_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        out_details = (usage.get("completion_tokens_details")
                       or usage.get("output_tokens_details"))
        cached = _int(in_details.get("cached_tokens")) if isinstance(in_details, dict) else 0
        reasoning = (_int(out_details.get("reasoning_tokens"))
                     if isinstance(out_details, dict) else 0)
        return cls(inp, out, total, cached, reasoning)


@dataclass(frozen=True, slots=True)
class ResponseSummary:
    """What telemetry reports about an answer: its id, model, finish reasons and usage."""

    id: str | None = None
    model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    usage: Usage | None = None

    @classmethod
    def from_document(cls, doc: Any) -> ResponseSummary:
        """Summarize a decoded chat/completions/embeddings/responses object."""
        if not isinstance(doc, dict):
            return cls()
        reasons: list[str] = []
        choices = doc.get("choices")
        if isinstance(choices, list):
            reasons = [c["finish_reason"] for c in choices
                       if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
        elif isinstance(doc.get("status"), str) and doc.get("object") == "response":
            reasons = [doc["status"]]
        rid, model = doc.get("id"), doc.get("model")
        return cls(rid if isinstance(rid, str) else None,
                   model if isinstance(model, str) else None,
                   tuple(reasons), Usage.from_openai(doc.get("usage")))

    @classmethod
    def from_body(cls, body: bytes) -> ResponseSummary:
        """Summarize a complete JSON response body (empty summary if it is not JSON)."""
        try:
            return cls.from_document(orjson.loads(body))
        except orjson.JSONDecodeError:
            return cls()



def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
