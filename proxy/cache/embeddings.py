"""Embeddings, cached one input item at a time.

An embeddings request is a batch: ``input`` is a string, a list of strings,
a list of token ids or a list of token-id lists. Each item's vector depends
only on the item, the model and ``dimensions``, so each item has its own
key, and a batch can be half hit and half miss: only the misses (each once,
however often the batch repeats it) go upstream, and the answer the client
gets is assembled in the batch's order from both.

An item is stored as float32 when the upstream's numbers are float32 values
(always, for OpenAI, whether it sent base64 or JSON), else as float64, so a
hit renders the same numbers the upstream would have sent, in whichever
``encoding_format`` the new request asks for. The usage of a hit is the
item's share of its original batch's ``prompt_tokens`` (by length), since
the API reports tokens per batch only.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from proxy.cache.keys import NOT_IN_KEY, PREFIX, digest
from proxy.context import RewriteFailed
from proxy.wire.canonical import CanonicalRequest

# Fields that change how the vectors are delivered, not the vectors.
_NOT_IN_ITEM_KEY = NOT_IN_KEY | {"input", "encoding_format"}
_MAGIC = b"emb1"
_HEAD = struct.Struct("<4scIH")  # magic, dtype (f|d), tokens, model length


class BadUpstreamBatch(RewriteFailed):
    """A 200 answer whose data cannot be matched to the items sent."""


@dataclass(frozen=True, slots=True)
class Vector:
    """One item's embedding as stored: the numbers, the answering model, its token share."""

    values: np.ndarray[Any, Any]
    model: str
    tokens: int

    def encode(self) -> bytes:
        """The stored form (a small header, then the raw little-endian numbers)."""
        model = self.model.encode()[:65535]
        kind = b"f" if self.values.dtype == np.float32 else b"d"
        return _HEAD.pack(_MAGIC, kind, self.tokens, len(model)) + model + (
            self.values.astype("<f4" if kind == b"f" else "<f8").tobytes())

    @classmethod
    def decode(cls, data: bytes) -> Vector | None:
        """The stored item, or None if ``data`` is not one (damaged, or another format)."""
        if len(data) < _HEAD.size:
            return None
        magic, kind, tokens, model_len = _HEAD.unpack_from(data)
        start = _HEAD.size + model_len
        width = 4 if kind == b"f" else 8
        if magic != _MAGIC or kind not in (b"f", b"d") or (len(data) - start) % width:
            return None
        values = np.frombuffer(data, "<f4" if kind == b"f" else "<f8", offset=start)
        return cls(values, data[_HEAD.size:start].decode("utf-8", "replace"), tokens)

    def rendered(self, as_base64: bool) -> str | list[float]:
        """The ``embedding`` value in the requested ``encoding_format``."""
        if as_base64:
            return base64.b64encode(self.values.astype("<f4").tobytes()).decode("ascii")
        # float64 first: float32 written through float64 is how the API prints it.
        return self.values.astype(np.float64).tolist()  # type: ignore[no-any-return]


@dataclass(slots=True)
class Batch:
    """An embeddings request split into items, with a key per item."""

    items: list[Any]
    keys: list[str]
    single: bool  # ``input`` was one item, not a list
    as_base64: bool

    @classmethod
    def of(cls, scope: str, canonical: CanonicalRequest) -> Batch | None:
        """The request's items and keys, or None when ``input`` has no shape to split."""
        body = canonical.body
        raw = body.get("input")
        single = isinstance(raw, str) or (isinstance(raw, list) and bool(raw)
                                          and all(_is_token(t) for t in raw))
        if single:
            items: list[Any] = [raw]
        elif isinstance(raw, list) and raw and all(_is_item(x) for x in raw):
            items = raw
        else:
            return None  # upstream answers the malformed input with its own error
        rest = {k: v for k, v in body.items() if k not in _NOT_IN_ITEM_KEY}
        endpoint = canonical.endpoint.value
        keys = [PREFIX + "e:" + digest(scope, endpoint, rest | {"input": item})
                for item in items]
        fmt = body.get("encoding_format")
        return cls(items, keys, single, fmt == "base64")

    def answer(self, vectors: list[Vector], model: str | None = None) -> bytes:
        """The ``list`` answer for the whole batch, from one vector per item."""
        data = [{"object": "embedding", "index": i, "embedding": v.rendered(self.as_base64)}
                for i, v in enumerate(vectors)]
        tokens = sum(v.tokens for v in vectors)
        return orjson.dumps({"object": "list", "data": data,
                             "model": model if model is not None else vectors[0].model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def vectors_from_answer(body: bytes, items: list[Any]) -> tuple[list[Vector], str]:
    """One Vector per sent item from an upstream 200 answer, and the answer's model.

    Raises BadUpstreamBatch when the answer does not hold exactly one
    embedding per item.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadUpstreamBatch("the answer is not JSON") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list) or len(data) != len(items):
        raise BadUpstreamBatch(f"{len(items)} inputs sent, "
                               f"{len(data) if isinstance(data, list) else 'no'} embeddings "
                               "returned")
    model = doc.get("model")
    model = model if isinstance(model, str) else ""
    usage = doc.get("usage")
    total = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    shares = _shares(total if isinstance(total, int) and total >= 0 else 0, items)
    by_index: list[Vector | None] = [None] * len(items)
    for entry in data:
        index = entry.get("index") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(items) or by_index[index]:
            raise BadUpstreamBatch("an embedding has a missing or repeated index")
        values = _values(entry.get("embedding"))
        if values is None:
            raise BadUpstreamBatch(f"embedding {index} is neither numbers nor base64")
        by_index[index] = Vector(values, model, shares[index])
    return [v for v in by_index if v is not None], model


def _values(raw: object) -> np.ndarray[Any, Any] | None:
    if isinstance(raw, str):
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(data) % 4:
            return None
        return np.frombuffer(data, "<f4").astype(np.float32)
    if isinstance(raw, list) and raw:
        try:
            wide = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if wide.ndim != 1:
            return None
        narrow = wide.astype(np.float32)
        # Keep float64 only when float32 would change a number the upstream sent.
        return narrow if np.array_equal(narrow.astype(np.float64), wide) else wide
    return None


def _shares(total: int, items: list[Any]) -> list[int]:
    """``total`` split over ``items`` by length, largest remainders first, summing to total."""
    sizes = [max(1, len(item)) for item in items]
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    shares = [int(x) for x in exact]
    short = total - sum(shares)
    for i in sorted(range(len(items)), key=lambda i: shares[i] - exact[i])[:short]:
        shares[i] += 1
    return shares


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_item(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(_is_token(t) for t in value))
