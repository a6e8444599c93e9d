"""Legacy ``/v1/completions`` answers in the cache: what is stored, and how a hit is replayed.

As for chat, one stored form: the non-streaming ``text_completion`` object.
A streamed upstream answer is rebuilt into it by :class:`TextStreamAssembler`
(text pieces joined per choice index, ``finish_reason``, logprobs lists
joined, usage from the usage-only chunk when there is one). It is stored only
when whole: every choice finished by ``stop`` or ``length``, one choice per
prompt, and for a stream the ``[DONE]`` seen. A prompt that is a list of
several prompts gets one choice each; all of them are stored and replayed.

A hit keeps the text, ``finish_reason``, logprobs, ``model``,
``system_fingerprint`` and ``usage`` of the original; ``id`` (a new
``cmpl-…``) and ``created`` are fresh. A replayed stream is, per choice, the
text in pieces (``finish_reason: null``; with logprobs, the whole text in one
chunk carrying them, so text and logprobs stay aligned), then a chunk with
empty text and the ``finish_reason``; then, if the client asked for
``stream_options.include_usage``, a ``choices: []`` chunk with the usage
(every other chunk then has ``"usage": null``); then ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.cache.replay import DONE_EVENT, chunk_frame

__all__ = ["ID_PREFIX", "TextStreamAssembler", "complete_text", "prompt_count", "text_chunks"]

ID_PREFIX = "cmpl-"
_STORED_FINISH = frozenset({"stop", "length"})
_PIECE_CHARS = 64


def prompt_count(prompt: object) -> int:
    """How many prompts ``prompt`` holds, each answered by its own choice.

    A string or one token array (a list of ints) is one prompt; a list of
    strings or of token arrays is one per item.
    """
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):
            return 1
        return len(prompt)
    return 0


def complete_text(doc: object, prompts: int) -> bool:
    """Whether ``doc`` is a whole ``text_completion`` for ``prompts`` prompts, worth storing."""
    if (not isinstance(doc, dict) or doc.get("object") != "text_completion" or prompts < 1
            or doc.get("error") is not None):
        return False
    choices = doc.get("choices")
    if not isinstance(choices, list) or len(choices) != prompts:
        return False
    return all(isinstance(c, dict) and isinstance(c.get("text"), str)
               and c.get("finish_reason") in _STORED_FINISH for c in choices)


class _Choice:
    __slots__ = ("finish_reason", "logprobs", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: dict[str, Any] | None = None

    def add_logprobs(self, logprobs: dict[str, Any]) -> bool:
        """Join a chunk's logprobs (parallel lists) to the choice's; False if malformed."""
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            if value is None:
                continue
            if not isinstance(value, list):
                return False
            self.logprobs.setdefault(key, []).extend(value)
        return True


class TextStreamAssembler:
    """Rebuilds one ``text_completion`` from the chunks of a streamed answer.

    Feed the ``data:`` payload of each SSE event to :meth:`feed_event_data`,
    then :meth:`result` is the answer, or None if the stream cannot be stored
    (cut short, carrying an error, or not shaped like completion chunks).
    """

    __slots__ = ("_broken", "_choices", "_created", "_done", "_fingerprint", "_id", "_model",
                 "_usage")

    def __init__(self) -> None:
        self._broken = False
        self._done = False
        self._id: str | None = None
        self._created: int | None = None
        self._model: str | None = None
        self._fingerprint: str | None = None
        self._usage: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}

    def feed_event_data(self, data: bytes) -> None:
        """Take the ``data:`` payload of one SSE event (``[DONE]`` ends the stream)."""
        if self._broken:
            return
        data = data.strip()
        if not data:
            return
        if data == b"[DONE]":
            self._done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._broken = True
            return
        if self._done or not self._feed(chunk):
            self._broken = True

    def _feed(self, chunk: object) -> bool:
        if not isinstance(chunk, dict) or chunk.get("error") is not None:
            return False
        if self._id is None:
            chunk_id, created, model = chunk.get("id"), chunk.get("created"), chunk.get("model")
            if (not isinstance(chunk_id, str) or not isinstance(model, str)
                    or not isinstance(created, int) or isinstance(created, bool)):
                return False
            self._id, self._created, self._model = chunk_id, created, model
        fingerprint = chunk.get("system_fingerprint")
        if isinstance(fingerprint, str):
            self._fingerprint = fingerprint
        usage = chunk.get("usage")
        if usage is not None:
            if not isinstance(usage, dict):
                return False
            self._usage = usage
        choices = chunk.get("choices")
        if choices is None:
            return True
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                return False
            index = choice.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                return False
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = _Choice()
            text = choice.get("text")
            if isinstance(text, str):
                state.text.append(text)
            elif text is not None:
                return False
            logprobs = choice.get("logprobs")
            if logprobs is not None and not (isinstance(logprobs, dict)
                                             and state.add_logprobs(logprobs)):
                return False
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str):
                state.finish_reason = finish_reason
            elif finish_reason is not None:
                return False
        return True

    def result(self) -> dict[str, Any] | None:
        """The assembled ``text_completion``, or None (see the class docstring)."""
        if self._broken or not self._done or self._id is None or not self._choices:
            return None
        choices: list[dict[str, Any]] = []
        for index in range(len(self._choices)):
            state = self._choices.get(index)
            if state is None or state.finish_reason is None:
                return None  # a gap in the indices, or a choice that never finished
            choices.append({"text": "".join(state.text), "index": index,
                            "logprobs": state.logprobs, "finish_reason": state.finish_reason})
        doc: dict[str, Any] = {"id": self._id, "object": "text_completion",
                               "created": self._created, "model": self._model,
                               "choices": choices}
        if self._fingerprint is not None:
            doc["system_fingerprint"] = self._fingerprint
        if self._usage is not None:
            doc["usage"] = self._usage
        return doc


def text_chunks(stored: dict[str, Any], *, now: int, new_id: str, include_usage: bool,
                piece_chars: int = _PIECE_CHARS) -> list[bytes]:
    """The stored ``text_completion`` as the SSE events of a completions stream."""
    if piece_chars < 1:
        raise ValueError("piece_chars must be at least 1")
    head: dict[str, Any] = {"id": new_id, "object": "text_completion", "created": now,
                            "model": stored.get("model")}
    if stored.get("system_fingerprint") is not None:
        head["system_fingerprint"] = stored["system_fingerprint"]
    prefix, suffix = chunk_frame(head, b'[{"text":', include_usage)
    events: list[bytes] = []
    for position, choice in enumerate(stored.get("choices") or ()):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", position)
        text = choice.get("text")
        text = text if isinstance(text, str) else ""
        logprobs = choice.get("logprobs")
        if logprobs is not None:
            events.append(prefix + orjson.dumps(text) + b',"index":' + orjson.dumps(index)
                          + b',"logprobs":' + orjson.dumps(logprobs)
                          + b',"finish_reason":null}]' + suffix)
        else:
            rest = b',"index":' + orjson.dumps(index) + b',"logprobs":null,"finish_reason":null}]'
            events.extend(prefix + orjson.dumps(text[start:start + piece_chars]) + rest + suffix
                          for start in range(0, len(text), piece_chars))
        events.append(prefix + b'"","index":' + orjson.dumps(index)
                      + b',"logprobs":null,"finish_reason":'
                      + orjson.dumps(choice.get("finish_reason") or "stop") + b"}]" + suffix)
    if include_usage:
        events.append(b"data: " + orjson.dumps(head)[:-1] + b',"choices":[],"usage":'
                      + orjson.dumps(stored.get("usage")) + b"}\n\n")
    events.append(DONE_EVENT)
    return events
