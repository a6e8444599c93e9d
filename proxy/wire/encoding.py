"""Request bodies sent with a Content-Encoding: decoded once, bounded against bombs.

The server relays pass-through bodies still encoded; only intercepted JSON
bodies are decoded, because the sidecar has to read them.
"""

from __future__ import annotations

import zlib

# wbits: gzip container, zlib container, and raw deflate (what some clients send).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
          "deflate": zlib.MAX_WBITS}


class UnsupportedEncoding(ValueError):
    """A Content-Encoding the sidecar cannot decode (415)."""


class CorruptBody(ValueError):
    """The body does not decode with the encoding it claims (400)."""


class DecodedTooLarge(ValueError):
    """The decoded body would exceed the limit (413)."""


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """Decode ``raw`` per its Content-Encoding value, producing at most ``limit`` bytes."""
    out = raw
    # Codings are listed in the order they were applied; undo them in reverse.
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise UnsupportedEncoding(coding)
        out = _inflate(out, wbits, limit, raw_fallback=coding == "deflate")
    return out


def _inflate(data: bytes, wbits: int, limit: int, *, raw_fallback: bool) -> bytes:
    decomp = zlib.decompressobj(wbits)
    try:
        out = decomp.decompress(data, limit + 1)
    except zlib.error:
        if raw_fallback:
            return _inflate(data, -zlib.MAX_WBITS, limit, raw_fallback=False)
        raise CorruptBody from None
    if len(out) > limit:
        raise DecodedTooLarge
    if not decomp.eof:
        raise CorruptBody
    return out
