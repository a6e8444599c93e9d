"""Which headers cross the sidecar, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection and are
never relayed; nor is anything the ``Connection`` header names. ``Host`` and
the forwarding headers never choose the upstream: the upstream URL comes from
configuration only.
"""

from __future__ import annotations

from urllib.parse import quote

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})

# Dropped from requests: Host is set from the upstream URL; Content-Length is
# recomputed by the client for the body actually sent.
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect"}
_DROP_REQUEST_KEEP_LENGTH = _DROP_REQUEST - {"content-length"}
# Dropped from responses: the server sets Content-Length / framing itself.
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}
_DROP_RESPONSE_KEEP_LENGTH = _DROP_RESPONSE - {"content-length"}

SIDECAR_PREFIX = "x-sidecar-"
# Time spent in the sidecar on a request, upstream excluded, on every /v1 answer.
OVERHEAD_HEADER = "x-sidecar-overhead-ms"
_HEADER_SAFE = " !#$&'()*+,-./:;<=>?@[]^_`{|}~"
MODEL_REQUESTED_HEADER = "x-sidecar-model-requested"
MODEL_ROUTED_HEADER = "x-sidecar-model-routed"  # the model actually sent, after fallbacks
COST_HEADER = "x-sidecar-cost-usd"
COST_BASIS_HEADER = "x-sidecar-cost-basis"  # usage | estimate
ATTEMPTS_HEADER = "x-sidecar-attempts"  # only when more than one upstream attempt was made


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(","))


def upstream_request_headers(incoming: CIMultiDictProxy[str], api_key: str | None,
                             *, keep_content_length: bool = False,
                             identity_encoding: bool = False) -> CIMultiDict[str]:
    """Headers to send upstream for a client request.

    ``api_key`` replaces the client's Authorization when configured.
    ``identity_encoding`` asks upstream for an uncompressed body, which the
    sidecar needs when it reads the response (usage, errors).
    """
    drop = _DROP_REQUEST_KEEP_LENGTH if keep_content_length else _DROP_REQUEST
    extra = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in drop or lname in extra or lname.startswith(SIDECAR_PREFIX):
            continue
        out.add(name, value)
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key}"
    if identity_encoding:
        out["Accept-Encoding"] = "identity"
    return out


def client_response_headers(upstream: CIMultiDictProxy[str], *,
                            keep_content_length: bool = False) -> CIMultiDict[str]:
    """Upstream response headers to relay to the client (hop-by-hop removed)."""
    drop = _DROP_RESPONSE_KEEP_LENGTH if keep_content_length else _DROP_RESPONSE
    extra = _connection_tokens(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lname = name.lower()
        if lname in drop or lname in extra:
            continue
        out.add(name, value)
    return out


def bearer_token(headers: CIMultiDictProxy[str]) -> str | None:
    """The API key in ``Authorization: Bearer ...``, if any (never log it)."""
    auth = headers.get("Authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def header_value(text: str, limit: int = 200) -> str:
    """Client-supplied text (a model name) made safe for a response header.

    Printable ASCII passes as it is; anything else (control characters, which
    would be a header injection, or non-Latin text) is percent-encoded.
    """
    text = text[:limit]
    if text.isascii() and text.isprintable():
        return text
    return quote(text, safe=_HEADER_SAFE)
