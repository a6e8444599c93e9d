"""Fast, deterministic, OpenAI-compatible mock upstream server.

The mock is the baseline for llm-sidecar's tests, demo and benchmarks, so the
request path is kept lean: JSON goes through orjson, streaming events are
assembled from pre-serialised byte fragments, and nothing is logged per
request.

Responses are deterministic: the generated text, tool-call arguments, ids and
embedding vectors are derived from a hash of the semantically relevant part of
the request (model plus messages / prompt / input), so identical requests get
identical bodies. Only ``x-request-id`` and ``openai-processing-ms`` vary.

Behaviour can be tuned globally through :class:`MockConfig` or per request with
control headers:

``x-mock-latency-ms``
    Delay before the response (or before the stream headers).
``x-mock-ttft-ms``
    Streaming: delay between the headers and the first content chunk.
``x-mock-tps``
    Streaming: tokens per second used to pace content chunks (0 = no pacing).
``x-mock-tokens``
    Number of completion tokens (words) to generate.
``x-mock-error: <status>``
    Answer with that status and an OpenAI-style error body.
``x-mock-disconnect: before-headers | mid-stream``
    Close the connection without answering, or abort it after the headers and
    two chunks.

``GET /v1/mock/stats`` returns the request counters (not counted itself):
``{"requests": {"POST /v1/chat/completions": 3, ...}, "cancelled": 0,
"models": {"gpt-4o": 2, "gpt-4o-mini": 1}}``. ``models`` counts requests per
body ``model`` on the generation endpoints, faulted ones included.

Fault table
-----------
Headers reach every attempt of a retry or fallback chain alike, so they cannot
say "model A fails, model B works". The fault table can: a :class:`Fault` keyed
by the request body's ``model`` applies on the generation endpoints (chat
completions, completions, embeddings, responses). The exact model is looked up
first, then the key ``"*"`` (any model). A fault can answer with an error
``status`` (same body as ``x-mock-error``; ``retry_after`` sets ``retry-after``
rounded up to whole seconds and the exact ``retry-after-ms``, a 429 without it
gets 7 s), ``disconnect`` (same values as ``x-mock-disconnect``), and/or wait
``latency_ms`` first (replacing the configured latency). ``times`` limits it to
that many matching requests (``None`` = forever); every request that matches
consumes one, and an exhausted fault is removed, so ``"*"`` can take over.

Per-request headers keep priority: ``x-mock-latency-ms`` overrides the fault's
latency, and ``x-mock-error`` or ``x-mock-disconnect`` override both its status
and its disconnect.

In process, use :meth:`MockUpstream.set_fault` / :meth:`MockUpstream.clear_faults`.
Out of process (neither route is counted in the stats)::

    POST /v1/mock/faults {"model": "gpt-4o", "status": 500, "times": 2}
    GET /v1/mock/faults       -> {"faults": {"gpt-4o": {..., "times": <remaining>}}}
    DELETE /v1/mock/faults    -> clears the table

The POST body takes the :class:`Fault` fields besides ``model``; invalid input
gets a 400 with an OpenAI-style error body.

Run standalone with ``python -m loadtest.mock_upstream --port 8001``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import math
import random
import sys
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Final

import orjson
from aiohttp import BodyPartReader, web

from proxy.server import loop_factory, wait_for_stop_signal

__all__ = [
    "Fault",
    "MockConfig",
    "MockStats",
    "MockUpstream",
    "RecordedRequest",
    "StoredFile",
    "main",
]


@dataclass
class MockConfig:
    """Server-wide defaults; each field can be overridden per request by a header."""

    latency_ms: float = 0.0
    """Delay before a non-streaming response or before the stream headers."""
    ttft_ms: float = 0.0
    """Streaming: delay between the headers and the first content chunk."""
    tokens_per_second: float = 0.0
    """Streaming: 0 sends all chunks at once, otherwise chunks are paced."""
    completion_tokens: int = 16
    """Default number of output tokens (words) per completion."""
    embedding_dim: int = 64
    """Embedding size used when the request has no ``dimensions``."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as seen by the mock, kept for assertions in tests."""

    method: str
    path: str
    query_string: str
    """Raw (still percent-encoded) query string, without the ``?``."""
    headers: list[tuple[str, str]]
    body: bytes
    """Request body; ``b""`` for multipart requests and bodies over 1 MiB."""
    model: str | None = None
    """The body's ``model`` on the generation endpoints, else ``None``."""


class MockStats:
    """Thread-safe request counters.

    The server usually runs on an event loop in another thread than the test,
    so every mutation happens under a lock and waiters use a condition.
    Attribute reads are not locked; they are atomic under the GIL.
    """

    def __init__(self) -> None:
        """Create empty stats."""
        self._cond = threading.Condition(threading.Lock())
        self.requests: collections.Counter[str] = collections.Counter()
        """Request count keyed by ``"METHOD /path"``."""
        self.cancelled = 0
        """Requests or streams aborted by the client (disconnect / cancellation)."""
        self.last_requests: collections.deque[RecordedRequest] = collections.deque(maxlen=64)
        """The most recent requests, oldest first."""
        self.models: collections.Counter[str] = collections.Counter()
        """Generation requests keyed by the body's ``model`` (faulted ones included)."""

    def record(self, request: RecordedRequest) -> None:
        """Count ``request`` and keep it in :attr:`last_requests`."""
        key = f"{request.method} {request.path}"
        with self._cond:
            self.requests[key] += 1
            if request.model is not None:
                self.models[request.model] += 1
            self.last_requests.append(request)
            self._cond.notify_all()

    def add_cancelled(self) -> None:
        """Count one client-side abort and wake up waiters."""
        with self._cond:
            self.cancelled += 1
            self._cond.notify_all()

    def wait_for_cancelled(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` cancellations were counted.

        Returns whether the count was reached within ``timeout`` seconds. Must
        not be called from the server's own event loop thread (it blocks).
        """
        with self._cond:
            return self._cond.wait_for(lambda: self.cancelled >= n, timeout)

    def wait_for_requests(self, key: str, n: int, timeout: float) -> bool:
        """Block until at least ``n`` requests ``"METHOD /path"`` were received.

        Lets a test act at a known point (the upstream has the request) instead
        of sleeping. Must not be called from the server's own event loop thread.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self.requests[key] >= n, timeout)

    def reset(self) -> None:
        """Forget all counters and recorded requests."""
        with self._cond:
            self.requests.clear()
            self.cancelled = 0
            self.last_requests.clear()
            self.models.clear()
            self._cond.notify_all()


@dataclass(slots=True)
class StoredFile:
    """A file uploaded through ``POST /v1/files``, kept in memory."""

    id: str
    filename: str
    purpose: str
    created_at: int
    data: bytes

    def to_object(self) -> dict[str, Any]:
        """Return the OpenAI ``FileObject`` representation."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


def _is_int(value: object) -> bool:
    # bool is an int subclass; JSON true must not count as 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Fault:
    """What the mock does to requests for one model (see "Fault table" above).

    Raises ``ValueError`` on invalid values.
    """

    status: int | None = None
    """Answer with this error status (400-599) and an OpenAI-style error body."""
    retry_after: float | None = None
    """Seconds for ``retry-after`` (rounded up) and ``retry-after-ms``; needs ``status``."""
    disconnect: str | None = None
    """``"before-headers"`` or ``"mid-stream"``, like ``x-mock-disconnect``."""
    latency_ms: float | None = None
    """Delay before answering (replaces the configured latency)."""
    times: int | None = None
    """Number of matching requests the fault applies to; ``None`` = forever."""

    def __post_init__(self) -> None:
        """Validate the fields."""
        if self.status is not None and not (_is_int(self.status) and 400 <= self.status <= 599):
            raise ValueError("status must be an integer from 400 to 599")
        if self.disconnect is not None and self.disconnect not in _DISCONNECTS:
            raise ValueError("disconnect must be 'before-headers' or 'mid-stream'")
        if self.status is not None and self.disconnect is not None:
            raise ValueError("status and disconnect are mutually exclusive")
        for name in ("retry_after", "latency_ms"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            ):
                raise ValueError(f"{name} must be a non-negative number")
        if self.retry_after is not None and self.status is None:
            raise ValueError("retry_after needs a status")
        if self.times is not None and not (_is_int(self.times) and self.times >= 1):
            raise ValueError("times must be a positive integer")


_FAULT_FIELDS: Final = frozenset(f.name for f in fields(Fault))


def _parse_fault(doc: object) -> tuple[str, Fault]:
    """Parse a ``POST /v1/mock/faults`` body; raises ``ValueError`` if invalid."""
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("'model' must be a non-empty string")
    unknown = sorted(k for k in doc if k != "model" and k not in _FAULT_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(map(str, unknown))}")
    return model, Fault(**{k: v for k, v in doc.items() if k != "model"})


@dataclass(slots=True)
class _ActiveFault:
    fault: Fault
    remaining: int | None


# ---------------------------------------------------------------------------
# Precomputed constants

_CREATED: Final = 1_700_000_000
_CREATED_B: Final = b"1700000000"
_FINGERPRINT: Final = "fp_mock"
_MAX_RECORDED_BODY: Final = 1 << 20
# Uploads are read through aiohttp's multipart reader, which enforces
# client_max_size too; keep it far above the ~10 MB files the tests use.
_CLIENT_MAX_SIZE: Final = 256 << 20
_FILE_CHUNK: Final = 64 << 10
_MID_STREAM_EVENTS: Final = 2
_DISCONNECTS: Final = ("before-headers", "mid-stream")

_JSON_CT: Final = "application/json"
_SSE_CT: Final = "text/event-stream; charset=utf-8"
_OCTET_CT: Final = "application/octet-stream"

_STATIC_HEADERS: Final[dict[str, str]] = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms",
}

_VOCAB: Final[tuple[str, ...]] = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model",
    "token", "stream", "proxy", "latency", "request", "response", "server", "client",
    "cache", "buffer", "socket", "packet", "router", "signal", "vector", "matrix",
    "tensor", "kernel", "thread", "process", "memory", "storage", "network", "cloud",
    "edge", "node", "cluster", "shard", "replica", "leader", "follower", "quorum",
    "commit", "rollback", "query", "index", "schema", "table", "column", "row",
    "record", "field", "value", "key", "hash", "digest", "cipher", "secret",
    "public", "private", "open", "closed", "fast", "slow", "bright", "dark",
    "river", "mountain", "forest", "ocean", "desert", "valley", "island", "meadow",
    "sun", "moon", "star", "planet", "comet", "orbit", "gravity", "light",
    "sound", "echo", "silence", "rhythm", "melody", "harmony", "chorus", "verse",
    "story", "chapter", "page", "word", "letter", "number", "symbol", "pattern",
    "simple", "complex", "robust", "fragile", "stable", "eager", "patient", "careful",
    "build", "test", "deploy", "measure", "observe", "tune", "scale", "recover",
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda",
    "north", "south", "east", "west", "green", "amber", "silver",
)  # fmt: skip
# 128 words so a hash byte maps to a word with a mask instead of a PRNG.
_VOCAB_MASK: Final = len(_VOCAB) - 1
assert len(_VOCAB) == 128 and len(set(_VOCAB)) == 128
_BYTE_TO_WORD: Final = bytes(b & _VOCAB_MASK for b in range(256))
# JSON-encoded word fragments so streaming loops only concatenate bytes.
_WORD_MID: Final = tuple(orjson.dumps(w + " ") for w in _VOCAB)
_WORD_LAST: Final = tuple(orjson.dumps(w) for w in _VOCAB)
_CHAT_DELTA_MID: Final = tuple(b'{"content":' + w + b"}" for w in _WORD_MID)
_CHAT_DELTA_LAST: Final = tuple(b'{"content":' + w + b"}" for w in _WORD_LAST)
_CHAT_ROLE_DELTA: Final = b'{"role":"assistant","content":"","refusal":null}'

_DONE: Final = b"data: [DONE]\n\n"

_MODELS: Final[tuple[tuple[str, int, str], ...]] = (
    ("gpt-4o", 1715367049, "system"),
    ("gpt-4o-mini", 1721172741, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
    ("gpt-3.5-turbo-instruct", 1692901427, "system"),
)
_MODEL_OBJECTS: Final[dict[str, bytes]] = {
    mid: orjson.dumps({"id": mid, "object": "model", "created": created, "owned_by": owner})
    for mid, created, owner in _MODELS
}
_MODEL_LIST: Final = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": mid, "object": "model", "created": created, "owned_by": owner}
            for mid, created, owner in _MODELS
        ],
    }
)

# status -> (error type, error code, message)
_ERROR_KINDS: Final[dict[int, tuple[str, str, str]]] = {
    400: ("invalid_request_error", "bad_request", "Mock error: bad request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", "forbidden", "Mock error: forbidden."),
    404: ("invalid_request_error", "not_found", "Mock error: not found."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests (mock). Please try again in 7s.",
    ),
    500: (
        "server_error",
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
    ),
}
_RATE_LIMIT_HEADERS: Final[dict[str, str]] = {
    "retry-after": "7",
    "retry-after-ms": "7000",
    "x-ratelimit-remaining-requests": "0",
}

# Request ids only need to be unique-ish; a PRNG avoids a syscall per request.
_ID_RNG: Final = random.Random()

_FLOAT32_NEEDS_SWAP: Final = sys.byteorder != "little"


# ---------------------------------------------------------------------------
# Small pure helpers


def _headers(start: float, content_type: str = _JSON_CT) -> dict[str, str]:
    """Build the OpenAI-like headers every response carries."""
    return {
        "Content-Type": content_type,
        **_STATIC_HEADERS,
        "x-request-id": f"req_{_ID_RNG.getrandbits(128):032x}",
        "openai-processing-ms": str(int((time.perf_counter() - start) * 1000)),
    }


def _error_body(message: str, err_type: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    )


def _float_header(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        parsed = float(value)
    except ValueError:
        return default
    return parsed if parsed >= 0 and math.isfinite(parsed) else default


def _int_header(value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        parsed = int(value)
    except ValueError:
        return default
    return parsed if parsed >= 0 else default


def _digest(*parts: object) -> bytes:
    """Hash the request parts that determine the output.

    Keys are sorted so that semantically equal JSON hashes equally regardless
    of the client's key order.
    """
    return hashlib.blake2b(
        orjson.dumps(parts, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).digest()


def _word_indices(digest: bytes, n: int) -> list[int]:
    # An XOF stretches the digest to any length in one C call, ~10x cheaper
    # than seeding a random.Random per request.
    return list(hashlib.shake_128(digest).digest(n).translate(_BYTE_TO_WORD))


def _text(indices: Sequence[int]) -> str:
    return " ".join([_VOCAB[i] for i in indices])


def _count_words(value: object) -> int:
    """Approximate a token count: whitespace-separated words in any text found."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(item) for item in value)
    if isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str):
            return len(text.split())
        return _count_words(value.get("content"))
    return 0


def _count_prompt(prompt: object) -> int:
    """Token count for legacy prompts and embedding inputs (text or token ids)."""
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(_count_prompt(p) for p in prompt)
    return 0


def _positive_int(value: object) -> int | None:
    # bool is an int subclass; JSON true must not count as 1.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _apply_max_tokens(n: int, req: dict[str, Any], *keys: str) -> tuple[int, str]:
    """Cap ``n`` by the request's max-token field, as the real API would."""
    for key in keys:
        cap = _positive_int(req.get(key))
        if cap is not None:
            return (cap, "length") if cap < n else (n, "stop")
    return n, "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(req: dict[str, Any]) -> bool:
    options = req.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _pick_tool(req: dict[str, Any], messages: list[Any]) -> dict[str, Any] | None:
    """Return the function tool the mock should "call", if any."""
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    tool_choice = req.get("tool_choice")
    if tool_choice == "none":
        return None
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    functions: list[dict[str, Any]] = [
        t["function"]
        for t in tools
        if isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
    ]
    if not functions:
        return None
    # Honour an explicitly forced function, like the real API does.
    if isinstance(tool_choice, dict):
        forced = tool_choice.get("function")
        if isinstance(forced, dict):
            for fn in functions:
                if fn.get("name") == forced.get("name"):
                    return fn
    return functions[0]


def _tool_argument_key(fn: dict[str, Any]) -> str:
    """Pick a plausible argument name from the tool's JSON schema."""
    params = fn.get("parameters")
    if isinstance(params, dict):
        props = params.get("properties")
        if isinstance(props, dict) and props:
            required = params.get("required")
            if isinstance(required, list):
                for name in required:
                    if isinstance(name, str) and name in props:
                        return name
            first = next(iter(props))
            if isinstance(first, str):
                return first
    return "query"


def _tool_call_pieces(key: str, word: str) -> list[str]:
    """Split the arguments JSON into token-like pieces, as OpenAI streams them."""
    key_json = orjson.dumps(key).decode()[1:-1]
    word_json = orjson.dumps(word).decode()[1:-1]
    return ['{"', key_json, '":"', word_json, '"}']


@functools.lru_cache(maxsize=4096)
def _embedding(key: bytes, dim: int, as_base64: bool) -> str | list[float]:
    """Deterministic unit vector for ``key``.

    Values come from a SHAKE stream instead of a seeded PRNG because that is
    both cheaper in pure Python and stable across Python versions.
    """
    raw = array("h")
    raw.frombytes(hashlib.shake_256(key).digest(dim * 2))
    if _FLOAT32_NEEDS_SWAP:
        raw.byteswap()
    # +0.5 keeps every component non-zero so the norm is never 0.
    values = [v + 0.5 for v in raw]
    norm = math.sqrt(math.fsum(v * v for v in values))
    vec = array("f", [v / norm for v in values])
    if not as_base64:
        return vec.tolist()
    if _FLOAT32_NEEDS_SWAP:
        vec.byteswap()
    return base64.b64encode(vec.tobytes()).decode("ascii")


def _sse(event_type: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


@dataclass(slots=True)
class _Ctx:
    """Per-request settings after applying control headers."""

    start: float
    body: bytes
    ttft_ms: float
    tps: float
    tokens: int
    mid_stream: bool
    req: dict[str, Any] | None = None
    """The parsed JSON body on the generation endpoints (``None`` if not an object)."""


_Handler = Callable[[web.Request, _Ctx], Awaitable[web.StreamResponse]]
_Endpoint = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---------------------------------------------------------------------------
# Server


class MockUpstream:
    """An in-memory OpenAI-compatible server for tests, demos and benchmarks."""

    def __init__(self, config: MockConfig | None = None) -> None:
        """Create a server; call :meth:`start` to listen."""
        self.config: MockConfig = config if config is not None else MockConfig()
        self.stats: MockStats = MockStats()
        self.files: dict[str, StoredFile] = {}
        """Uploaded files by id."""
        self.base_url: str | None = None
        """``http://host:port/v1`` once started."""
        self._runner: web.AppRunner | None = None
        # Fault table by model. Mutated under the lock (the test thread and the
        # server loop both write it); the request path peeks at it unlocked.
        self._faults: dict[str, _ActiveFault] = {}
        self._faults_lock = threading.Lock()

    # -- fault table ----------------------------------------------------------

    def set_fault(self, model: str, fault: Fault) -> None:
        """Apply ``fault`` to requests for ``model`` (``"*"``: any model), replacing any."""
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        with self._faults_lock:
            self._faults[model] = _ActiveFault(fault, fault.times)

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self._faults_lock:
            self._faults.clear()

    def faults(self) -> dict[str, Fault]:
        """Snapshot of the table; ``times`` is what remains of each fault."""
        with self._faults_lock:
            return {m: replace(a.fault, times=a.remaining) for m, a in self._faults.items()}

    def _take_fault(self, model: str | None) -> Fault | None:
        """Return the fault for ``model`` (exact, then ``"*"``), consuming one use."""
        if model is None or not self._faults:  # unlocked peek: atomic under the GIL
            return None
        with self._faults_lock:
            key = model if model in self._faults else "*"
            active = self._faults.get(key)
            if active is None:
                return None
            if active.remaining is not None:
                active.remaining -= 1
                if active.remaining <= 0:
                    del self._faults[key]
            return active.fault

    # -- lifecycle ----------------------------------------------------------

    def build_app(self) -> web.Application:
        """Build the aiohttp application with every route registered."""
        app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
        router = app.router
        wrap = self._wrap
        router.add_post("/v1/chat/completions", wrap(self._chat_completions, parse=True))
        router.add_post("/v1/completions", wrap(self._completions, parse=True))
        router.add_post("/v1/embeddings", wrap(self._embeddings, parse=True))
        router.add_post("/v1/responses", wrap(self._responses, parse=True))
        router.add_get("/v1/models", wrap(self._list_models))
        router.add_get("/v1/models/{model}", wrap(self._get_model))
        router.add_post("/v1/files", wrap(self._upload_file, read_body=False))
        router.add_get("/v1/files", wrap(self._list_files))
        router.add_get("/v1/files/{file_id}", wrap(self._get_file))
        router.add_delete("/v1/files/{file_id}", wrap(self._delete_file))
        router.add_get("/v1/files/{file_id}/content", wrap(self._file_content))
        echo = wrap(self._echo)
        router.add_route("*", "/v1/mock/echo", echo)
        router.add_route("*", "/v1/mock/echo/{tail:.*}", echo)
        # Not wrapped: reading the counters must not count as a request.
        router.add_get("/v1/mock/stats", self._stats_json)
        router.add_post("/v1/mock/faults", self._set_fault_json)
        router.add_get("/v1/mock/faults", self._faults_json)
        router.add_delete("/v1/mock/faults", self._clear_faults_json)
        # Registered last: aiohttp falls through to it for unknown paths and
        # for known paths with the wrong method, like OpenAI's "Invalid URL".
        router.add_route("*", "/{tail:.*}", wrap(self._not_found))
        return app

    async def _stats_json(self, request: web.Request) -> web.Response:
        """Request counters, for benchmarks whose mock runs in another process."""
        return web.Response(body=orjson.dumps({"requests": dict(self.stats.requests),
                                               "cancelled": self.stats.cancelled,
                                               "models": dict(self.stats.models)}),
                            content_type="application/json")

    async def _faults_json(self, request: web.Request) -> web.Response:
        """The fault table (``times``: remaining uses)."""
        table = {m: asdict(f) for m, f in self.faults().items()}
        return web.Response(body=orjson.dumps({"faults": table}), content_type="application/json")

    async def _set_fault_json(self, request: web.Request) -> web.Response:
        """``POST /v1/mock/faults``: add or replace one model's fault."""
        start = time.perf_counter()
        try:
            model, fault = _parse_fault(orjson.loads(await request.read()))
        except orjson.JSONDecodeError:
            return self._bad_json(start)
        except (ValueError, TypeError) as exc:
            return self._error(start, 400, f"Invalid fault: {exc}", code="invalid_value")
        self.set_fault(model, fault)
        return await self._faults_json(request)

    async def _clear_faults_json(self, request: web.Request) -> web.Response:
        """``DELETE /v1/mock/faults``: clear the table."""
        self.clear_faults()
        return await self._faults_json(request)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start listening and return the base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self._runner is not None:
            raise RuntimeError("mock upstream already started")
        # handler_cancellation makes a client disconnect cancel the handler at
        # once, which is what lets tests observe cancellation propagation.
        runner = web.AppRunner(
            self.build_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=0.25,
            # Record bodies exactly as they arrived on the wire (echo hashes them).
            auto_decompress=False,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{url_host}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening and drop connections (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- request plumbing ---------------------------------------------------

    def _wrap(self, handler: _Handler, *, read_body: bool = True, parse: bool = False) -> _Endpoint:
        """``parse``: a generation endpoint (JSON body, model stats, fault table)."""

        async def endpoint(request: web.Request) -> web.StreamResponse:
            try:
                return await self._serve(request, handler, read_body, parse)
            except asyncio.CancelledError:
                # With handler_cancellation this is how a client disconnect
                # surfaces; counting it is the point of the stat.
                self.stats.add_cancelled()
                raise

        return endpoint

    async def _serve(
        self, request: web.Request, handler: _Handler, read_body: bool, parse: bool = False
    ) -> web.StreamResponse:
        """Record the request, apply control headers and faults, then run ``handler``."""
        start = time.perf_counter()
        body = await request.read() if read_body and request.body_exists else b""
        recorded = body
        if len(body) > _MAX_RECORDED_BODY or (
            body and request.content_type.startswith("multipart/")
        ):
            recorded = b""
        req = _parse_object(body) if parse else None
        model = req.get("model") if req is not None else None
        if not isinstance(model, str):
            model = None
        self.stats.record(
            RecordedRequest(
                request.method,
                request.path,
                request.rel_url.raw_query_string,
                list(request.headers.items()),
                recorded,
                model,
            )
        )
        fault = self._take_fault(model)

        headers = request.headers
        config = self.config
        default_latency = config.latency_ms
        if fault is not None and fault.latency_ms is not None:
            default_latency = fault.latency_ms
        latency_ms = _float_header(headers.get("x-mock-latency-ms"), default_latency)
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)

        disconnect = headers.get("x-mock-disconnect")
        error = headers.get("x-mock-error")
        retry_after: float | None = None
        # Either outcome header overrides the fault's whole outcome.
        if fault is not None and disconnect is None and error is None:
            disconnect = fault.disconnect
            if fault.status is not None:
                error = str(fault.status)
                retry_after = fault.retry_after
        if disconnect == "before-headers":
            transport = request.transport
            if transport is not None:
                transport.close()
            # aiohttp's attempt to send this placeholder fails with a
            # ConnectionError, which it swallows without logging.
            return web.Response()

        if error is not None:
            return self._injected_error(error, start, retry_after)

        ctx = _Ctx(
            start=start,
            body=body,
            ttft_ms=_float_header(headers.get("x-mock-ttft-ms"), config.ttft_ms),
            tps=_float_header(headers.get("x-mock-tps"), config.tokens_per_second),
            tokens=_int_header(headers.get("x-mock-tokens"), config.completion_tokens),
            mid_stream=disconnect == "mid-stream",
            req=req,
        )
        response = await handler(request, ctx)
        if ctx.mid_stream and isinstance(response, web.Response) and not response.prepared:
            return await self._send_truncated(request, response)
        return response

    def _error(
        self,
        start: float,
        status: int,
        message: str,
        *,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> web.Response:
        return web.Response(
            status=status,
            body=_error_body(message, err_type, param, code),
            headers=_headers(start),
        )

    def _injected_error(
        self, value: str, start: float, retry_after: float | None = None
    ) -> web.Response:
        try:
            status = int(value)
        except ValueError:
            status = 500
        if not 400 <= status <= 599:
            status = 500
        kind = _ERROR_KINDS.get(status)
        if kind is None:
            err_type = "server_error" if status >= 500 else "invalid_request_error"
            kind = (err_type, "mock_error", f"Mock error: injected status {status}.")
        headers = _headers(start)
        if status == 429:
            headers.update(_RATE_LIMIT_HEADERS)
        if retry_after is not None:
            headers["retry-after"] = str(math.ceil(retry_after))
            headers["retry-after-ms"] = str(round(retry_after * 1000))
        return web.Response(
            status=status,
            body=_error_body(kind[2], kind[0], None, kind[1]),
            headers=headers,
        )

    def _bad_json(self, start: float) -> web.Response:
        return self._error(
            start,
            400,
            "We could not parse the JSON body of your request. The OpenAI API expects "
            "a JSON payload (a JSON object).",
        )

    def _missing(self, start: float, param: str) -> web.Response:
        return self._error(
            start,
            400,
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )

    def _json(self, start: float, payload: bytes, status: int = 200) -> web.Response:
        return web.Response(status=status, body=payload, headers=_headers(start))

    async def _send_truncated(self, request: web.Request, full: web.Response) -> web.StreamResponse:
        """Send headers and half the body of ``full``, then abort the connection."""
        body = full.body
        data = body if isinstance(body, bytes) else b""
        headers = dict(full.headers)
        headers.pop("Content-Length", None)
        response = web.StreamResponse(status=full.status, headers=headers)
        response.content_length = len(data)
        try:
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
        except ConnectionResetError:
            self.stats.add_cancelled()
            return response
        _abort(request)
        return response

    async def _stream(
        self,
        request: web.Request,
        ctx: _Ctx,
        pre: list[bytes],
        paced: list[bytes],
        post: list[bytes],
        *,
        lead: int = 0,
    ) -> web.StreamResponse:
        """Write an SSE stream event by event.

        ``pre`` goes out right after the headers, ``paced`` starts after the
        TTFT delay and is paced at the token rate (its first ``lead`` events
        ride along with the first token), ``post`` follows the last token.
        """
        response = web.StreamResponse(headers=_headers(ctx.start, _SSE_CT))
        events = [*pre, *paced, *post]
        paced_start = len(pre)
        paced_end = paced_start + len(paced)
        ttft = ctx.ttft_ms / 1000
        interval = 1.0 / ctx.tps if ctx.tps > 0 else 0.0
        timed = ttft > 0 or interval > 0
        abort_after = _MID_STREAM_EVENTS if ctx.mid_stream else -1
        loop = asyncio.get_running_loop()
        try:
            await response.prepare(request)
            # Absolute deadlines keep pacing from drifting by the write cost.
            first_token_at = loop.time() + ttft
            for i, event in enumerate(events):
                if timed and paced_start <= i < paced_end:
                    step = i - paced_start - lead
                    due = first_token_at + step * interval if step > 0 else first_token_at
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await response.write(event)
                if i + 1 == abort_after:
                    _abort(request)
                    return response
        except ConnectionResetError:
            # Covers aiohttp's ClientConnectionResetError ("Cannot write to
            # closing transport"), i.e. the client went away between writes.
            self.stats.add_cancelled()
        return response

    # -- endpoints: generation ----------------------------------------------

    async def _chat_completions(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        req = ctx.req
        if req is None:
            return self._bad_json(ctx.start)
        model = req.get("model")
        if not isinstance(model, str):
            return self._missing(ctx.start, "model")
        messages = req.get("messages")
        if not isinstance(messages, list):
            return self._missing(ctx.start, "messages")

        digest = _digest(model, messages)
        hexid = digest.hex()
        completion_id = "chatcmpl-" + hexid
        prompt_tokens = max(1, _count_words(messages))
        tool = _pick_tool(req, messages)
        stream = req.get("stream") is True

        if tool is not None:
            name = str(tool.get("name", ""))
            pieces = _tool_call_pieces(_tool_argument_key(tool), _VOCAB[digest[0] & _VOCAB_MASK])
            call_id = "call_" + hexid[:24]
            usage = _usage(prompt_tokens, len(pieces))
            if stream:
                return await self._chat_tool_stream(
                    request, ctx, req, model, completion_id, call_id, name, pieces, usage
                )
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": "".join(pieces)},
                    }
                ],
                "refusal": None,
                "annotations": [],
            }
            finish = "tool_calls"
        else:
            n, finish = _apply_max_tokens(ctx.tokens, req, "max_completion_tokens", "max_tokens")
            indices = _word_indices(digest, n)
            usage = _usage(prompt_tokens, n)
            if stream:
                return await self._chat_text_stream(
                    request, ctx, req, model, completion_id, indices, finish, usage
                )
            message = {
                "role": "assistant",
                "content": _text(indices),
                "refusal": None,
                "annotations": [],
            }

        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": _CREATED,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
        return self._json(ctx.start, orjson.dumps(payload))

    @staticmethod
    def _chat_chunk_parts(
        completion_id: str, model: str, include_usage: bool
    ) -> tuple[bytes, bytes, bytes]:
        """Return (object prefix up to ``"choices":[``, choice prefix, chunk suffix)."""
        obj_prefix = (
            b'data: {"id":"'
            + completion_id.encode()
            + b'","object":"chat.completion.chunk","created":'
            + _CREATED_B
            + b',"model":'
            + orjson.dumps(model)
            + b',"service_tier":"default","system_fingerprint":"fp_mock","choices":['
        )
        choice_prefix = obj_prefix + b'{"index":0,"delta":'
        # OpenAI puts "usage":null last in every chunk, but only when usage
        # was requested; otherwise the key is absent.
        suffix = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        return obj_prefix, choice_prefix, suffix

    async def _chat_text_stream(
        self,
        request: web.Request,
        ctx: _Ctx,
        req: dict[str, Any],
        model: str,
        completion_id: str,
        indices: list[int],
        finish: str,
        usage: dict[str, Any],
    ) -> web.StreamResponse:
        include_usage = _include_usage(req)
        obj_prefix, head, suffix = self._chat_chunk_parts(completion_id, model, include_usage)
        tail = b',"logprobs":null,"finish_reason":null}]' + suffix
        paced = [head + _CHAT_ROLE_DELTA + tail]
        if indices:
            paced.extend([head + _CHAT_DELTA_MID[i] + tail for i in indices[:-1]])
            paced.append(head + _CHAT_DELTA_LAST[indices[-1]] + tail)
        post = [head + b'{},"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]' + suffix]
        if include_usage:
            post.append(obj_prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n")
        post.append(_DONE)
        return await self._stream(request, ctx, [], paced, post, lead=1)

    async def _chat_tool_stream(
        self,
        request: web.Request,
        ctx: _Ctx,
        req: dict[str, Any],
        model: str,
        completion_id: str,
        call_id: str,
        name: str,
        pieces: list[str],
        usage: dict[str, Any],
    ) -> web.StreamResponse:
        include_usage = _include_usage(req)
        obj_prefix, head, suffix = self._chat_chunk_parts(completion_id, model, include_usage)
        tail = b',"logprobs":null,"finish_reason":null}]' + suffix
        first_delta = orjson.dumps(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ],
                "refusal": None,
            }
        )
        paced = [head + first_delta + tail]
        paced.extend(
            head
            + b'{"tool_calls":[{"index":0,"function":{"arguments":'
            + orjson.dumps(piece)
            + b"}}]}"
            + tail
            for piece in pieces
        )
        post = [head + b'{},"logprobs":null,"finish_reason":"tool_calls"}]' + suffix]
        if include_usage:
            post.append(obj_prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n")
        post.append(_DONE)
        return await self._stream(request, ctx, [], paced, post, lead=1)

    async def _completions(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        req = ctx.req
        if req is None:
            return self._bad_json(ctx.start)
        model = req.get("model")
        if not isinstance(model, str):
            return self._missing(ctx.start, "model")
        prompt = req.get("prompt")
        if prompt is None:
            return self._missing(ctx.start, "prompt")

        digest = _digest(model, prompt)
        completion_id = "cmpl-" + digest.hex()
        n, finish = _apply_max_tokens(ctx.tokens, req, "max_tokens")
        indices = _word_indices(digest, n)
        usage = _usage(max(1, _count_prompt(prompt)), n)

        if req.get("stream") is not True:
            payload = {
                "id": completion_id,
                "object": "text_completion",
                "created": _CREATED,
                "model": model,
                "choices": [
                    {"text": _text(indices), "index": 0, "logprobs": None, "finish_reason": finish}
                ],
                "usage": usage,
                "system_fingerprint": _FINGERPRINT,
            }
            return self._json(ctx.start, orjson.dumps(payload))

        include_usage = _include_usage(req)
        head = (
            b'data: {"id":"'
            + completion_id.encode()
            + b'","object":"text_completion","created":'
            + _CREATED_B
            + b',"choices":['
        )
        model_part = b'],"model":' + orjson.dumps(model) + b',"system_fingerprint":"fp_mock"'
        tail = (
            b',"index":0,"logprobs":null,"finish_reason":null}'
            + model_part
            + (b',"usage":null}\n\n' if include_usage else b"}\n\n")
        )
        text_head = head + b'{"text":'
        paced = [text_head + _WORD_MID[i] + tail for i in indices[:-1]]
        if indices:
            paced.append(text_head + _WORD_LAST[indices[-1]] + tail)
        post = [
            text_head
            + b'"","index":0,"logprobs":null,"finish_reason":"'
            + finish.encode()
            + b'"}'
            + model_part
            + (b',"usage":null}\n\n' if include_usage else b"}\n\n")
        ]
        if include_usage:
            post.append(head + model_part + b',"usage":' + orjson.dumps(usage) + b"}\n\n")
        post.append(_DONE)
        return await self._stream(request, ctx, [], paced, post)

    async def _embeddings(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        req = ctx.req
        if req is None:
            return self._bad_json(ctx.start)
        model = req.get("model")
        if not isinstance(model, str):
            return self._missing(ctx.start, "model")
        raw_input = req.get("input")
        inputs: list[Any]
        if isinstance(raw_input, str):
            inputs = [raw_input]
        elif isinstance(raw_input, list) and raw_input:
            # A flat list of ints is a single tokenised input.
            inputs = [raw_input] if all(isinstance(t, int) for t in raw_input) else raw_input
        else:
            return self._error(
                ctx.start,
                400,
                "'input' must be a non-empty string or array.",
                param="input",
                code="invalid_value",
            )
        dim = _positive_int(req.get("dimensions")) or self.config.embedding_dim
        as_base64 = req.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _embedding(orjson.dumps(item), dim, as_base64),
            }
            for i, item in enumerate(inputs)
        ]
        tokens = max(1, _count_prompt(inputs))
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return self._json(ctx.start, orjson.dumps(payload))

    async def _responses(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        req = ctx.req
        if req is None:
            return self._bad_json(ctx.start)
        model = req.get("model")
        if not isinstance(model, str):
            return self._missing(ctx.start, "model")
        instructions = req.get("instructions")
        user_input = req.get("input")

        digest = _digest(model, instructions, user_input)
        hexid = digest.hex()
        response_id = "resp_" + hexid
        msg_id = "msg_" + hexid[::-1]
        indices = _word_indices(digest, ctx.tokens)
        text = _text(indices)
        input_tokens = max(1, _count_words(user_input) + _count_words(instructions))
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": len(indices),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + len(indices),
        }
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        item = {
            "id": msg_id,
            "type": "message",
            "status": "completed",
            "content": [part],
            "role": "assistant",
        }
        completed = _response_object(
            response_id, model, req, status="completed", output=[item], usage=usage
        )
        if req.get("stream") is not True:
            return self._json(ctx.start, orjson.dumps(completed))

        in_progress = _response_object(
            response_id, model, req, status="in_progress", output=[], usage=None
        )
        pre = [
            _sse(
                "response.created",
                {"type": "response.created", "sequence_number": 0, "response": in_progress},
            ),
            _sse(
                "response.in_progress",
                {"type": "response.in_progress", "sequence_number": 1, "response": in_progress},
            ),
            _sse(
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "sequence_number": 2,
                    "output_index": 0,
                    "item": {
                        "id": msg_id,
                        "type": "message",
                        "status": "in_progress",
                        "content": [],
                        "role": "assistant",
                    },
                },
            ),
            _sse(
                "response.content_part.added",
                {
                    "type": "response.content_part.added",
                    "sequence_number": 3,
                    "item_id": msg_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""},
                },
            ),
        ]
        delta_head = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"sequence_number":'
        )
        delta_mid = (
            b',"item_id":"' + msg_id.encode() + b'","output_index":0,"content_index":0,"delta":'
        )
        delta_tail = b',"logprobs":[]}\n\n'
        last = len(indices) - 1
        paced = [
            delta_head
            + str(4 + k).encode()
            + delta_mid
            + (_WORD_LAST[i] if k == last else _WORD_MID[i])
            + delta_tail
            for k, i in enumerate(indices)
        ]
        seq = 4 + len(indices)
        post = [
            _sse(
                "response.output_text.done",
                {
                    "type": "response.output_text.done",
                    "sequence_number": seq,
                    "item_id": msg_id,
                    "output_index": 0,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                },
            ),
            _sse(
                "response.content_part.done",
                {
                    "type": "response.content_part.done",
                    "sequence_number": seq + 1,
                    "item_id": msg_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": part,
                },
            ),
            _sse(
                "response.output_item.done",
                {
                    "type": "response.output_item.done",
                    "sequence_number": seq + 2,
                    "output_index": 0,
                    "item": item,
                },
            ),
            _sse(
                "response.completed",
                {"type": "response.completed", "sequence_number": seq + 3, "response": completed},
            ),
        ]
        return await self._stream(request, ctx, pre, paced, post)

    # -- endpoints: models ----------------------------------------------------

    async def _list_models(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        return self._json(ctx.start, _MODEL_LIST)

    async def _get_model(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        model = request.match_info["model"]
        body = _MODEL_OBJECTS.get(model)
        if body is None:
            return self._error(
                ctx.start,
                404,
                f"The model '{model}' does not exist",
                param="model",
                code="model_not_found",
            )
        return self._json(ctx.start, body)

    # -- endpoints: files -----------------------------------------------------

    def _file_not_found(self, start: float, file_id: str) -> web.Response:
        return self._error(start, 404, f"No such File object: {file_id}", param="id")

    async def _upload_file(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            return self._error(
                ctx.start, 400, "Expected a multipart/form-data request body.", code="invalid_value"
            )
        try:
            reader = await request.multipart()
        except ValueError:
            return self._error(ctx.start, 400, "Malformed multipart body.", code="invalid_value")
        data: bytes | None = None
        filename = "file"
        purpose: str | None = None
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                await part.release()
                continue
            if part.name == "file":
                # Chunked reads keep memory at one copy for large uploads.
                buf = bytearray()
                while chunk := await part.read_chunk(_FILE_CHUNK):
                    buf += chunk
                data = bytes(buf)
                filename = part.filename or filename
            elif part.name == "purpose":
                purpose = await part.text()
            else:
                await part.release()
        if data is None:
            return self._missing(ctx.start, "file")
        if purpose is None:
            return self._missing(ctx.start, "purpose")
        file_id = f"file-{_ID_RNG.getrandbits(96):024x}"
        stored = StoredFile(file_id, filename, purpose, int(time.time()), data)
        self.files[file_id] = stored
        return self._json(ctx.start, orjson.dumps(stored.to_object()))

    async def _list_files(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        purpose = request.query.get("purpose")
        objects = [
            f.to_object() for f in self.files.values() if purpose is None or f.purpose == purpose
        ]
        payload = {
            "object": "list",
            "data": objects,
            "has_more": False,
            "first_id": objects[0]["id"] if objects else None,
            "last_id": objects[-1]["id"] if objects else None,
        }
        return self._json(ctx.start, orjson.dumps(payload))

    async def _get_file(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        stored = self.files.get(file_id)
        if stored is None:
            return self._file_not_found(ctx.start, file_id)
        return self._json(ctx.start, orjson.dumps(stored.to_object()))

    async def _delete_file(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if self.files.pop(file_id, None) is None:
            return self._file_not_found(ctx.start, file_id)
        return self._json(
            ctx.start, orjson.dumps({"id": file_id, "object": "file", "deleted": True})
        )

    async def _file_content(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        stored = self.files.get(file_id)
        if stored is None:
            return self._file_not_found(ctx.start, file_id)
        data = memoryview(stored.data)
        response = web.StreamResponse(headers=_headers(ctx.start, _OCTET_CT))
        response.content_length = len(data)
        abort_after = _MID_STREAM_EVENTS if ctx.mid_stream else -1
        try:
            await response.prepare(request)
            for n, offset in enumerate(range(0, len(data), _FILE_CHUNK), start=1):
                await response.write(data[offset : offset + _FILE_CHUNK])
                if n == abort_after:
                    _abort(request)
                    return response
        except ConnectionResetError:
            self.stats.add_cancelled()
        return response

    # -- endpoints: diagnostics -------------------------------------------------

    async def _echo(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        payload = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.rel_url.raw_path,
            "query_string": request.rel_url.raw_query_string,
            "headers": list(request.headers.items()),
            "body_len": len(ctx.body),
            "body_sha256": hashlib.sha256(ctx.body).hexdigest(),
        }
        response = self._json(ctx.start, orjson.dumps(payload))
        # Providers' edges set cookies (e.g. bot-management ones); a proxy must
        # relay them to its client without ever replaying them for others.
        response.headers["Set-Cookie"] = "edge_session=abc123; Path=/; HttpOnly"
        return response

    async def _not_found(self, request: web.Request, ctx: _Ctx) -> web.StreamResponse:
        return self._error(ctx.start, 404, f"Invalid URL ({request.method} {request.path})")


def _parse_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _response_object(
    response_id: str,
    model: str,
    req: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """Build a Responses API ``Response`` object echoing the request's settings."""
    instructions = req.get("instructions")
    temperature = req.get("temperature")
    top_p = req.get("top_p")
    metadata = req.get("metadata")
    tools = req.get("tools")
    return {
        "id": response_id,
        "object": "response",
        "created_at": _CREATED,
        "status": status,
        "background": False,
        "completed_at": _CREATED if status == "completed" else None,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": _positive_int(req.get("max_output_tokens")),
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": req.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": None,
        "service_tier": "default",
        "store": True,
        "temperature": temperature if isinstance(temperature, (int, float)) else 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": tools if isinstance(tools, list) else [],
        "top_logprobs": 0,
        "top_p": top_p if isinstance(top_p, (int, float)) else 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": metadata if isinstance(metadata, dict) else {},
    }


# ---------------------------------------------------------------------------
# CLI


async def _serve_forever(config: MockConfig, host: str, port: int) -> None:
    upstream = MockUpstream(config)
    url = await upstream.start(host, port)
    print(f"mock upstream listening on {url}", flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await upstream.stop()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = MockConfig()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.mock_upstream",
        description="Deterministic OpenAI-compatible mock upstream.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    parser.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    parser.add_argument("--tokens-per-second", type=float, default=defaults.tokens_per_second)
    parser.add_argument("--completion-tokens", type=int, default=defaults.completion_tokens)
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the mock upstream until SIGINT/SIGTERM (uses uvloop when installed)."""
    args = _parse_args(argv)
    config = MockConfig(
        latency_ms=args.latency_ms,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        completion_tokens=args.completion_tokens,
        embedding_dim=args.embedding_dim,
    )
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory()) as runner,
    ):
        runner.run(_serve_forever(config, args.host, args.port))


if __name__ == "__main__":
    main()
