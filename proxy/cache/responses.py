"""Responses API answers in the cache: which are stored, and how a hit is replayed.

A ``response`` object is stored only when its ``status`` is ``completed``. A
streamed answer needs no rebuilding: its ``response.completed`` event carries
the whole object, which is what is kept.

Unlike a chat completion, a hit keeps the original ``id``: a response id is a
handle the upstream resolves (``previous_response_id``, retrieval), so a
fresh one would break the agent's next turn. Only ``created_at`` is fresh.
Entries are per tenant, so the id goes back to the organisation that
created it. Requests bound to a server-side ``conversation`` are never
cached (the upstream appends to the conversation as a side effect), and
``store`` is part of the key, since a response the upstream did not store
cannot be chained from.

A replayed stream follows the upstream's event sequence:
``response.created`` and ``response.in_progress`` (status ``in_progress``,
no output), then per output item ``output_item.added``, its content (text
parts: ``content_part.added``, ``output_text.delta`` in pieces,
``output_text.done``, ``content_part.done``; function calls:
``function_call_arguments.delta`` in pieces and ``.done``), and
``output_item.done``; then ``response.completed`` with the stored object.
Every event has the next ``sequence_number``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

_PIECE = 24  # characters per replayed delta: a few tokens, as the upstream sends them


def complete_response(doc: object) -> bool:
    """Whether ``doc`` is a finished Responses API answer worth storing."""
    return (isinstance(doc, dict) and doc.get("object") == "response"
            and doc.get("status") == "completed" and isinstance(doc.get("output"), list)
            and not doc.get("error"))


def fresh_response(stored: dict[str, Any], now: int) -> dict[str, Any]:
    """The stored response with ``created_at`` set to now (the id is kept: see above)."""
    return stored | {"created_at": now}


class ResponsesStreamAssembler:
    """Keeps the ``response`` object of a stream's ``response.completed`` event."""

    def __init__(self) -> None:
        self._response: dict[str, Any] | None = None

    def feed_event_data(self, data: bytes) -> None:
        """Take one event's data (the relay calls this for terminal events only)."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict) and doc.get("type") == "response.completed":
            response = doc.get("response")
            if isinstance(response, dict):
                self._response = response

    def result(self) -> dict[str, Any] | None:
        """The completed response, or None if the stream did not complete."""
        return self._response


def response_events(stored: dict[str, Any]) -> list[bytes]:
    """The SSE events replaying ``stored`` (see the module docstring)."""
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": len(events), **fields}
        events.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload)
                      + b"\n\n")

    started = stored | {"status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=started)
    emit("response.in_progress", response=started)
    for index, item in enumerate(stored.get("output") or ()):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            _message(emit, index, item)
        elif kind == "function_call":
            _function_call(emit, index, item)
        else:  # reasoning, tool calls run by the provider: announced whole
            emit("response.output_item.added", output_index=index, item=item)
            emit("response.output_item.done", output_index=index, item=item)
    emit("response.completed", response=stored)
    return events


def _message(emit: Any, index: int, item: dict[str, Any]) -> None:
    item_id = item.get("id")
    emit("response.output_item.added", output_index=index,
         item=item | {"status": "in_progress", "content": []})
    for part_index, part in enumerate(item.get("content") or ()):
        if not isinstance(part, dict):
            continue
        where = {"item_id": item_id, "output_index": index, "content_index": part_index}
        if part.get("type") == "output_text":
            text = part.get("text") or ""
            emit("response.content_part.added", **where,
                 part=part | {"text": "", "annotations": []})
            for piece in _pieces(text):
                emit("response.output_text.delta", **where, delta=piece, logprobs=[])
            emit("response.output_text.done", **where, text=text, logprobs=[])
        elif part.get("type") == "refusal":
            refusal = part.get("refusal") or ""
            emit("response.content_part.added", **where, part=part | {"refusal": ""})
            for piece in _pieces(refusal):
                emit("response.refusal.delta", **where, delta=piece)
            emit("response.refusal.done", **where, refusal=refusal)
        else:
            emit("response.content_part.added", **where, part=part)
        emit("response.content_part.done", **where, part=part)
    emit("response.output_item.done", output_index=index, item=item)


def _function_call(emit: Any, index: int, item: dict[str, Any]) -> None:
    arguments = item.get("arguments") or ""
    item_id = item.get("id")
    emit("response.output_item.added", output_index=index,
         item=item | {"status": "in_progress", "arguments": ""})
    for piece in _pieces(arguments):
        emit("response.function_call_arguments.delta", item_id=item_id, output_index=index,
             delta=piece)
    emit("response.function_call_arguments.done", item_id=item_id, output_index=index,
         arguments=arguments)
    emit("response.output_item.done", output_index=index, item=item)


def _pieces(text: str) -> Iterator[str]:
    for start in range(0, len(text), _PIECE):
        yield text[start:start + _PIECE]
