"""The semantic tier's local index: prompt vectors by context, flat or in hnswlib graphs.

A stored answer is found again only by a prompt with the same *context*
(tenant, model, system prompt, earlier turns, tools, parameters: everything
but the last user turn), so each context is searched on its own and a
search never crosses contexts. Most contexts hold a few entries: those are
a numpy matrix searched exactly (a 1,024 x 256 product is tens of
microseconds). A context that grows past ``graph_above`` entries moves to an
HNSW graph (hnswlib), whose fixed cost (about 2.6 MB of locks per graph in
hnswlib 0.8) is then spread over at least that many entries. Graphs grow
by doubling and reuse deleted slots; an empty context gives its memory back.

Every replica holds the same entries: its own, added as it stores answers,
and the others', read from the Redis stream (``proxy.cache.semantic_feed``).
An entry leaves when it expires (``sweep``), when its answer is found gone
from the store (``remove``), or, past ``max_entries``, soonest-expiring first.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import hnswlib
import numpy as np

from proxy.cache.embedder import Vector
from proxy.cache.guard import Features

_INITIAL_CAPACITY = 16
GRAPH_ABOVE = 1024


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One stored prompt: where its answer is, and what the guard compares."""

    key: str  # the cache key that holds the answer
    context: str
    features: Features
    expires_at: float  # epoch seconds (replicas share it, so wall clock)
    # The verifier's float16 vector of the prompt (``proxy.cache.verifier``),
    # when the replica that stored it runs one.
    check: bytes | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A search result: an entry and its cosine similarity to the query."""

    similarity: float
    entry: IndexEntry


class _Flat:
    """A small context: its vectors as rows of a matrix, searched exactly."""

    __slots__ = ("entries", "labels", "matrix", "slots")

    def __init__(self, dims: int) -> None:
        self.matrix = np.empty((_INITIAL_CAPACITY, dims), dtype=np.float32)
        self.labels: list[int] = []  # by row
        self.slots: dict[int, int] = {}  # label -> row
        self.entries: dict[int, IndexEntry] = {}

    def add(self, label: int, vector: Vector, entry: IndexEntry) -> None:
        row = len(self.labels)
        if row == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
        self.matrix[row] = vector
        self.labels.append(label)
        self.slots[label] = row
        self.entries[label] = entry

    def remove(self, label: int) -> None:
        row = self.slots.pop(label, None)
        if row is None:
            return
        del self.entries[label]
        last = len(self.labels) - 1
        if row != last:  # the last row fills the hole
            moved = self.labels[last]
            self.matrix[row] = self.matrix[last]
            self.labels[row] = moved
            self.slots[moved] = row
        self.labels.pop()

    def search(self, vector: Vector, k: int) -> list[tuple[int, float]]:
        n = len(self.labels)
        sims = self.matrix[:n] @ vector
        top = np.argpartition(-sims, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-sims[top])]
        return [(self.labels[i], float(sims[i])) for i in top]

    def vectors(self) -> tuple[list[int], Vector]:
        return list(self.labels), self.matrix[: len(self.labels)]


class _Graph:
    """A large context: an HNSW graph and the entries in it, by label."""

    __slots__ = ("capacity", "entries", "graph")

    def __init__(self, dims: int, capacity: int, m: int, ef_construction: int,
                 ef: int) -> None:
        self.graph = hnswlib.Index(space="ip", dim=dims)
        self.graph.init_index(max_elements=capacity, ef_construction=ef_construction,
                              M=m, allow_replace_deleted=True)
        self.graph.set_ef(ef)
        self.graph.set_num_threads(1)
        self.capacity = capacity
        self.entries: dict[int, IndexEntry] = {}

    def add(self, label: int, vector: Vector, entry: IndexEntry) -> None:
        # A graph with deleted slots reuses one; a full one doubles first.
        if self.graph.get_current_count() >= self.capacity and (
                self.graph.get_current_count() - len(self.entries)) == 0:
            self.capacity *= 2
            self.graph.resize_index(self.capacity)
        self.graph.add_items(vector[None, :], np.array([label]), replace_deleted=True)
        self.entries[label] = entry

    def remove(self, label: int) -> None:
        if self.entries.pop(label, None) is not None:
            self.graph.mark_deleted(label)

    def search(self, vector: Vector, k: int) -> list[tuple[int, float]]:
        labels, distances = self.graph.knn_query(vector[None, :], k=k)
        return [(int(label), 1.0 - float(d))
                for label, d in zip(labels[0], distances[0], strict=True)]


class SemanticIndex:
    """Vectors of stored prompts, searched within one context at a time."""

    def __init__(self, dims: int, max_entries: int = 200_000, *, m: int = 16,
                 ef_construction: int = 100, ef: int = 48,
                 graph_above: int = GRAPH_ABOVE) -> None:
        self.dims = dims
        self.max_entries = max_entries
        self.graph_above = graph_above
        self._params = (m, ef_construction, ef)
        self._graphs: dict[str, _Flat | _Graph] = {}
        self._labels: dict[str, tuple[str, int]] = {}  # key -> (context, label)
        self._expiry: list[tuple[float, int, str]] = []  # (expires_at, label, key)
        self._next_label = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def contexts(self) -> int:
        """How many contexts hold at least one entry."""
        return len(self._graphs)

    def __contains__(self, key: str) -> bool:
        return key in self._labels

    def keys(self) -> list[str]:
        """The answer keys indexed, oldest first."""
        return list(self._labels)

    def add(self, entry: IndexEntry, vector: Vector) -> bool:
        """Index ``entry`` under ``vector`` (unit length); False if its key is already in."""
        if entry.key in self._labels:
            return False
        while len(self._labels) >= self.max_entries and self._expiry:
            self._drop_soonest()
        graph = self._graphs.get(entry.context)
        if graph is None:
            graph = self._graphs[entry.context] = _Flat(self.dims)
        elif isinstance(graph, _Flat) and len(graph.entries) >= self.graph_above:
            graph = self._graphs[entry.context] = self._promote(graph)
        label = self._next_label
        self._next_label += 1
        graph.add(label, vector, entry)
        self._labels[entry.key] = (entry.context, label)
        heapq.heappush(self._expiry, (entry.expires_at, label, entry.key))
        return True

    def search(self, context: str, vector: Vector, k: int, now: float) -> list[Candidate]:
        """Up to ``k`` live entries of ``context``, most similar first.

        Expired entries met on the way are removed and the search is run
        again, so they never hide a live neighbour.
        """
        while True:
            graph = self._graphs.get(context)
            if graph is None or not graph.entries:
                return []
            found, expired = [], []
            for label, similarity in graph.search(vector, min(k, len(graph.entries))):
                entry = graph.entries[label]
                if entry.expires_at > now:
                    found.append(Candidate(similarity, entry))
                else:
                    expired.append(entry.key)
            if not expired:
                return found
            for key in expired:
                self.remove(key)
            self.expired += len(expired)

    def remove(self, key: str) -> bool:
        """Take ``key``'s entry out (its answer is gone); False if it was not in."""
        where = self._labels.pop(key, None)
        if where is None:
            return False
        context, label = where
        graph = self._graphs[context]
        graph.remove(label)
        if not graph.entries:
            del self._graphs[context]
        return True

    def sweep(self, now: float) -> int:
        """Remove every entry expired by ``now``; how many went."""
        removed = 0
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, label, key = heapq.heappop(expiry)
            if self._labels.get(key, ("", -1))[1] == label and self.remove(key):
                removed += 1
        self.expired += removed
        if len(expiry) > 2 * len(self._labels) + 1024:
            # Removed entries leave stale heap items behind; rebuild now and then.
            self._expiry = [item for item in expiry
                            if self._labels.get(item[2], ("", -1))[1] == item[1]]
            heapq.heapify(self._expiry)
        return removed

    @property
    def graphs(self) -> int:
        """How many contexts are large enough to be searched through an HNSW graph."""
        return sum(isinstance(g, _Graph) for g in self._graphs.values())

    def _promote(self, flat: _Flat) -> _Graph:
        labels, vectors = flat.vectors()
        graph = _Graph(self.dims, max(_INITIAL_CAPACITY, 2 * len(labels)), *self._params)
        graph.graph.add_items(vectors, np.array(labels))
        graph.entries = flat.entries
        return graph

    def _drop_soonest(self) -> None:
        _, label, key = heapq.heappop(self._expiry)
        if self._labels.get(key, ("", -1))[1] == label and self.remove(key):
            self.evicted += 1
