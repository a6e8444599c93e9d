"""Serve a cached chat completion, as JSON or as an OpenAI-style SSE stream.

One stored form. The cache keeps a successful answer only as the
non-streaming ``chat.completion`` object, whichever way the client asked for
it: a streamed upstream answer is rebuilt into that object first
(:mod:`proxy.cache.assemble`). One entry then serves both kinds of client, a
``stream: true`` request hits an entry stored from a non-streaming one and
vice versa, and nothing depends on how upstream happened to cut its chunks.

What a hit keeps and what is fresh:

* kept as the original: the message (content, tool calls, refusal, logprobs),
  ``finish_reason``, ``model`` (the exact snapshot upstream answered with),
  ``system_fingerprint``, ``service_tier`` and ``usage``. Usage stays the
  original token counts: they describe the answer the client receives, and the
  sidecar's own accounting knows the hit cost nothing upstream.
* fresh: ``id`` (a new ``chatcmpl-…``, so clients that key on the id do not
  see duplicates) and ``created`` (the time of the hit).

Replayed streams follow OpenAI's chunk sequence: a role chunk, the content in
pieces, each tool call announced (id, name, empty arguments) then its
arguments in pieces, the refusal in pieces, a chunk with an empty delta and
the ``finish_reason``, then (``include_usage``) a ``choices: []`` chunk with
the usage, then ``data: [DONE]``.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["DONE_EVENT", "fresh_completion", "new_completion_id", "sse_chunks"]

DONE_EVENT = b"data: [DONE]\n\n"

_ID_PREFIX = "chatcmpl-"
_ID_CHARS = 29
_ALPHABET = (string.ascii_letters + string.digits).encode()  # 62 symbols
# Bytes below 248 (= 4 * 62) map onto the alphabet without bias; the rest are dropped.
_ACCEPT = 4 * len(_ALPHABET)
_ID_TABLE = bytes(_ALPHABET[b % len(_ALPHABET)] for b in range(256))
_ID_REJECT = bytes(range(_ACCEPT, 256))

# Message keys replayed by a dedicated rule; other string-valued keys
# (e.g. ``reasoning_content``) are streamed in pieces before the content.
_MESSAGE_KEYS = frozenset({"role", "content", "refusal", "tool_calls", "function_call",
                           "annotations", "audio"})


def new_completion_id(prefix: str = _ID_PREFIX) -> str:
    """A fresh id: ``prefix`` (``chatcmpl-``; ``cmpl-`` for a legacy completion) and
    29 random alphanumeric characters."""
    out = b""
    while len(out) < _ID_CHARS:
        out += os.urandom(40).translate(_ID_TABLE, _ID_REJECT)
    return prefix + out[:_ID_CHARS].decode("ascii")


def fresh_completion(stored: dict[str, Any], now: int, new_id: str) -> bytes:
    """The stored ``chat.completion`` as JSON, with a new ``id`` and ``created``."""
    return orjson.dumps({**stored, "id": new_id, "created": now})


def _pieces(text: str, size: int) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start:start + size]


def _choice_deltas(
    choice: dict[str, Any], piece_chars: int,
) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """(delta, logprobs, finish_reason) for every chunk of one choice."""
    message: dict[str, Any] = choice.get("message") or {}
    content = message.get("content")
    refusal = message.get("refusal")
    # Logprobs ride, whole, on the first chunk carrying text (else on the last one).
    logprobs = choice.get("logprobs")

    def take_logprobs() -> Any:
        nonlocal logprobs
        value, logprobs = logprobs, None
        return value

    yield ({"role": message.get("role") or "assistant",
            # A null content stays null (a tool-call answer), as OpenAI streams it.
            "content": "" if isinstance(content, str) else None,
            "refusal": None}, None, None)
    for key, value in message.items():
        if key not in _MESSAGE_KEYS and isinstance(value, str):
            for piece in _pieces(value, piece_chars):
                yield {key: piece}, None, None
    if isinstance(content, str):
        for piece in _pieces(content, piece_chars):
            yield {"content": piece}, take_logprobs(), None
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        yield ({"tool_calls": [{"index": index, "id": call.get("id"),
                                "type": call.get("type") or "function",
                                "function": {"name": function.get("name"), "arguments": ""}}]},
               None, None)
        for piece in _pieces(function.get("arguments") or "", piece_chars):
            yield {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, None, None
    function_call = message.get("function_call")
    if isinstance(function_call, dict):  # legacy ``functions`` API
        yield {"function_call": {"name": function_call.get("name"), "arguments": ""}}, None, None
        for piece in _pieces(function_call.get("arguments") or "", piece_chars):
            yield {"function_call": {"arguments": piece}}, None, None
    if isinstance(refusal, str):
        for piece in _pieces(refusal, piece_chars):
            yield {"refusal": piece}, take_logprobs(), None
    yield {}, take_logprobs(), choice.get("finish_reason") or "stop"


def sse_chunks(
    stored: dict[str, Any],
    *,
    now: int,
    new_id: str,
    include_usage: bool,
    piece_chars: int = 64,
) -> list[bytes]:
    """The stored ``chat.completion`` as the SSE events of a ``chat.completion.chunk`` stream.

    Each event is ``b"data: " + json + b"\\n\\n"``; the last one is ``data: [DONE]``.
    With ``include_usage`` every chunk carries ``"usage": null`` and a final
    ``choices: []`` chunk carries the stored usage, as OpenAI does for
    ``stream_options.include_usage``.
    """
    if piece_chars < 1:
        raise ValueError("piece_chars must be at least 1")
    head: dict[str, Any] = {
        "id": new_id,
        "object": "chat.completion.chunk",
        "created": now,
        "model": stored.get("model"),
    }
    if stored.get("service_tier") is not None:
        head["service_tier"] = stored["service_tier"]
    if stored.get("system_fingerprint") is not None:
        head["system_fingerprint"] = stored["system_fingerprint"]
    prefix, suffix = chunk_frame(head, b"", include_usage)

    events: list[bytes] = []
    for position, choice in enumerate(stored.get("choices") or ()):
        index = choice.get("index", position)
        for delta, logprobs, finish_reason in _choice_deltas(choice, piece_chars):
            body = [{"index": index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": finish_reason}]
            events.append(prefix + orjson.dumps(body) + suffix)
    if include_usage:
        events.append(prefix + b'[],"usage":' + orjson.dumps(stored.get("usage")) + b"}\n\n")
    events.append(DONE_EVENT)
    return events


def chunk_frame(head: dict[str, Any], choices_open: bytes,
                include_usage: bool) -> tuple[bytes, bytes]:
    """The bytes before and after each chunk's choices in a replayed stream.

    Every chunk shares the same leading fields, so they are serialized once and
    spliced; ``choices_open`` is what follows ``"choices":`` in every chunk.
    """
    prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":' + choices_open
    suffix = b',"usage":null}\n\n' if include_usage else b"}\n\n"
    return prefix, suffix
