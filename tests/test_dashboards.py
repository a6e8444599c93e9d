"""The Grafana dashboards in deploy/helm/llm-sidecar/dashboards, checked against a real Prometheus.

A sidecar with its Prometheus listener serves a known workload (two chat
models, a stream, embeddings, an upstream 500 and an upstream disconnect,
rate-limit denials and holds, cache hits of every tier, a semantic refusal
and an embeddings partial hit, and priced traffic under a routing policy: a
routed request, one without a cheaper candidate, a cache hit, a retry and a
fallback after injected 500s, within a budget); a real ``prometheus``
process (Debian package, 2.42) scrapes it every second.
Every panel query, with Grafana's variables substituted the way "All" would,
must parse and return at least one real (non-NaN) sample.

The workload runs twice, before the first scrape and after it, so every
counter and histogram grows inside the ``rate()`` window.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from loadtest.bench import free_port
from loadtest.loop_thread import LoopThread
from loadtest.mock_upstream import Fault
from proxy.app import METRICS, PIPELINE
from proxy.config import (
    BudgetConfig,
    CacheConfig,
    QuotaConfig,
    RateLimitConfig,
    RetryConfig,
    RoutePolicyConfig,
    RoutingConfig,
    RuleConfig,
    TelemetryConfig,
)
from tests.conftest import Mock, SidecarFactory
from tests.redis_server import RedisServer

DASHBOARDS = (Path(__file__).resolve().parent.parent
              / "deploy" / "helm" / "llm-sidecar" / "dashboards")
EXPECTED_UIDS = {"llm-sidecar-overview.json": "llm-sidecar-overview",
                 "llm-sidecar-ratelimits.json": "llm-sidecar-ratelimits",
                 "llm-sidecar-cache.json": "llm-sidecar-cache",
                 "llm-sidecar-cost.json": "llm-sidecar-cost"}
DEADLINE_S = 30.0
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello dashboards"}]

# What Grafana would put in place of its variables with "All" selected.
SUBSTITUTIONS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "namespace": ".*",
    "model": ".*",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str) -> str:
    """``expr`` with Grafana variables replaced; an unknown variable is an error."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in SUBSTITUTIONS:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return SUBSTITUTIONS[name]

    return _VARIABLE.sub(repl, expr)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def _dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def _targets() -> list[Any]:
    params = []
    for path in _dashboard_files():
        for panel in _panels(_load(path)):
            for target in panel.get("targets", []):
                pid = f"{path.stem}:{panel.get('title')}:{target.get('refId')}"
                params.append(pytest.param(path.name, panel.get("title"), target["expr"],
                                           id=pid))
    return params


# --------------------------------------------------------------------------- structure


def test_dashboards_exist() -> None:
    assert {p.name for p in _dashboard_files()} >= set(EXPECTED_UIDS)


@pytest.mark.parametrize("path", _dashboard_files(), ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    dash = _load(path)
    assert dash["uid"] == EXPECTED_UIDS.get(path.name, path.stem)  # uid = file name
    assert dash["title"].startswith("llm-sidecar / ")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["allValue"] == ".*", name
    panels = list(_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    assert any(p.get("targets") for p in panels)
    for panel in panels:
        title = panel.get("title")
        assert title, f"panel {panel.get('id')} in {path.name} has no title"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), title
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, title
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"{title}: no description"
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
            expr = target["expr"]
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, f"{title}: {expr}"


# --------------------------------------------------------------------------- Prometheus


class PrometheusAPI:
    def __init__(self, base: str, log: Path) -> None:
        self.base = base
        self.log = log

    def fetch(self, path: str, **params: Any) -> tuple[int, bytes]:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:  # 4xx/5xx: Prometheus explains in the body
            with exc:
                return exc.code, exc.read()

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.fetch(path, **params)[1])
        return body

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def values(self, expr: str) -> list[float]:
        body = self.query(expr)
        assert body.get("status") == "success", f"{expr}: {body}"
        return [float(s["value"][1]) for s in body["data"]["result"]]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


def _wait_for(what: str, check: Callable[[], bool], api: PrometheusAPI | None,
              deadline: float) -> None:
    """Poll ``check`` until it holds; fail (with Prometheus' log) at the deadline."""
    while True:
        try:
            if check():
                return
        except (OSError, ValueError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            log = api.log_tail() if api is not None else ""
            pytest.fail(f"timed out waiting for {what}\nprometheus log:\n{log}")
        time.sleep(0.1)


def _cached_chat(c: openai.OpenAI, round_no: int, text: str) -> str:
    """A cacheable chat (temperature 0) in this round's context; its x-sidecar-cache."""
    # The round's system prompt is the semantic tier's context (and part of every
    # key), so each round starts from an empty cache with natural user wording.
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": f"Dashboards cache round {round_no}."},
        {"role": "user", "content": text}]
    raw = c.chat.completions.with_raw_response.create(model="dash-cache", messages=messages,
                                                      temperature=0)
    raw.parse()
    return raw.headers.get("x-sidecar-cache", "")


def _cache_workload(c: openai.OpenAI, round_no: int, settle: Callable[[], None]) -> int:
    """One of each cache event; ``settle`` waits until answered requests are stored."""

    def chat(text: str) -> str:
        header = _cached_chat(c, round_no, text)
        settle()  # stored (and indexed) before the next request looks it up
        return header

    def embed(items: list[str]) -> str:
        raw = c.embeddings.with_raw_response.create(
            model="dash-embed", input=[f"{item} round {round_no}" for item in items])
        raw.parse()
        settle()
        return raw.headers.get("x-sidecar-cache", "")

    assert chat("Name three primary colours.") == "miss"
    assert chat("Name three primary colours.") == "hit; tier=exact"
    assert chat("What is the boiling point of water?") == "miss"
    assert chat("  what is the boiling   point of WATER") == "hit; tier=normalized"
    assert chat("How long should I boil an egg for a soft yolk?") == "miss"
    semantic = chat("For a soft yolk, how long do I boil an egg?")
    assert semantic.startswith("hit; tier=semantic; similarity="), semantic
    assert float(semantic.rpartition("=")[2]) >= 0.9, semantic
    # Close enough to the 3-weeks prompt, but the guard refuses (reason: number).
    assert chat("How many days are there in 3 weeks?") == "miss"
    assert chat("How many days are there in 4 weeks?") == "miss"
    # Nothing in the context is close: below_threshold.
    assert chat("Which river flows through Vienna?") == "miss"
    assert embed(["a1", "b1"]) == "miss"
    assert embed(["b1", "c1"]) == "partial; tier=exact; hits=1; items=2"
    return 11


def _cost_workload(c: openai.OpenAI, mock: Mock, round_no: int,
                   settle: Callable[[], None]) -> int:
    """Priced traffic under ROUTING: every route, saving and retry kind the cost dashboard
    shows. Models of the shipped catalog, so every answer has a price."""
    simple: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
    hard: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": f"Dashboards cost round {round_no}."},
        {"role": "user", "content": "Think step by step and prove that there are "
                                    "infinitely many primes."}]

    def chat(messages: list[ChatCompletionMessageParam], fault: Fault | None = None,
             **params: Any) -> dict[str, str]:
        if fault is not None:
            mock.server.set_fault("gpt-4o", fault)
        try:
            raw = c.chat.completions.with_raw_response.create(model="gpt-4o",
                                                              messages=messages, **params)
        finally:
            mock.server.clear_faults()
        raw.parse()
        settle()  # priced, and stored in the cache, before the next request
        return dict(raw.headers)

    routed = chat(simple)  # simple: rewritten to gpt-4o-mini (route reason routed)
    assert routed["x-sidecar-model-routed"] == "gpt-4o-mini"
    assert float(routed["x-sidecar-cost-usd"]) > 0
    stays = chat(hard)  # complex: no cheaper candidate
    assert stays["x-sidecar-model-routed"] == "gpt-4o"
    assert chat(hard, temperature=0)["x-sidecar-cache"] == "miss"
    assert chat(hard, temperature=0)["x-sidecar-cache"] == "hit; tier=exact"  # saved by cache
    retried = chat(hard, Fault(status=500, times=1))
    assert retried["x-sidecar-attempts"] == "2"
    fallback = chat(hard, Fault(status=500))
    assert fallback["x-sidecar-attempts"] == "3"
    assert fallback["x-sidecar-model-routed"] == "gpt-4o-mini"
    return 6


def _workload(base_url: str, mock: Mock, round_no: int, settle: Callable[[], None]) -> int:
    """The known traffic; returns how many requests the sidecar answered."""
    with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0,
                       timeout=20) as c:
        for model in ("dash-model-a", "dash-model-b"):
            c.chat.completions.create(model=model, messages=MESSAGES)
        chunks = list(c.chat.completions.create(model="dash-model-a", messages=MESSAGES,
                                                stream=True))
        assert chunks
        c.embeddings.create(model="dash-embed", input="hello dashboards")
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="dash-model-a", messages=MESSAGES,
                                      extra_headers={"x-mock-error": "500"})
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="dash-model-b", messages=MESSAGES,
                                      extra_headers={"x-mock-disconnect": "before-headers"})
        assert info.value.status_code == 502
        # Rate limits: one denial, and one request held in queue mode then admitted.
        agent = {"x-agent-id": f"round-{round_no}"}  # a fresh hourly bucket each round
        c.chat.completions.create(model="dash-limited", messages=MESSAGES,
                                  extra_headers=agent)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="dash-limited", messages=MESSAGES,
                                      extra_headers=agent)
        held = [c.chat.completions.with_raw_response.create(model="dash-queued",
                                                            messages=MESSAGES)
                for _ in range(2)]
        assert "x-sidecar-ratelimit-wait-ms" in held[1].headers
        return 10 + _cache_workload(c, round_no, settle) + _cost_workload(c, mock, round_no,
                                                                          settle)


# The rules that give the rate-limit dashboard something to show.
RATE_LIMITS = RateLimitConfig(rules=(
    RuleConfig(name="dash-agents", per=("agent",), requests=QuotaConfig(amount=10_000)),
    RuleConfig(name="dash-hourly", per=("agent",), match={"model": "dash-limited"},
               requests=QuotaConfig(amount=1, period="1h")),
    RuleConfig(name="dash-paced", match={"model": "dash-queued"},
               requests=QuotaConfig(amount=4, period="1s", capacity=1), max_wait="5s"),
))

# Routing for the cost dashboard: gpt-4o may be replaced for simple and standard
# requests, fails over to gpt-4o-mini after one quick retry, within a budget that is
# never reached. The dash-* models are in no policy and no fallback chain.
ROUTING = RoutingConfig(
    policies=(RoutePolicyConfig(name="dash-team", substitute=("gpt-4o",),
                                tiers={"simple": ("gpt-4o-mini",),
                                       "standard": ("gpt-4o-mini",)}),),
    retry=RetryConfig(max_retries=1, backoff_ms=1, max_backoff_ms=5,
                      fallbacks={"gpt-4o": ("gpt-4o-mini",)}),
    budgets=(BudgetConfig(name="dash-daily", daily_usd=100.0),))


@pytest.fixture(scope="module")
def prometheus(loop_thread: LoopThread, mock: Mock) -> Iterator[PrometheusAPI]:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is required (apt-get install prometheus; .ci/run)"
    factory = SidecarFactory(loop_thread, mock)
    tmp = tempfile.TemporaryDirectory(prefix="llm-sidecar-prom-")
    proc: subprocess.Popen[bytes] | None = None
    redis = RedisServer(Path(tmp.name))
    redis.start()
    try:
        url = factory.start(env={}, telemetry=TelemetryConfig(prometheus_port=0,
                                                              prometheus_host="127.0.0.1"),
                            ratelimit=dataclasses.replace(RATE_LIMITS, redis_url=redis.url),
                            cache=CacheConfig(semantic=True), routing=ROUTING)

        def settle() -> None:
            factory.lt.call(factory.apps[url][PIPELINE].settler.join())

        scrape_url = factory.apps[url][METRICS].url
        assert scrape_url is not None
        target = scrape_url.removeprefix("http://").removesuffix("/metrics")
        expected = _workload(url, mock, 1, settle)

        root = Path(tmp.name)
        config = root / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "llm-sidecar", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }))
        port = free_port()
        log = root / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, cwd=root)
        api = PrometheusAPI(f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + DEADLINE_S

        def running() -> bool:
            assert proc is not None and proc.poll() is None, \
                f"prometheus exited:\n{api.log_tail()}"
            return api.fetch("/-/ready")[0] == 200

        def total_is(n: int) -> Callable[[], bool]:
            return lambda: running() and api.values(
                "sum(llm_sidecar_requests_total)") == [float(n)]

        _wait_for("prometheus to be ready", running, api, deadline)
        # First scrapes: the first workload is in, and rate() has two samples.
        _wait_for("the first workload in Prometheus", total_is(expected), api, deadline)
        _wait_for("two scrapes", lambda: running() and bool(
            api.values("count_over_time(up[1m]) >= 2")), api, deadline)
        # Second workload, so every series grows inside the rate() window.
        expected += _workload(url, mock, 2, settle)
        _wait_for("the second workload in Prometheus", total_is(expected), api, deadline)
        yield api
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        factory.close()
        redis.stop()
        tmp.cleanup()


def test_regex_matcher_matches_series_without_the_label(prometheus: PrometheusAPI) -> None:
    # The scrape here has no `namespace` target label, as with "All" outside Kubernetes.
    assert prometheus.values('sum(llm_sidecar_requests_total{namespace=~".*"})') == \
        prometheus.values("sum(llm_sidecar_requests_total)")


@pytest.mark.parametrize(("dashboard", "title", "expr"), _targets())
def test_panel_query_returns_data(prometheus: PrometheusAPI, dashboard: str, title: str,
                                  expr: str) -> None:
    promql = substitute(expr)
    body = prometheus.query(promql)
    where = f"{dashboard} / {title!r}: {promql}"
    assert body.get("status") == "success", f"{where}\n-> {body}"
    result = body["data"]["result"]
    assert result, f"{where}\n-> no data"
    values = [float(sample["value"][1]) for sample in result]
    assert any(not math.isnan(v) for v in values), f"{where}\n-> only NaN: {result}"


@pytest.mark.parametrize("path", _dashboard_files(), ids=lambda p: p.stem)
def test_template_variables_resolve(prometheus: PrometheusAPI, path: Path) -> None:
    """Each ``label_values(selector, label)`` variable selects existing series."""
    found: dict[str, list[str]] = {}
    for var in _load(path)["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert m, f"{var['name']}: {query}"
        selector, label = substitute(m.group(1)), m.group(2)
        series = prometheus.get("/api/v1/series", **{"match[]": selector})
        assert series.get("status") == "success" and series["data"], \
            f"{var['name']}: {selector} selects nothing: {series}"
        body = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        assert body.get("status") == "success", f"{var['name']}: {body}"
        found[var["name"]] = body["data"]
    # No `namespace` label outside Kubernetes; the models are the workload's.
    assert {"dash-model-a", "dash-model-b", "dash-embed", "dash-limited", "dash-cache"} <= set(
        found.get("model", []))


def test_cache_workload_covers_every_label_value(prometheus: PrometheusAPI) -> None:
    """The cache dashboard's label values all occur, so no panel passes on a subset."""

    def label_values(label: str, selector: str) -> set[str]:
        body = prometheus.query(f"sum by ({label}) ({selector})")
        assert body.get("status") == "success", f"{selector}: {body}"
        return {s["metric"].get(label, "") for s in body["data"]["result"]}

    result, tier = "llm_sidecar_cache_result", "llm_sidecar_cache_tier"
    outcome, reason = "llm_sidecar_cache_semantic_outcome", "llm_sidecar_cache_semantic_reason"
    lookups, similarity = "llm_sidecar_cache_lookups_total", "llm_sidecar_cache_similarity_count"
    assert label_values(result, lookups) == {"hit", "miss", "partial"}
    assert label_values(tier, f'{lookups}{{{result}="hit"}}') == {
        "exact", "normalized", "semantic"}
    assert label_values(outcome, similarity) == {"hit", "below_threshold", "refused"}
    assert label_values(reason, f'{similarity}{{{outcome}="refused"}}') == {"number"}


def test_cost_workload_covers_every_label_value(prometheus: PrometheusAPI) -> None:
    """The cost dashboard's label values all occur, so no panel passes on a subset."""

    def label_values(label: str, selector: str) -> set[str]:
        body = prometheus.query(f"sum by ({label}) ({selector})")
        assert body.get("status") == "success", f"{selector}: {body}"
        return {s["metric"].get(label, "") for s in body["data"]["result"]}

    model = "gen_ai_request_model"
    assert label_values(model, "llm_sidecar_cost_USD_total") == {"gpt-4o", "gpt-4o-mini"}
    assert label_values("llm_sidecar_saved_by", "llm_sidecar_cost_saved_USD_total") == {
        "cache", "routing"}
    decisions = "llm_sidecar_route_decisions_total"
    assert label_values("llm_sidecar_route_reason", decisions) == {
        "routed", "no_candidate", "no_policy", "not_routed_endpoint"}
    assert label_values("llm_sidecar_route_tier", decisions) == {"simple", "complex", ""}
    assert label_values("llm_sidecar_retry_kind", "llm_sidecar_upstream_retries_total") == {
        "retry", "fallback"}
    [usage] = prometheus.values(
        'llm_sidecar_budget_usage_ratio{llm_sidecar_budget="dash-daily", '
        'llm_sidecar_budget_period="day"}')
    assert 0 < usage < 1
