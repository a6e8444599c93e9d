"""The cache's in-process parts: local LRU, directives, keys."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.directive import BadCacheHeader, CachePolicy
from proxy.cache.keys import KeyBuilder
from proxy.cache.normalize import Normalizer
from proxy.cache.store import LocalLRU
from proxy.config import CacheConfig
from proxy.wire.canonical import Endpoint, parse_request


def _request(**body: Any) -> Any:
    import orjson
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_request(Endpoint.CHAT, orjson.dumps(body))


def _headers(**h: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in h.items()}))


def test_entries_expire_at_their_ttl() -> None:
    lru = LocalLRU(10_000)
    lru.put("a", b"answer", ttl_s=30, now=100.0)
    assert lru.get("a", now=129.9) == b"answer"
    assert lru.get("a", now=130.0) is None
    assert len(lru) == 0 and lru.bytes == 0  # an expired entry frees its bytes


def test_least_recently_used_goes_first_when_bytes_run_out() -> None:
    lru = LocalLRU(3 * (100 + 1 + 200))  # three 100-byte values with one-letter keys
    for key in "abc":
        lru.put(key, b"x" * 100, ttl_s=60, now=0.0)
    assert lru.get("a", now=1.0) is not None  # a is now the most recently used
    lru.put("d", b"y" * 100, ttl_s=60, now=2.0)
    assert [k for k in "abcd" if lru.get(k, now=3.0) is not None] == ["a", "c", "d"]
    assert lru.evictions == 1 and lru.bytes <= lru.max_bytes


def test_an_entry_larger_than_the_whole_lru_is_not_kept() -> None:
    lru = LocalLRU(1000)
    lru.put("big", b"z" * 2000, ttl_s=60, now=0.0)
    assert lru.get("big", now=0.0) is None and lru.bytes == 0


def test_directive_follows_temperature_n_and_opt_in() -> None:
    policy = CachePolicy(CacheConfig(deterministic_models=("local-*",),
                                     always_models=("embed-*",)))
    none = _headers()
    assert policy.directive(none, _request(temperature=0)) is not None
    assert policy.directive(none, _request(temperature=0.0)) is not None
    assert policy.directive(none, _request(temperature=0.2)) is None
    assert policy.directive(none, _request()) is None  # OpenAI's default is 1
    assert policy.directive(none, _request(model="local-llama")) is not None
    assert policy.directive(none, _request(model="embed-x", temperature=1)) is not None
    assert policy.directive(none, _request(temperature=0, n=2)) is None
    assert policy.directive(none, _request(temperature=False)) is None  # not a number
    assert policy.directive(_headers(x_sidecar_cache="on"), _request(temperature=1)) is not None
    assert policy.directive(_headers(x_sidecar_cache="off"), _request(temperature=0)) is None


def test_directive_reads_cache_control_and_ttl() -> None:
    policy = CachePolicy(CacheConfig(ttl_s=600, max_ttl_s=3600))
    req = _request(temperature=0)
    d = policy.directive(_headers(cache_control="no-cache"), req)
    assert d is not None and (d.lookup, d.store, d.ttl_s) == (False, True, 600)
    d = policy.directive(_headers(cache_control="private, no-store"), req)
    assert d is not None and (d.lookup, d.store) == (True, False)
    assert policy.directive(_headers(cache_control="no-cache, no-store"), req) is None
    d = policy.directive(_headers(x_sidecar_cache_ttl="120"), req)
    assert d is not None and d.ttl_s == 120
    for bad in ("0", "3601", "-5", "1.5", "soon"):
        with pytest.raises(BadCacheHeader, match="x-sidecar-cache-ttl"):
            policy.directive(_headers(x_sidecar_cache_ttl=bad), req)


def test_exact_key_ignores_delivery_and_caller_fields_only() -> None:
    keys = KeyBuilder(None)
    base = keys.keys("ns/t", _request(temperature=0))[0]
    same = [_request(temperature=0, stream=True, stream_options={"include_usage": True}),
            _request(temperature=0, user="u-1", metadata={"run": "7"}, store=True)]
    assert all(keys.keys("ns/t", r)[0] == base for r in same)
    different = [_request(temperature=0, max_tokens=5), _request(temperature=0, seed=1),
                 _request(temperature=0, response_format={"type": "json_object"}),
                 _request(temperature=0, some_future_field=True),
                 _request(temperature=0, model="gpt-4o")]
    assert len({keys.keys("ns/t", r)[0] for r in different} | {base}) == len(different) + 1
    assert keys.keys("ns/other", _request(temperature=0))[0] != base  # another tenant


def test_normalized_key_depends_on_the_normalizer_settings() -> None:
    req = _request(temperature=0, messages=[{"role": "user", "content": "Hello there!"}])
    a = KeyBuilder(Normalizer()).keys("s", req)[1]
    b = KeyBuilder(Normalizer(case=False)).keys("s", req)[1]
    assert a is not None and b is not None and a != b
