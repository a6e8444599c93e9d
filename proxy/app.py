"""Builds the aiohttp Application: components, routes and their lifecycle.

The app owns every long-lived object (upstream pool, pipeline, health
registry); they are created here, started and stopped by the cleanup context,
and reachable through typed app keys. Nothing is global.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web

from proxy import __version__
from proxy.cache.directive import CachePolicy
from proxy.cache.embedder import StaticEmbedder
from proxy.cache.guard import Guard
from proxy.cache.keys import KeyBuilder
from proxy.cache.normalize import Normalizer, VolatilePatterns
from proxy.cache.remote_embedder import UpstreamEmbedder
from proxy.cache.semantic import (
    DEFAULT_THRESHOLD,
    THRESHOLD_WITH_VERIFIER,
    SemanticTier,
    Thresholds,
)
from proxy.cache.semantic_feed import SemanticFeed
from proxy.cache.semantic_index import SemanticIndex
from proxy.cache.stage import CacheStage
from proxy.cache.store import CacheStore
from proxy.cache.verifier import Verifier
from proxy.config import CacheConfig, SidecarConfig
from proxy.context import Stage
from proxy.health import Check, Health, HealthRegistry, State
from proxy.passthrough import Passthrough
from proxy.pipeline import Pipeline, default_stages
from proxy.ratelimit.limiter import Limiter
from proxy.ratelimit.policy import Policy
from proxy.ratelimit.stage import LimitStage
from proxy.retry import RetryPolicy
from proxy.routing.budget import BudgetBook
from proxy.routing.catalog import Catalog, build_catalog
from proxy.routing.classifier import Classifier, load_default_rules
from proxy.routing.policy import CONSERVATIVE, Router
from proxy.routing.stage import RouteStage
from proxy.server import HealthListener
from proxy.telemetry.prometheus import MetricsServer
from proxy.telemetry.providers import Providers, build_providers, telemetry_disabled
from proxy.telemetry.stage import TelemetryStage
from proxy.upstream import Upstream, Upstreams
from proxy.wire import errors
from proxy.wire.canonical import Endpoint

log = logging.getLogger("proxy.app")

CONFIG = web.AppKey("config", SidecarConfig)
UPSTREAM = web.AppKey("upstream", Upstream)
PIPELINE = web.AppKey("pipeline", Pipeline)
HEALTH = web.AppKey("health", HealthRegistry)
TELEMETRY = web.AppKey("telemetry", Providers)
METRICS = web.AppKey("metrics", MetricsServer)
HEALTH_LISTENER = web.AppKey("health_listener", HealthListener)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Handler:
    """Turn a sidecar bug into a logged OpenAI-style 500 instead of aiohttp's text page."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConnectionResetError:
            raise  # the client left; nothing to answer
        except Exception:
            log.exception("internal error on %s %s", request.method, request.rel_url.path)
            return errors.internal_error()

    return wrapper


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc),
                        content_type="application/json")


class _Lifecycle:
    """Tracks start time and shutdown, for /status and readiness."""

    def __init__(self) -> None:
        self.started = time.time()
        self.stopping = False

    async def health(self) -> Health:
        if self.stopping:
            return Health(State.DOWN, "shutting down")
        return Health(State.OK, "", {"uptime_s": round(time.time() - self.started, 1)})


@dataclass
class _Components:
    """The long-lived parts of one app, started and stopped in a fixed order."""

    cfg: SidecarConfig
    upstreams: Upstreams
    pipeline: Pipeline
    providers: Providers | None
    limiter: Limiter | None
    cache: CacheStore | None
    feed: SemanticFeed | None
    budgets: BudgetBook | None
    metrics_server: MetricsServer | None
    verifier: Verifier | None
    health_listener: HealthListener | None = None

    async def run(self, app: web.Application) -> AsyncIterator[None]:
        """The app's cleanup context: start everything, yield while serving, stop it all."""
        await self.upstreams.start()
        self.pipeline.settler.start()
        if self.providers is not None:
            await self.providers.start()
        if self.limiter is not None:
            await self.limiter.start()
        if self.feed is not None:
            await self.feed.start()
        if self.budgets is not None:
            await self.budgets.start()
        log.info("upstream pool open for %s", self.upstreams.default.host)
        if self.metrics_server is not None:
            log.info("prometheus metrics on %s", await self.metrics_server.start())
        if self.health_listener is not None:
            # Last: a probe that answers implies everything above has started.
            log.info("health probes on %s", await self.health_listener.start())
        yield
        limit_s = min(5.0, self.cfg.server.shutdown_timeout_s)
        if self.health_listener is not None:
            await self.health_listener.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.pipeline.settler.stop(limit_s)
        await self.upstreams.close()
        if self.budgets is not None:
            await self.budgets.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.feed is not None:
            await self.feed.close()
        if self.verifier is not None:
            await asyncio.to_thread(self.verifier.close)
        if self.cache is not None:
            await self.cache.close()
        if self.providers is not None:
            await self.providers.shutdown(limit_s)


def build_app(cfg: SidecarConfig, env: Mapping[str, str] | None = None) -> web.Application:
    """Create the sidecar application for ``cfg`` (not started).

    ``env`` (default: the process environment) supplies the OTEL_* settings.
    Raises TelemetryConfigError for an unusable OTEL_* value.
    """
    env = os.environ if env is None else env
    app = web.Application(client_max_size=cfg.server.max_body_bytes)
    upstream = Upstream(cfg.upstream)
    upstreams = Upstreams(upstream, {name: Upstream(u) for name, u in cfg.upstreams.items()})
    catalog = build_catalog(cfg.routing.catalog)
    budgets = (BudgetBook(cfg.routing.budgets, cfg.routing.redis_url, cfg.routing.timeout_ms)
               if cfg.routing.budgets else None)
    route = _route_stage(cfg, catalog, budgets)
    limiter = Limiter(cfg.ratelimit) if cfg.ratelimit.rules else None
    limit = (LimitStage(Policy(cfg.ratelimit), limiter, cfg.ratelimit.max_queued)
             if limiter else None)
    cache_store = CacheStore(cfg.cache) if cfg.cache.enabled else None
    cache = (_cache_stage(cfg.cache, cache_store, upstreams)
             if cache_store is not None else None)
    feed = cache.feed if cache is not None else None
    stages: list[Stage] = default_stages(cfg, limit, cache, route)
    providers = None
    if cfg.telemetry.enabled and not telemetry_disabled(env):
        providers = build_providers(env, cfg.telemetry.service_name,
                                    prometheus=cfg.telemetry.prometheus_port is not None)
    observer = None
    if providers is not None and providers.active:
        # First in, last out: its span encloses every other stage's work.
        telemetry = TelemetryStage(providers, upstream.host, upstream.port,
                                   record_content=cfg.telemetry.record_content)
        stages.insert(0, telemetry)
        if telemetry.instruments is not None:
            observer = telemetry.instruments.passthrough_done
            for gauges in (limiter, budgets):
                if gauges is not None:
                    gauges.observe(telemetry.instruments)
    pipeline = Pipeline(cfg, upstreams, stages, RetryPolicy(cfg.routing.retry, catalog))
    passthrough = Passthrough(upstream, cfg.server.max_passthrough_body_bytes, observer)
    health = _health_registry(cfg, upstream, providers, lifecycle := _Lifecycle())
    _register_routing(health, upstreams, catalog, route, budgets)
    if limiter is not None:
        health.register("ratelimit", limiter.health)
    _register_cache(health, cache_store, cache, feed)
    app[CONFIG] = cfg
    app[UPSTREAM] = upstream
    app[PIPELINE] = pipeline
    app[HEALTH] = health
    metrics_server = None
    if providers is not None:
        app[TELEMETRY] = providers
        if providers.prometheus and providers.instruments is not None:
            app[METRICS] = metrics_server = MetricsServer(
                providers.instruments, cfg.telemetry.prometheus_host,
                cfg.telemetry.prometheus_port or 0)
    components = _Components(cfg, upstreams, pipeline, providers, limiter, cache_store, feed,
                             budgets, metrics_server,
                             cache.semantic.verifier if cache and cache.semantic else None,
                             _health_listener(app, cfg, health))

    async def on_shutdown(app: web.Application) -> None:
        lifecycle.stopping = True

    app.cleanup_ctx.append(components.run)
    app.on_shutdown.append(on_shutdown)
    _add_routes(app, pipeline, passthrough, health)
    return app


def _route_stage(cfg: SidecarConfig, catalog: Catalog,
                 budgets: BudgetBook | None) -> RouteStage:
    rt = cfg.routing
    rules = list(rt.classifier_rules) if rt.classifier_rules is not None \
        else load_default_rules()
    policies = rt.policies or (CONSERVATIVE if rt.preset == "conservative" else ())
    router = Router(catalog, policies, Classifier(rules), rt.default_output_tokens)
    return RouteStage(catalog, router, budgets, dry_run=rt.mode == "dry_run")


def _register_routing(health: HealthRegistry, upstreams: Upstreams, catalog: Catalog,
                      route: RouteStage, budgets: BudgetBook | None) -> None:
    for name, named in upstreams.named.items():
        # Only the default upstream is critical: a fallback's outage must not
        # take the pod out of service.
        health.register(f"upstream:{name}", named.health)
    health.register("router", _router_health(catalog, route))
    if budgets is not None:
        health.register("budgets", budgets.health)


def _router_health(catalog: Catalog, route: RouteStage) -> Check:
    async def check() -> Health:
        details: dict[str, object] = {
            "catalog_models": len(catalog), "catalog_as_of": catalog.as_of,
            "policies": [p.name for p in route.router.policies],
            "mode": "dry_run" if route.dry_run else "enforce"}
        if route.budgets is not None:
            details["budgets"] = route.budgets.snapshot()
        return Health(State.OK, "", details)
    return check


def _cache_stage(cfg: CacheConfig, store: CacheStore, upstreams: Upstreams) -> CacheStage:
    normalizer = (Normalizer(volatile=VolatilePatterns(tuple(cfg.volatile_patterns.items())))
                  if cfg.normalized else None)
    semantic = feed = None
    if cfg.semantic:
        embedder: StaticEmbedder | UpstreamEmbedder
        if cfg.semantic_embedder == "upstream":
            named = cfg.semantic_embedder_upstream
            embedder = UpstreamEmbedder(
                upstreams.get(named), cfg.semantic_embedder_model, cfg.semantic_embedder_dims,
                timeout_s=cfg.semantic_embedder_timeout_ms / 1000,
                # Only the agent's own provider may see the agent's key.
                pass_agent_key=named is None)
        else:
            embedder = StaticEmbedder.packaged()
        index = SemanticIndex(embedder.dims, cfg.semantic_max_entries)
        verifier = (Verifier.load(cfg.semantic_verifier, cfg.semantic_verifier_threshold,
                                  cfg.semantic_verifier_workers)
                    if cfg.semantic_verifier is not None else None)
        threshold = cfg.semantic_threshold or (
            THRESHOLD_WITH_VERIFIER if verifier is not None else DEFAULT_THRESHOLD)
        semantic = SemanticTier(embedder, Guard(enabled=cfg.semantic_guard), index,
                                Thresholds(threshold, cfg.semantic_thresholds),
                                max_chars=cfg.semantic_max_chars, verifier=verifier,
                                normalizer=normalizer)
        if cfg.redis_url:
            feed = SemanticFeed(cfg.redis_url, index, timeout_s=cfg.timeout_ms / 1000)
    return CacheStage(CachePolicy(cfg), KeyBuilder(normalizer), store, cfg.share_tenants,
                      cfg.max_entry_bytes, semantic, feed)


def _register_cache(health: HealthRegistry, store: CacheStore | None, cache: CacheStage | None,
                    feed: SemanticFeed | None) -> None:
    if store is not None:
        health.register("cache", store.health)
    if cache is not None and cache.semantic is not None:
        health.register("semantic_index", _index_health(cache.semantic, feed))
        remote = cache.semantic.embedder
        if isinstance(remote, UpstreamEmbedder):
            health.register("semantic_embedder", remote.health)


def _index_health(semantic: SemanticTier, feed: SemanticFeed | None) -> Check:
    async def check() -> Health:
        if feed is not None:
            return feed.health()
        index = semantic.index
        return Health(State.OK, "", {"entries": len(index), "contexts": index.contexts,
                                     "backend": "local"})
    return check


def _health_registry(cfg: SidecarConfig, upstream: Upstream, providers: Providers | None,
                     lifecycle: _Lifecycle) -> HealthRegistry:
    health = HealthRegistry()

    async def config_health() -> Health:
        return Health(State.OK, "", {"source": cfg.source})

    async def telemetry_health() -> Health:
        if providers is None:
            return Health(State.OK, "disabled")
        return await providers.health()

    health.register("process", lifecycle.health, critical=True)
    health.register("config", config_health, critical=True)
    health.register("upstream", upstream.health, critical=True)
    health.register("telemetry", telemetry_health)
    return health


def _health_listener(app: web.Application, cfg: SidecarConfig,
                     health: HealthRegistry) -> HealthListener | None:
    """The ``server.health_port`` listener (if set), also reachable as app[HEALTH_LISTENER]."""
    if cfg.server.health_port is None:
        return None
    app[HEALTH_LISTENER] = listener = HealthListener(
        _probe_routes(health), cfg.server.health_host, cfg.server.health_port)
    return listener


def _probe_routes(health: HealthRegistry) -> list[web.RouteDef]:
    """GET /healthz and /readyz: served on the proxy port and on ``server.health_port``."""

    async def healthz(request: web.Request) -> web.StreamResponse:
        return _json({"status": "alive"})

    async def readyz(request: web.Request) -> web.StreamResponse:
        await health.check_all()
        ready, reasons = health.ready()
        if ready:
            # Still 200 (the pod keeps serving), but say what runs in a reduced way.
            degraded = health.degraded()
            if degraded:
                return _json({"status": "degraded", "degraded": degraded})
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reasons": reasons}, status=503)

    return [web.get("/healthz", healthz), web.get("/readyz", readyz)]


def _add_routes(app: web.Application, pipeline: Pipeline, passthrough: Passthrough,
                health: HealthRegistry) -> None:
    def intercepted(endpoint: Endpoint) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await pipeline.handle(request, endpoint)
        return _guarded(handle)

    async def status(request: web.Request) -> web.StreamResponse:
        await health.check_all()
        doc = health.snapshot()
        doc["version"] = __version__
        return _json(doc)

    async def unknown(request: web.Request) -> web.StreamResponse:
        return errors.not_found(request.method, request.rel_url.path)

    for endpoint in Endpoint:
        app.router.add_post("/v1" + endpoint.value, intercepted(endpoint))
    app.router.add_routes(_probe_routes(health))
    app.router.add_get("/status", status)
    app.router.add_route("*", "/v1/{tail:.*}", _guarded(passthrough.handle))
    app.router.add_route("*", "/{tail:.*}", unknown)
