"""Embeddings cached per input item: the openai SDK through sidecars, local and Redis-backed."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import openai
import orjson
import pytest

from proxy.cache.embeddings import BadUpstreamBatch, Batch, Vector, _shares, vectors_from_answer
from proxy.config import CacheConfig, UpstreamConfig
from proxy.wire.canonical import Endpoint, parse_request
from tests.conftest import Mock, Scripted, SidecarFactory, UpstreamCalls, sdk, settled
from tests.redis_server import RedisServer

ROUTE = "POST /v1/embeddings"
MODEL = "text-embedding-3-small"


def _embed(client: openai.OpenAI, inputs: Any, **kw: Any) -> Any:
    return client.embeddings.with_raw_response.create(model=MODEL, input=inputs, **kw)


def _vectors(parsed: Any) -> list[list[float]]:
    return [list(d.embedding) for d in sorted(parsed.data, key=lambda d: d.index)]


def test_single_input_repeat_is_a_hit_with_the_same_vector(
        sidecars: SidecarFactory, local: str, mock: Mock, direct: openai.OpenAI) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        first = _embed(client, "the quick brown fox")
        settled(sidecars, local)
        second = _embed(client, "the quick brown fox")
    assert first.headers["x-sidecar-cache"] == "miss"
    assert second.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 1
    want = direct.embeddings.create(model=MODEL, input="the quick brown fox")
    assert _vectors(second.parse()) == _vectors(want)
    assert second.parse().usage == first.parse().usage
    assert second.parse().model == MODEL


def test_a_batch_sends_only_its_misses_once_and_answers_in_order(
        sidecars: SidecarFactory, local: str, mock: Mock, direct: openai.OpenAI) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        _embed(client, ["alpha one", "beta two"])
        settled(sidecars, local)
        batch = ["beta two", "gamma three", "alpha one", "gamma three"]
        mixed = _embed(client, batch)
        settled(sidecars, local)
        again = _embed(client, batch)
    assert mixed.headers["x-sidecar-cache"] == "partial; tier=exact; hits=2; items=4"
    assert again.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 2
    want = _vectors(direct.embeddings.create(model=MODEL, input=batch))
    assert _vectors(mixed.parse()) == want
    assert _vectors(again.parse()) == want
    assert [d.index for d in mixed.parse().data] == [0, 1, 2, 3]


def test_partial_batch_upstream_received_only_the_missing_item(
        sidecars: SidecarFactory, local: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        _embed(client, ["red", "green"])
        settled(sidecars, local)
        _embed(client, ["green", "blue", "red"])
    assert upstream.calls == 2
    assert upstream.last_body()["input"] == ["blue"]


def test_float_and_base64_formats_share_entries(
        sidecars: SidecarFactory, local: str, mock: Mock, direct: openai.OpenAI) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        as_float = _embed(client, ["format one"], encoding_format="float")
        settled(sidecars, local)
        as_b64 = _embed(client, ["format one"])  # the SDK asks for base64 by default
        raw = client.embeddings.with_raw_response.create(
            model=MODEL, input="format one", encoding_format="base64")
    assert as_b64.headers["x-sidecar-cache"] == "hit; tier=exact"
    assert upstream.calls == 1
    want = direct.embeddings.with_raw_response.create(
        model=MODEL, input="format one", encoding_format="base64")
    # Byte for byte what the upstream sends, in either format.
    assert orjson.loads(raw.content)["data"] == orjson.loads(want.content)["data"]
    assert _vectors(as_b64.parse()) == _vectors(as_float.parse())


def test_token_id_inputs_are_items_too(sidecars: SidecarFactory, local: str,
                                       mock: Mock, direct: openai.OpenAI) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        _embed(client, [[11, 12, 13], [21, 22]])
        settled(sidecars, local)
        mixed = _embed(client, [[21, 22], [31]])
    assert mixed.headers["x-sidecar-cache"] == "partial; tier=exact; hits=1; items=2"
    assert upstream.last_body()["input"] == [[31]]
    assert upstream.calls == 2
    assert _vectors(mixed.parse()) == _vectors(
        direct.embeddings.create(model=MODEL, input=[[21, 22], [31]]))


@pytest.mark.parametrize("change", [
    {"dimensions": 32}, {"model": "text-embedding-3-large"}, {"api_key": "sk-emb-other"}])
def test_model_dimensions_and_tenant_are_in_the_key(
        sidecars: SidecarFactory, local: str, mock: Mock, change: dict[str, Any]) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    text = f"key parts {sorted(change)}"
    with sdk(local) as client:
        _embed(client, text)
    settled(sidecars, local)
    key = change.pop("api_key", "sk-emb-a")
    with sdk(local, key) as client:
        other = client.embeddings.with_raw_response.create(
            **({"model": MODEL, "input": text} | change))
    assert other.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 2


def test_cache_off_header_and_no_store(sidecars: SidecarFactory, local: str,
                                       mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client:
        client.embeddings.create(model=MODEL, input="not kept",
                                 extra_headers={"Cache-Control": "no-store"})
        settled(sidecars, local)
        second = _embed(client, "not kept", extra_headers={"x-sidecar-cache": "off"})
        third = _embed(client, "not kept")
    assert "x-sidecar-cache" not in second.headers
    assert third.headers["x-sidecar-cache"] == "miss"
    assert upstream.calls == 3


def test_malformed_input_goes_to_upstream_and_its_error_comes_back(
        local: str, mock: Mock) -> None:
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(local) as client, pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input=[])
    assert err.value.status_code == 400
    assert upstream.calls == 1


def test_two_sidecars_share_items_through_redis(
        sidecars: SidecarFactory, module_redis: RedisServer, mock: Mock) -> None:
    cfg = CacheConfig(redis_url=module_redis.url)
    a, b = sidecars.start(cache=cfg), sidecars.start(cache=cfg)
    upstream = UpstreamCalls(mock, ROUTE)
    with sdk(a) as client:
        _embed(client, ["shared one", "shared two"])
    settled(sidecars, a)
    with sdk(b) as client:
        mixed = _embed(client, ["shared two", "only b"])
    assert mixed.headers["x-sidecar-cache"] == "partial; tier=exact; hits=1; items=2"
    assert upstream.last_body()["input"] == ["only b"]
    assert upstream.calls == 2


def test_an_answer_that_cannot_be_merged_is_a_502_not_a_wrong_batch(
        sidecars: SidecarFactory, scripted: Scripted) -> None:
    # Always one embedding, whatever the batch.
    scripted.doc = {"object": "list", "model": MODEL, "data": [
        {"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    url = sidecars.start(upstream=UpstreamConfig(base_url=scripted.url))
    with sdk(url) as client:
        _embed(client, "x")
        settled(sidecars, url)
        with pytest.raises(openai.APIStatusError) as err:
            client.embeddings.create(model=MODEL, input=["x", "y", "z"])
    assert err.value.status_code == 502
    assert "2 inputs sent, 1 embeddings returned" in err.value.message


# Units: the stored form, token shares, splitting requests.

def test_vector_keeps_float32_compact_and_float64_exact() -> None:
    f32 = Vector(np.asarray([0.5, -0.125], dtype=np.float32), "m", 3)
    f64 = Vector(np.asarray([0.1, 1 / 3], dtype=np.float64), "m", 3)
    back32, back64 = Vector.decode(f32.encode()), Vector.decode(f64.encode())
    assert back32 is not None and back64 is not None
    assert back32.values.dtype == np.float32 and back32.rendered(False) == [0.5, -0.125]
    assert back64.rendered(False) == [0.1, 1 / 3]
    assert len(f32.encode()) < len(f64.encode())
    assert base64.b64decode(back32.rendered(True)) == np.asarray(
        [0.5, -0.125], "<f4").tobytes()
    assert Vector.decode(b"not an entry at all") is None


def test_answer_numbers_choose_the_narrowest_exact_type() -> None:
    body = orjson.dumps({"model": "m", "usage": {"prompt_tokens": 5}, "data": [
        {"index": 1, "embedding": [0.1, 0.2]},
        {"index": 0, "embedding": base64.b64encode(
            np.asarray([1.5, 2.5], "<f4").tobytes()).decode()}]})
    vectors, model = vectors_from_answer(body, ["a", "bbbb"])
    assert model == "m"
    assert vectors[0].values.dtype == np.float32 and vectors[0].values.tolist() == [1.5, 2.5]
    assert vectors[1].values.dtype == np.float64 and vectors[1].values.tolist() == [0.1, 0.2]
    assert [v.tokens for v in vectors] == [1, 4]


@pytest.mark.parametrize("data", [
    [{"index": 0, "embedding": [1.0]}],
    [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}],
    [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": "!!notbase64"}],
    [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [[1.0]]}],
])
def test_unmatched_answers_are_refused(data: list[Any]) -> None:
    with pytest.raises(BadUpstreamBatch):
        vectors_from_answer(orjson.dumps({"data": data}), ["a", "b"])


@pytest.mark.parametrize(("total", "items"), [
    (10, ["a", "bb", "ccc"]), (1, ["x", "y", "z"]), (0, ["a"]), (7, [[1, 2], "abc"])])
def test_token_shares_sum_to_the_batch_total(total: int, items: list[Any]) -> None:
    shares = _shares(total, items)
    assert sum(shares) == total and all(s >= 0 for s in shares)


@pytest.mark.parametrize(("inputs", "items"), [
    ("one", ["one"]), ([1, 2, 3], [[1, 2, 3]]), (["a", "b"], ["a", "b"]),
    ([[1], [2, 3]], [[1], [2, 3]])])
def test_batches_split_into_items(inputs: Any, items: list[Any]) -> None:
    req = parse_request(Endpoint.EMBEDDINGS, orjson.dumps({"model": MODEL, "input": inputs}))
    batch = Batch.of("ns", req)
    assert batch is not None and batch.items == items and len(set(batch.keys)) == len(items)


@pytest.mark.parametrize("inputs", [[], 5, [1, "a"], [[]], None, [True]])
def test_unsplittable_inputs_are_left_to_the_upstream(inputs: Any) -> None:
    req = parse_request(Endpoint.EMBEDDINGS, orjson.dumps({"model": MODEL, "input": inputs}))
    assert Batch.of("ns", req) is None


def test_item_keys_ignore_format_but_not_dimensions() -> None:
    def keys(**body: Any) -> list[str]:
        req = parse_request(Endpoint.EMBEDDINGS, orjson.dumps({"model": MODEL} | body))
        batch = Batch.of("ns", req)
        assert batch is not None
        return batch.keys

    assert keys(input="t") == keys(input=["t"], encoding_format="base64", user="u")
    assert keys(input="t") != keys(input="t", dimensions=8)
