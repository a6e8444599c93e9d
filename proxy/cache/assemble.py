"""Rebuild a ``chat.completion`` object from the chunks of a streamed response.

The cache stores one canonical form, the non-streaming ``chat.completion``
object. When the upstream answer was streamed, :class:`ChatStreamAssembler`
is fed every ``chat.completion.chunk`` as it is relayed and, once the stream
ended, :meth:`ChatStreamAssembler.result` gives the equivalent completion.

It never raises on odd input: a chunk it cannot make sense of marks the
stream as broken and the result is ``None`` (the response is simply not
cached). ``None`` is also the answer for a stream that is not worth storing:
one that stopped before a ``finish_reason``, carried an ``error``, or had more
than one choice (``n > 1`` is not cached).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["ChatStreamAssembler"]


class _Broken(Exception):
    """Internal: the stream cannot be assembled."""


# Delta keys with a dedicated merge rule. Any other delta key holding a string
# (e.g. ``reasoning_content`` from OpenAI-compatible servers) is concatenated;
# one holding anything else (e.g. ``audio``) makes the stream uncacheable.
_KNOWN_DELTA_KEYS = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})


def _index(value: object) -> int:
    """A list index: a non-negative int (a bool is not one); anything else is broken."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _Broken


def _opt_str(value: object) -> str | None:
    """``value`` if it is a string, ``None`` if null or absent; anything else is broken."""
    if value is None or isinstance(value, str):
        return value
    raise _Broken


def _opt_dict(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    raise _Broken


def _opt_list(value: object) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return value
    raise _Broken


class _ToolCall:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []


class _Choice:
    __slots__ = ("content", "extra", "finish_reason", "function_call", "logprobs_content",
                 "logprobs_refusal", "logprobs_seen", "refusal", "role", "tool_calls")

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] | None = None  # None: no string content was ever sent
        self.refusal: list[str] | None = None
        self.extra: dict[str, list[str]] = {}
        self.tool_calls: dict[int, _ToolCall] = {}
        self.function_call: _ToolCall | None = None  # legacy ``functions`` API
        self.finish_reason: str | None = None
        self.logprobs_seen = False
        self.logprobs_content: list[Any] | None = None
        self.logprobs_refusal: list[Any] | None = None

    def add_delta(self, delta: dict[str, Any]) -> None:
        role = _opt_str(delta.get("role"))
        if role is not None:
            self.role = role
        content = _opt_str(delta.get("content"))
        if content is not None:
            if self.content is None:
                self.content = []
            self.content.append(content)
        refusal = _opt_str(delta.get("refusal"))
        if refusal is not None:
            if self.refusal is None:
                self.refusal = []
            self.refusal.append(refusal)
        for call in _opt_list(delta.get("tool_calls")) or ():
            self._add_tool_call(call)
        function_call = _opt_dict(delta.get("function_call"))
        if function_call is not None:
            if self.function_call is None:
                self.function_call = _ToolCall()
            self._merge_function(self.function_call, function_call)
        if not _KNOWN_DELTA_KEYS.issuperset(delta):
            for key, value in delta.items():
                if key in _KNOWN_DELTA_KEYS or value is None:
                    continue
                if not isinstance(value, str):
                    raise _Broken
                self.extra.setdefault(key, []).append(value)

    def _add_tool_call(self, call: object) -> None:
        if not isinstance(call, dict):
            raise _Broken
        call_id = _opt_str(call.get("id"))
        index = call.get("index")
        if index is None:
            # Some OpenAI-compatible servers omit the index: a new id opens a
            # new call, a fragment without one continues the last call.
            last = max(self.tool_calls, default=-1)
            opens = last < 0 or (call_id is not None
                                 and self.tool_calls[last].id not in (None, call_id))
            index = last + 1 if opens else last
        else:
            index = _index(index)
        slot = self.tool_calls.get(index)
        if slot is None:
            slot = self.tool_calls[index] = _ToolCall()
        if call_id and slot.id is None:
            slot.id = call_id
        call_type = _opt_str(call.get("type"))
        if call_type and slot.type is None:
            slot.type = call_type
        function = _opt_dict(call.get("function"))
        if function is not None:
            self._merge_function(slot, function)

    @staticmethod
    def _merge_function(slot: _ToolCall, function: dict[str, Any]) -> None:
        name = _opt_str(function.get("name"))
        if name and slot.name is None:
            slot.name = name
        arguments = _opt_str(function.get("arguments"))
        if arguments is not None:
            slot.arguments.append(arguments)

    def add_logprobs(self, logprobs: dict[str, Any]) -> None:
        self.logprobs_seen = True
        content = _opt_list(logprobs.get("content"))
        if content is not None:
            if self.logprobs_content is None:
                self.logprobs_content = []
            self.logprobs_content.extend(content)
        refusal = _opt_list(logprobs.get("refusal"))
        if refusal is not None:
            if self.logprobs_refusal is None:
                self.logprobs_refusal = []
            self.logprobs_refusal.extend(refusal)

    def build(self) -> dict[str, Any] | None:
        if self.finish_reason is None:
            return None
        message: dict[str, Any] = {
            "role": self.role or "assistant",
            "content": None if self.content is None else "".join(self.content),
            "refusal": None if self.refusal is None else "".join(self.refusal),
        }
        for key, parts in self.extra.items():
            message[key] = "".join(parts)
        if self.tool_calls:
            calls = []
            for index in sorted(self.tool_calls):
                call = self.tool_calls[index]
                if call.id is None or call.name is None:
                    return None  # a call never announced: the stream is not whole
                calls.append({
                    "id": call.id,
                    "type": call.type or "function",
                    "function": {"name": call.name, "arguments": "".join(call.arguments)},
                })
            message["tool_calls"] = calls
        if self.function_call is not None:
            if self.function_call.name is None:
                return None
            message["function_call"] = {
                "name": self.function_call.name,
                "arguments": "".join(self.function_call.arguments),
            }
        logprobs = None
        if self.logprobs_seen:
            logprobs = {"content": self.logprobs_content, "refusal": self.logprobs_refusal}
        return {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
        }


class ChatStreamAssembler:
    """Accumulates ``chat.completion.chunk`` objects into one ``chat.completion``.

    Feed decoded chunks with :meth:`feed`, or the raw ``data:`` payloads of the
    SSE events with :meth:`feed_event_data`; then call :meth:`result`.
    """

    __slots__ = ("_broken", "_choices", "_created", "_id", "_model", "_service_tier",
                 "_system_fingerprint", "_usage")

    def __init__(self) -> None:
        self._broken = False
        self._id: str | None = None
        self._created: int | None = None
        self._model: str | None = None
        self._system_fingerprint: str | None = None
        self._service_tier: str | None = None
        self._usage: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}

    @property
    def broken(self) -> bool:
        """True once the stream was found unusable (``result()`` will be ``None``)."""
        return self._broken

    def feed_event_data(self, data: bytes) -> None:
        """Feed the ``data:`` payload of one SSE event (``[DONE]`` and empty data ignored)."""
        if self._broken:
            return
        data = data.strip()
        if not data or data == b"[DONE]":
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._broken = True
            return
        self.feed(chunk)

    def feed(self, chunk: dict[str, Any]) -> None:
        """Feed one decoded ``chat.completion.chunk``."""
        if self._broken:
            return
        try:
            self._feed(chunk)
        except _Broken:
            self._broken = True

    def _feed(self, chunk: object) -> None:
        if not isinstance(chunk, dict) or chunk.get("error") is not None:
            raise _Broken
        chunk_id = _opt_str(chunk.get("id"))
        if chunk_id and self._id is None:
            self._id = chunk_id
        created = chunk.get("created")
        if created is not None:
            if not isinstance(created, int) or isinstance(created, bool):
                raise _Broken
            if self._created is None:
                self._created = created
        model = _opt_str(chunk.get("model"))
        if model and self._model is None:
            self._model = model
        fingerprint = _opt_str(chunk.get("system_fingerprint"))
        if fingerprint is not None:
            self._system_fingerprint = fingerprint
        tier = _opt_str(chunk.get("service_tier"))
        if tier is not None:
            self._service_tier = tier
        usage = _opt_dict(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        for choice in _opt_list(chunk.get("choices")) or ():
            if not isinstance(choice, dict):
                raise _Broken
            index = _index(choice.get("index"))
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice()
            delta = _opt_dict(choice.get("delta"))
            if delta:
                state.add_delta(delta)
            logprobs = _opt_dict(choice.get("logprobs"))
            if logprobs is not None:
                state.add_logprobs(logprobs)
            finish_reason = _opt_str(choice.get("finish_reason"))
            if finish_reason:
                state.finish_reason = finish_reason

    def result(self) -> dict[str, Any] | None:
        """The assembled ``chat.completion``, or ``None`` if the stream is not cacheable."""
        if self._broken or self._id is None or self._model is None or self._created is None:
            return None
        if len(self._choices) != 1 or 0 not in self._choices:
            return None
        choice = self._choices[0].build()
        if choice is None:
            return None
        completion: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [choice],
        }
        if self._usage is not None:
            completion["usage"] = self._usage
        if self._service_tier is not None:
            completion["service_tier"] = self._service_tier
        if self._system_fingerprint is not None:
            completion["system_fingerprint"] = self._system_fingerprint
        return completion
