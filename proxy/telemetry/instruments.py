"""The sidecar's metrics: GenAI semantic conventions plus ``llm_sidecar.*``.

Measurements are aggregated here, in plain dicts keyed by label-value tuples
(about a microsecond each), instead of through the SDK's instruments, which
validate and hash the attribute set on every call and cost the sidecar more
than all its own request handling. A snapshot is turned into the SDK's
``MetricsData`` only when someone collects: the OTLP exporter every export
interval, or a Prometheus scrape.

Every label has a small, bounded set of values: no keys, tenants, prompts or
request ids. Model names come from clients, so only the first ``MAX_MODELS``
distinct ones become label values; later ones are ``_other``. The README's
metrics table documents each metric and its labels.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from proxy.wire.usage import Usage

MAX_MODELS = 100
MAX_AGENTS = 200
OTHER = "_other"
PROVIDER = "openai"

# Bucket boundaries recommended by the GenAI semantic conventions.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576,
                  4194304, 16777216, 67108864)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                     20.48, 40.96, 81.92)
# The sidecar's own cost is sub-millisecond: buckets to match.
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                     0.025, 0.05, 0.1)
_SIMILARITY_BUCKETS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99,
                       1.0)

LabelValue = str | int


def _attributes(labels: tuple[str, ...], key: tuple[LabelValue, ...]) -> dict[str, LabelValue]:
    # "" marks an absent label (error.type on success), which is left out.
    return {k: v for k, v in zip(labels, key, strict=True) if v != ""}


class _HistogramState:
    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class _Histogram:
    """A cumulative explicit-bucket histogram per label tuple."""

    def __init__(self, name: str, unit: str, description: str, labels: Sequence[str],
                 bounds: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.labels = tuple(labels)
        self.bounds = tuple(float(b) for b in bounds)
        self.series: dict[tuple[LabelValue, ...], _HistogramState] = {}

    def record(self, value: float, key: tuple[LabelValue, ...]) -> None:
        state = self.series.get(key)
        if state is None:
            state = self.series[key] = _HistogramState(len(self.bounds))
        # OTel buckets are (previous bound, bound]: bisect_left puts a value equal
        # to a bound in that bound's bucket.
        state.counts[bisect.bisect_left(self.bounds, value)] += 1
        state.count += 1
        state.sum += value
        state.min = min(state.min, value)
        state.max = max(state.max, value)

    def metric(self, start_ns: int, now_ns: int) -> Metric:
        points = [HistogramDataPoint(
            attributes=_attributes(self.labels, key), start_time_unix_nano=start_ns,
            time_unix_nano=now_ns, count=s.count, sum=s.sum, bucket_counts=list(s.counts),
            explicit_bounds=self.bounds, min=s.min, max=s.max)
            for key, s in self.series.items()]
        return Metric(self.name, self.description, self.unit,
                      Histogram(points, AggregationTemporality.CUMULATIVE))


class _Counter:
    """A cumulative monotonic counter per label tuple."""

    def __init__(self, name: str, unit: str, description: str,
                 labels: Sequence[str]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.labels = tuple(labels)
        self.series: dict[tuple[LabelValue, ...], float] = {}

    def add(self, key: tuple[LabelValue, ...], amount: float = 1) -> None:
        self.series[key] = self.series.get(key, 0) + amount

    def metric(self, start_ns: int, now_ns: int) -> Metric:
        points = [NumberDataPoint(attributes=_attributes(self.labels, key),
                                  start_time_unix_nano=start_ns, time_unix_nano=now_ns,
                                  value=value)
                  for key, value in self.series.items()]
        return Metric(self.name, self.description, self.unit,
                      Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True))


Observation = Callable[[], Mapping[tuple[LabelValue, ...], float]]


class _ObservedGauge:
    """A gauge read from its owner (breaker state, queue length) when collected."""

    def __init__(self, name: str, unit: str, description: str, labels: Sequence[str],
                 observe: Observation) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.labels = tuple(labels)
        self.observe = observe

    @property
    def series(self) -> Mapping[tuple[LabelValue, ...], float]:
        return self.observe()

    def metric(self, start_ns: int, now_ns: int) -> Metric:
        points = [NumberDataPoint(attributes=_attributes(self.labels, key),
                                  start_time_unix_nano=start_ns, time_unix_nano=now_ns,
                                  value=value)
                  for key, value in self.observe().items()]
        return Metric(self.name, self.description, self.unit, Gauge(points))


_MODEL_LABELS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model")


@dataclass(frozen=True, slots=True)
class RequestMeasurements:
    """What one finished intercepted request contributes to the metrics."""

    operation: str
    model: str
    status: int
    error: str | None
    upstream_error: str | None
    duration_s: float
    first_chunk_s: float | None
    usage: Usage | None
    overhead_s: float | None
    from_cache: bool = False  # answered by the cache: its usage was not spent upstream
    agent: str | None = None
    cost_usd: float | None = None  # what the upstream answer cost (catalog prices)
    saved_usd: float | None = None  # what a cache hit or a cheaper route avoided
    saved_by: str = ""
    route_reason: str = ""  # the router's decision, "" where routing did not run
    route_tier: str = ""
    attempts: int = 0  # upstream attempts (retries and fallbacks included)
    fallbacks: int = 0  # of them, tries on a fallback model


class Instruments:
    """Aggregates the sidecar's measurements; renders them as MetricsData on collection."""

    def __init__(self, resource: Resource, scope_version: str) -> None:
        self.resource = resource
        self.scope = InstrumentationScope("llm-sidecar", scope_version)
        self.start_ns = time.time_ns()
        self.token_usage = _Histogram(
            "gen_ai.client.token.usage", "{token}",
            "Tokens used per request, by gen_ai.token.type (input/output); answers served "
            "from the cache are counted in llm_sidecar.cache.tokens instead.",
            (*_MODEL_LABELS, "gen_ai.token.type"), _TOKEN_BUCKETS)
        self.duration = _Histogram(
            "gen_ai.client.operation.duration", "s",
            "Time from the request's arrival to the end of its answer.",
            (*_MODEL_LABELS, "error.type"), _DURATION_BUCKETS)
        self.time_to_first_chunk = _Histogram(
            "llm_sidecar.time_to_first_chunk", "s",
            "Streams: time from the request's arrival to its first chunk.",
            _MODEL_LABELS, _DURATION_BUCKETS)
        self.requests = _Counter(
            "llm_sidecar.requests", "{request}",
            "Requests answered, by operation and HTTP status.",
            ("gen_ai.operation.name", "http.response.status_code"))
        self.passthrough_requests = _Counter(
            "llm_sidecar.passthrough.requests", "{request}",
            "Requests relayed untouched (files, models, ...), by method and status.",
            ("http.request.method", "http.response.status_code"))
        self.upstream_errors = _Counter(
            "llm_sidecar.upstream.errors", "{error}",
            "Upstream exchanges that failed in the sidecar (no upstream answer).",
            ("error.type",))
        self.overhead = _Histogram(
            "llm_sidecar.overhead", "s",
            "Time spent in the sidecar per request, upstream excluded.",
            ("gen_ai.operation.name",), _OVERHEAD_BUCKETS)
        self.ratelimit_decisions = _Counter(
            "llm_sidecar.ratelimit.decisions", "{decision}",
            "Rate-limit decisions by outcome (admitted, queued = admitted after a hold, "
            "denied, too_large, unavailable), denying rule and backend (redis, reserved, local, "
            "open, closed).",
            ("llm_sidecar.ratelimit.outcome", "llm_sidecar.ratelimit.rule",
             "llm_sidecar.ratelimit.backend"))
        self.ratelimit_duration = _Histogram(
            "llm_sidecar.ratelimit.duration", "s",
            "Time to decide a request's limits, including any hold in queue mode.",
            ("llm_sidecar.ratelimit.outcome", "llm_sidecar.ratelimit.backend"),
            (*_OVERHEAD_BUCKETS, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.cache_lookups = _Counter(
            "llm_sidecar.cache.lookups", "{lookup}",
            "Response-cache lookups by result (hit, miss, partial) and tier (exact, "
            "normalized, semantic; empty for a miss).",
            ("llm_sidecar.cache.result", "llm_sidecar.cache.tier"))
        self.cache_duration = _Histogram(
            "llm_sidecar.cache.duration", "s",
            "Time to look a request up in the cache (local LRU, then Redis).",
            ("llm_sidecar.cache.result",), _OVERHEAD_BUCKETS)
        self.cache_similarity = _Histogram(
            "llm_sidecar.cache.similarity", "1",
            "Semantic tier: cosine similarity of the closest stored prompt in the request's "
            "context, by outcome (hit, below_threshold, refused by the guard) and the guard's "
            "reason (number, negation, quote, identifier, entity; empty otherwise).",
            ("llm_sidecar.cache.semantic.outcome", "llm_sidecar.cache.semantic.reason"),
            _SIMILARITY_BUCKETS)
        self.cache_tokens = _Counter(
            "llm_sidecar.cache.tokens", "{token}",
            "Tokens of the answers the cache served, by gen_ai.token.type: what those "
            "requests would have spent upstream (gen_ai.client.token.usage counts only "
            "answers that came from the upstream).",
            (*_MODEL_LABELS, "gen_ai.token.type"))
        self.cost = _Counter(
            "llm_sidecar.cost", "USD",
            "What upstream answers cost at the catalog's prices (cached input at its own "
            "price), by the model that answered and the agent (x-agent-id; the first "
            f"{MAX_AGENTS} distinct ids, later ones as {OTHER}).",
            (*_MODEL_LABELS, "llm_sidecar.agent_id"))
        self.cost_saved = _Counter(
            "llm_sidecar.cost.saved", "USD",
            "What the sidecar avoided spending, by llm_sidecar.saved_by: cache (a hit's "
            "answer at its model's prices) or routing (the answer's tokens at the requested "
            "model's prices minus what the routed model cost).",
            (*_MODEL_LABELS, "llm_sidecar.saved_by", "llm_sidecar.agent_id"))
        self.route_decisions = _Counter(
            "llm_sidecar.route.decisions", "{decision}",
            "Routing decisions by reason (routed, no_candidate, opt_out, no_policy "
            "(no policy may replace the model), unknown_model, budget_cheapest, "
            "budget_no_candidate, not_routed_endpoint) and request tier.",
            ("llm_sidecar.route.reason", "llm_sidecar.route.tier"))
        self.upstream_attempts = _Counter(
            "llm_sidecar.upstream.retries", "{attempt}",
            "Upstream attempts beyond the first, by kind: retry (another try on the same "
            "model) or fallback (a try on the next model of the fallback chain).",
            ("llm_sidecar.retry.kind",))
        self._all: list[_Histogram | _Counter | _ObservedGauge] = [
            self.token_usage, self.duration, self.time_to_first_chunk, self.requests,
            self.passthrough_requests, self.upstream_errors, self.overhead,
            self.ratelimit_decisions, self.ratelimit_duration, self.cache_lookups,
            self.cache_duration, self.cache_similarity, self.cache_tokens, self.cost,
            self.cost_saved, self.route_decisions, self.upstream_attempts]
        self._models: dict[str, str] = {}
        self._agents: dict[str, str] = {}

    def observe(self, name: str, unit: str, description: str, labels: Sequence[str],
                observe: Observation) -> None:
        """Add a gauge whose values ``observe`` returns at each collection."""
        self._all.append(_ObservedGauge(name, unit, description, labels, observe))

    def ratelimit_done(self, outcome: str, rule: str, backend: str, duration_s: float) -> None:
        """Record one rate-limit decision (``rule``: the denying rule, "" if admitted)."""
        self.ratelimit_decisions.add((outcome, rule, backend))
        self.ratelimit_duration.record(duration_s, (outcome, backend))

    def cache_looked_up(self, result: str, tier: str, duration_s: float) -> None:
        """Record one cache lookup (``tier``: the tier that hit, "" for a miss)."""
        self.cache_lookups.add((result, tier))
        self.cache_duration.record(duration_s, (result,))

    def cache_similarity_seen(self, outcome: str, reason: str, similarity: float) -> None:
        """Record the best semantic candidate's similarity for one lookup."""
        self.cache_similarity.record(similarity, (outcome, reason))

    def model_label(self, model: str | None) -> str:
        """A bounded label value for a client-supplied model name."""
        if not model:
            return ""
        label = self._models.get(model)
        if label is None:
            if len(self._models) >= MAX_MODELS:
                return OTHER
            label = self._models[model] = model[:64]
        return label

    def agent_label(self, agent: str | None) -> str:
        """A bounded label value for a client-supplied agent id ("" when none was sent)."""
        if not agent:
            return ""
        label = self._agents.get(agent)
        if label is None:
            if len(self._agents) >= MAX_AGENTS:
                return OTHER
            label = self._agents[agent] = agent[:64]
        return label

    def request_done(self, m: RequestMeasurements) -> None:
        """Record a finished intercepted request."""
        base = (m.operation, PROVIDER, self.model_label(m.model))
        # error.type is absent on success, as the conventions have it; "" keeps
        # the tuple shape and is dropped when rendered.
        self.duration.record(m.duration_s, (*base, m.error or ""))
        if m.first_chunk_s is not None:
            self.time_to_first_chunk.record(m.first_chunk_s, base)
        if m.usage is not None and m.from_cache:
            self.cache_tokens.add((*base, "input"), m.usage.input_tokens)
            self.cache_tokens.add((*base, "output"), m.usage.output_tokens)
        elif m.usage is not None:
            self.token_usage.record(m.usage.input_tokens, (*base, "input"))
            self.token_usage.record(m.usage.output_tokens, (*base, "output"))
        self.requests.add((m.operation, m.status))
        if m.cost_usd is not None or m.saved_usd:
            agent = self.agent_label(m.agent)
            if m.cost_usd is not None:
                self.cost.add((*base, agent), m.cost_usd)
            if m.saved_usd:
                self.cost_saved.add((*base, m.saved_by, agent), m.saved_usd)
        if m.route_reason:
            self.route_decisions.add((m.route_reason, m.route_tier))
        if m.attempts > 1:
            if m.attempts - 1 > m.fallbacks:
                self.upstream_attempts.add(("retry",), m.attempts - 1 - m.fallbacks)
            if m.fallbacks:
                self.upstream_attempts.add(("fallback",), m.fallbacks)
        if m.upstream_error is not None:
            self.upstream_errors.add((m.upstream_error,))
        if m.overhead_s is not None:
            self.overhead.record(m.overhead_s, (m.operation,))

    def rejected(self, operation: str, status: int) -> None:
        """Record a request refused before it could be parsed."""
        self.requests.add((operation, status))

    def passthrough_done(self, method: str, status: int, failure: str | None) -> None:
        """Count a finished pass-through request (an observer for Passthrough)."""
        self.passthrough_requests.add((method[:16], status))
        if failure is not None:
            self.upstream_errors.add((failure,))

    def collect(self) -> MetricsData:
        """A cumulative snapshot of every metric that has data."""
        now = time.time_ns()
        metrics = []
        for instrument in self._all:
            if instrument.series:
                metrics.append(instrument.metric(self.start_ns, now))
        return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(
            self.scope, metrics, "")], "")])
