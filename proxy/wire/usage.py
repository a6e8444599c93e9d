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


def usage_from_body(body: bytes) -> Usage | None:
    """Usage from a complete JSON response body, or None if it has none."""
    if b'"usage"' not in body:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return Usage.from_openai(doc.get("usage")) if isinstance(doc, dict) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
