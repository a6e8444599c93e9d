"""The semantic tier's parts: embedder, guard, index, thresholds (no server)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from proxy.cache.embedder import StaticEmbedder
from proxy.cache.guard import Features, Guard
from proxy.cache.semantic import Probe, SemanticTier, Thresholds
from proxy.cache.semantic_index import IndexEntry, SemanticIndex
from proxy.wire.canonical import CanonicalRequest, Endpoint, parse_request


@pytest.fixture(scope="module")
def embedder() -> StaticEmbedder:
    return StaticEmbedder.packaged()


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard()


def test_embedder_ranks_paraphrase_above_unrelated(embedder: StaticEmbedder) -> None:
    a = embedder.embed("How do I reset my password?")
    b = embedder.embed("How can I change my password?")
    c = embedder.embed("What is the capital of France?")
    assert a.dtype == np.float32 and a.shape == (embedder.dims,)
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert float(a @ b) > 0.8
    assert float(a @ c) < 0.2


def test_embedder_gives_zero_vector_for_text_without_known_tokens(
        embedder: StaticEmbedder) -> None:
    assert not np.any(embedder.embed(""))
    assert np.any(embedder.embed("hello"))


@pytest.mark.parametrize(("a", "b", "reason"), [
    ("What is 2+2?", "What is 2+3?", "number"),
    ("Upgrade to Python 3.11", "Upgrade to Python 3.12", "number"),
    ("Give me three examples", "Give me four examples", "number"),
    ("Roll back the deploy to version v1.5.0", "Roll back the deploy to version v1.6.0",
     "number"),
    ("The service is healthy", "The service is not healthy", "negation"),
    ("Does it support IPv6?", "Doesn't it support IPv6?", "negation"),
    ("Make tea with sugar", "Make tea without sugar", "negation"),
    ('Translate "good morning" to French', 'Translate "good night" to French', "quote"),
    ("Explain what `map` does", "Explain what `filter` does", "quote"),
    ("Why does get_user return None?", "Why does get_users return None?", "identifier"),
    ("Open utils.py and fix the import", "Open helpers.py and fix the import", "identifier"),
    ("What does fetchUser do here", "What does fetchUsers do here", "identifier"),
    ("Run it with --verbose please", "Run it with --quiet please", "identifier"),
    ("Book a hotel in Berlin for me", "Book a hotel in Munich for me", "entity"),
    ("cheap flights to paris", "cheap flights to london", "entity"),
    ("Paris or Rome in spring?", "Madrid or Rome in spring?", "entity"),
    ("Deploy it on AWS", "Deploy it on GCP", "entity"),
    ("Filter rows where created_at > updated_at, then sort by created_at",
     "Filter rows where created_at > updated_at, then sort by updated_at", "identifier"),
])
def test_guard_refuses_pairs_that_differ_in_what_matters(guard: Guard, a: str, b: str,
                                                        reason: str) -> None:
    assert guard.refuses(guard.features(a), guard.features(b)) == reason


@pytest.mark.parametrize(("a", "b"), [
    ("How do I reverse a list in Python?", "What's the way to reverse a Python list?"),
    ("The service isn't healthy", "The service is not healthy"),
    ("Can you explain what a closure is?", "Explain what a closure is."),
    ("Summarise this in 3 bullet points", "Summarize this in 3 bullet points please"),
    ("Why does get_user return None?", "Why is get_user returning None?"),
    ("What's the weather like in Paris today?", "How is the weather in Paris today?"),
    ("I don't understand recursion", "I do not understand recursion"),
    ("Explain Python's GIL briefly", "briefly explain the GIL in python"),
])
def test_guard_lets_paraphrases_through(guard: Guard, a: str, b: str) -> None:
    assert guard.refuses(guard.features(a), guard.features(b)) is None


def test_guard_features_round_trip_the_wire_form(guard: Guard) -> None:
    f = guard.features('Is `os.path` in Python 3.12 not "deprecated", Guido?')
    assert Features.from_wire(f.to_wire()) == f
    assert f.numbers == ("3.12",) and f.negations == 1
    assert f.quotes == ("deprecated", "os.path") and "os.path" in f.identifiers
    assert {"python", "guido"} <= f.entities and "deprecated" in f.words
    with pytest.raises(ValueError, match="malformed"):
        Features.from_wire([["1"], "x", [], [], [], []])


def test_disabled_guard_refuses_nothing() -> None:
    off = Guard(frozenset(), enabled=False)
    assert off.refuses(off.features("2+2"), off.features("2+3")) is None


def _vec(*values: float) -> np.ndarray:
    v = np.zeros(8, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def _entry(key: str, context: str = "c1", expires_at: float = 1e12) -> IndexEntry:
    return IndexEntry(key, context, Features((), 0, (), (), frozenset(), frozenset()),
                      expires_at)


def test_index_searches_within_one_context_only() -> None:
    index = SemanticIndex(8)
    index.add(_entry("a", "c1"), _vec(1, 0))
    index.add(_entry("b", "c2"), _vec(1, 0.01))
    found = index.search("c1", _vec(1, 0.02), 4, now=0)
    assert [c.entry.key for c in found] == ["a"]
    assert found[0].similarity == pytest.approx(float(_vec(1, 0) @ _vec(1, 0.02)), abs=1e-5)
    assert index.search("c3", _vec(1, 0), 4, now=0) == []


def test_index_grows_past_its_initial_capacity_and_reuses_deleted_slots() -> None:
    index = SemanticIndex(8, graph_above=32)  # flat up to 32 entries, then an HNSW graph
    rng = np.random.default_rng(1)
    vectors = [v / np.linalg.norm(v) for v in rng.normal(size=(100, 8)).astype(np.float32)]
    for i, v in enumerate(vectors):
        assert index.add(_entry(f"k{i}"), v)
    assert not index.add(_entry("k0"), vectors[0])  # idempotent by key
    assert len(index) == 100 and index.contexts == 1 and index.graphs == 1
    for i in range(0, 100, 2):
        assert index.remove(f"k{i}")
    for i, v in enumerate(vectors):
        found = index.search("c1", v, 1, now=0)
        assert found[0].entry.key == (f"k{i}" if i % 2 else found[0].entry.key)
        assert found[0].entry.key != f"k{i}" or i % 2
    for i in range(50):
        index.add(_entry(f"n{i}"), vectors[i])
    assert len(index) == 100


@pytest.mark.parametrize("graph_above", [10_000, 8])
def test_flat_and_graph_contexts_find_the_same_nearest(graph_above: int) -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = SemanticIndex(8, graph_above=graph_above)
    for i, v in enumerate(vectors):
        index.add(_entry(f"k{i}"), v)
    for i in range(0, 60, 3):
        index.remove(f"k{i}")
    live = [i for i in range(60) if i % 3]
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    for q in queries / np.linalg.norm(queries, axis=1, keepdims=True):
        sims = {i: float(vectors[i] @ q) for i in live}
        best = sorted(live, key=lambda i: -sims[i])[:3]
        found = index.search("c1", q, 3, now=0)
        assert [c.entry.key for c in found] == [f"k{i}" for i in best]
        assert [c.similarity for c in found] == pytest.approx([sims[i] for i in best], abs=1e-5)
    assert index.graphs == (1 if graph_above == 8 else 0)


def test_index_sweeps_expired_entries_and_evicts_soonest_expiring_first() -> None:
    index = SemanticIndex(8, max_entries=3)
    index.add(_entry("late", expires_at=300), _vec(1, 0))
    index.add(_entry("soon", expires_at=100), _vec(0, 1))
    index.add(_entry("mid", expires_at=200), _vec(1, 1))
    index.add(_entry("new", expires_at=400), _vec(1, 2))  # full: "soon" leaves
    assert "soon" not in index and len(index) == 3 and index.evicted == 1
    index.add(_entry("gone", expires_at=50), _vec(0, 1))  # evicts "mid"...
    assert "mid" not in index
    index.add(_entry("mid", expires_at=200), _vec(1, 1))  # ...which evicts "gone" again
    assert "gone" not in index
    # An expired nearest neighbour does not hide the live one behind it.
    index = SemanticIndex(8)
    index.add(_entry("stale", expires_at=100), _vec(0, 1))
    index.add(_entry("mid", expires_at=200), _vec(1, 1))
    index.add(_entry("late", expires_at=300), _vec(1, 0))
    assert index.search("c1", _vec(0, 1), 1, now=150)[0].entry.key == "mid"
    assert "stale" not in index
    index.add(_entry("new", expires_at=400), _vec(1, 2))
    assert index.sweep(now=250) == 1
    assert "mid" not in index and {"late", "new"} == {k for k in ("late", "new") if k in index}
    index.remove("late")
    index.remove("new")
    assert index.contexts == 0  # an empty context gives its graph back


def test_thresholds_per_model_glob() -> None:
    t = Thresholds(0.9, {"gpt-4o-mini*": 0.95, "gpt-4*": 1.0})
    assert t.for_model("gpt-4o-mini-2024-07-18") == 0.95
    assert t.for_model("gpt-4.1") == 1.0
    assert t.for_model("o3") == 0.9


def _canonical(messages: list[dict[str, object]], **extra: object) -> CanonicalRequest:
    return parse_request(Endpoint.CHAT, orjson.dumps({"model": "m", "temperature": 0,
                                                      "messages": messages, **extra}))


def test_probe_context_covers_everything_but_the_last_user_turn(
        embedder: StaticEmbedder, guard: Guard) -> None:
    tier = SemanticTier(embedder, guard, SemanticIndex(embedder.dims), Thresholds(0.9, {}))
    sys = {"role": "system", "content": "Be brief."}

    def probe(*messages: dict[str, object], scope: str = "ns/t1",
              **extra: object) -> Probe | None:
        return tier.probe(scope, _canonical(list(messages), **extra))

    a = probe(sys, {"role": "user", "content": "How do I reset my password?"})
    b = probe(sys, {"role": "user", "content": [{"type": "text",
                                                  "text": "How can I change my password?"}]})
    assert a is not None and b is not None and a.context == b.context
    others = [
        probe({"role": "system", "content": "Be verbose."},
              {"role": "user", "content": "How do I reset my password?"}),
        probe(sys, {"role": "user", "content": "How do I reset my password?"}, scope="ns/t2"),
        probe(sys, {"role": "user", "content": "How do I reset my password?"}, max_tokens=5),
    ]
    assert all(o is not None and o.context != a.context for o in others)
    assert probe(sys, {"role": "assistant", "content": "hi"}) is None
    assert probe(sys, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}) is None
    assert probe(sys, {"role": "user", "content": "x" * 3000}) is None
