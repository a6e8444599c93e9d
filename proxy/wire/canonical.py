"""The canonical request: one parsed view of an intercepted call that every stage reads.

Parsing happens once per request. The original bytes are kept and forwarded
as they are unless a stage changes the body, so a request the sidecar does
not touch reaches upstream byte for byte.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

import orjson


class Endpoint(enum.Enum):
    """The intercepted OpenAI endpoints, valued by their path under /v1."""

    CHAT = "/chat/completions"
    COMPLETIONS = "/completions"
    EMBEDDINGS = "/embeddings"
    RESPONSES = "/responses"

    @property
    def operation(self) -> str:
        """The GenAI semantic-convention operation name."""
        return _OPERATIONS[self]

    @property
    def has_stream_usage_option(self) -> bool:
        """Whether ``stream_options.include_usage`` exists for this endpoint."""
        return self in (Endpoint.CHAT, Endpoint.COMPLETIONS)


_OPERATIONS = {
    Endpoint.CHAT: "chat",
    Endpoint.COMPLETIONS: "text_completion",
    Endpoint.EMBEDDINGS: "embeddings",
    Endpoint.RESPONSES: "chat",
}

class BadRequestBody(ValueError):
    """The body of an intercepted request is not a JSON object."""


@dataclass(slots=True)
class CanonicalRequest:
    """An intercepted request, parsed once.

    ``body`` is the decoded JSON object; ``raw`` the bytes as received. A stage
    that changes the body calls :meth:`set` and the request is re-encoded once
    before it is sent.
    """

    endpoint: Endpoint
    body: dict[str, Any]
    raw: bytes
    model: str
    stream: bool
    client_wants_usage: bool
    dirty: bool = field(default=False)

    @property
    def payload(self) -> Any:
        """What the model is asked about: messages, prompt or input."""
        key = "messages" if self.endpoint is Endpoint.CHAT else (
            "prompt" if self.endpoint is Endpoint.COMPLETIONS else "input")
        return self.body.get(key)

    def set(self, key: str, value: Any) -> None:
        """Change a top-level body field (the body is re-encoded before sending)."""
        self.body[key] = value
        self.dirty = True
        if key == "model" and isinstance(value, str):
            self.model = value

    def wire_body(self) -> bytes:
        """The bytes to send upstream: the original unless a stage changed something."""
        if self.dirty:
            try:
                self.raw = orjson.dumps(self.body)
            except TypeError:  # orjson.JSONEncodeError: a value only stdlib json decoded
                self.raw = json.dumps(self.body).encode()  # ASCII escapes keep surrogates
            self.dirty = False
        return self.raw


def parse_request(endpoint: Endpoint, raw: bytes) -> CanonicalRequest:
    """Decode ``raw`` into a CanonicalRequest or raise BadRequestBody (a 400)."""
    if not raw:
        raise BadRequestBody("the body is empty")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses a few things the standard says are JSON (integers wider
        # than 64 bits, lone surrogates); only a body both refuse is rejected.
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequestBody("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequestBody(f"the body is a JSON {type(body).__name__}, not an object")
    model = body.get("model")
    stream = body.get("stream") is True
    options = body.get("stream_options")
    wants_usage = (stream and isinstance(options, dict)
                   and options.get("include_usage") is True)
    return CanonicalRequest(endpoint=endpoint, body=body, raw=raw,
                            model=model if isinstance(model, str) else "",
                            stream=stream, client_wants_usage=wants_usage)
