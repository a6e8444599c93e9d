"""Catalog validation, capability gating, cost ceilings and budget levels in the router."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.config import (
    ConfigError,
    ModelConfig,
    RouteMatchConfig,
    RoutePolicyConfig,
    load_config,
)
from proxy.context import Identity
from proxy.retry import RetryPolicy, retry_after_s, retryable_status
from proxy.routing.catalog import CatalogError, build_catalog
from proxy.routing.classifier import Classifier, load_default_rules
from proxy.routing.policy import CONSERVATIVE, Router
from proxy.wire.canonical import Endpoint, parse_request
from proxy.wire.usage import Usage

CATALOG = build_catalog({})
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
WIDE = RoutePolicyConfig(
    name="wide", substitute=("gpt-4o", "gpt-4.1"),
    tiers={"simple": ("gpt-4.1-nano", "gpt-4o-mini"), "standard": ("gpt-4o-mini",),
           "complex": ()})
ME = Identity("team-a", "t1", "agent-1")


def _router(*policies: RoutePolicyConfig) -> Router:
    return Router(CATALOG, policies or (WIDE,), Classifier(load_default_rules()), 512)


def _req(body: dict[str, Any], endpoint: Endpoint = Endpoint.CHAT) -> Any:
    return parse_request(endpoint, orjson.dumps(body))


def _chat(text: str = "Say hello.", model: str = "gpt-4o", **kw: Any) -> Any:
    return _req({"model": model, "messages": [{"role": "user", "content": text}], **kw})


def _write(tmp_path: Any, text: str) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ catalog


def test_shipped_catalog_prices_and_snapshot_names() -> None:
    spec = CATALOG.get("gpt-4o-2024-08-06")
    assert spec is not None and spec.name == "gpt-4o"
    assert CATALOG.get("no-such-model") is None
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, total_tokens=2_000_000,
                  cached_input_tokens=400_000)
    # 600k input at 2.50, 400k cached at 1.25, 1M output at 10.00
    assert CATALOG.cost("gpt-4o", usage) == pytest.approx(1.5 + 0.5 + 10.0)
    assert "sampling" not in CATALOG.models["gpt-5"].capabilities
    assert CATALOG.as_of


def test_catalog_override_changes_only_the_fields_it_sets() -> None:
    catalog = build_catalog({"gpt-4o": ModelConfig(output_per_1m=20.0),
                             "local": ModelConfig(input_per_1m=0, output_per_1m=0,
                                                  context_window=8192, max_output=1024,
                                                  capabilities=("tools",))})
    assert catalog.models["gpt-4o"].output_price == pytest.approx(20e-6)
    assert catalog.models["gpt-4o"].input_price == pytest.approx(2.5e-6)
    assert catalog.models["local"].capabilities == frozenset({"tools"})


@pytest.mark.parametrize(("entry", "message"), [
    (ModelConfig(input_per_1m=1.0), "routing.catalog.new.output_per_1m: required"),
    (ModelConfig(input_per_1m=1, output_per_1m=1, context_window=100, max_output=1000),
     "routing.catalog.new.max_output: must be <= context_window"),
    (ModelConfig(input_per_1m=1, output_per_1m=1, context_window=100, max_output=10,
                 capabilities=("telepathy",)), "unknown capability 'telepathy'"),
    (ModelConfig(input_per_1m=1, cached_input_per_1m=2, output_per_1m=1, context_window=100,
                 max_output=10), "cached_input_per_1m: must be <= input_per_1m"),
])
def test_bad_catalog_entries_are_named(entry: ModelConfig, message: str) -> None:
    with pytest.raises(CatalogError) as err:
        build_catalog({"new": entry})
    assert any(message in p for p in err.value.problems), err.value.problems


def test_config_errors_name_every_bad_routing_key(tmp_path: Any) -> None:
    path = _write(tmp_path, """
routing:
  catalog:
    gpt-4o: {input_per_1m: -1}
    cheap: {input_per_1m: 0.1, output_per_1m: 0.2, context_window: 1000, max_output: 100,
            upstream: nowhere}
  policies:
    - name: p
      substitute: [gpt-4o]
      tiers: {simple: [gpt-4o-mini, not-a-model], tiny: [gpt-4o-mini]}
      max_cost_usd: {simple: -1}
  budgets:
    - {name: b, per: [planet]}
  retry:
    fallbacks: {"gpt-4o*": [deepseek-chat]}
  classifier_rules:
    - {tier: simple, when: {no_such_feature: true}}
""")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    text = "\n".join(err.value.problems)
    assert "routing.catalog.gpt-4o.input_per_1m: must be >= 0" in text
    assert "routing.catalog.cheap.upstream: no upstream named 'nowhere'" in text
    assert "routing.policies[0].tiers.simple[1]: model 'not-a-model' is not in the catalog" \
        in text
    assert "routing.policies[0].tiers.tiny: unknown tier" in text
    assert "routing.policies[0].max_cost_usd.simple: must be >= 0" in text
    assert "routing.budgets[0].per: unknown dimension 'planet'" in text
    assert "routing.budgets[0]: needs daily_usd or monthly_usd" in text
    assert "served by upstream 'deepseek', which is not configured" in text
    assert "routing.classifier_rules:" in text and "no_such_feature" in text


def test_a_valid_routing_config_loads(tmp_path: Any) -> None:
    path = _write(tmp_path, """
upstreams:
  deepseek: {base_url: "https://api.deepseek.com/v1", api_key: sk-ds}
routing:
  mode: dry_run
  policies:
    - name: team
      match: {namespace: "team-*"}
      substitute: ["gpt-4o*"]
      tiers: {simple: [deepseek-chat, gpt-4o-mini]}
  budgets:
    - {name: ns, per: [namespace], daily_usd: 5, on_hard: cheapest}
  retry:
    fallbacks: {"gpt-4o": [gpt-4o-mini, deepseek-chat]}
""")
    cfg = load_config(path, environ={})
    assert cfg.routing.mode == "dry_run"
    assert cfg.upstreams["deepseek"].base_url == "https://api.deepseek.com/v1"
    assert cfg.routing.policies[0].tiers["simple"] == ("deepseek-chat", "gpt-4o-mini")


# ------------------------------------------------------------------ router


def test_simple_request_moves_to_the_first_cheaper_fitting_candidate() -> None:
    decision = _router().decide(_chat(), ME)
    assert (decision.tier, decision.reason, decision.routed) == ("simple", "routed",
                                                                 "gpt-4.1-nano")
    assert decision.estimated_cost_usd is not None and decision.requested_cost_usd is not None
    assert decision.estimated_cost_usd < decision.requested_cost_usd


def test_complex_request_keeps_its_model() -> None:
    decision = _router().decide(_chat(
        "Think step by step and prove that the square root of 2 is irrational."), ME)
    assert decision.tier == "complex"
    assert decision.routed == "gpt-4o" and decision.reason == "no_candidate"


@pytest.mark.parametrize(("extra", "capability"), [
    ({"tools": TOOLS}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, "json_schema"),
    ({"temperature": 0.2}, "sampling"),
])
def test_candidates_lacking_a_capability_are_skipped(extra: dict[str, Any],
                                                     capability: str) -> None:
    catalog = build_catalog({"bare": ModelConfig(
        input_per_1m=0.01, output_per_1m=0.01, context_window=100_000, max_output=4096,
        capabilities=tuple(c for c in ("tools", "json_schema", "sampling")
                           if c != capability))})
    policy = RoutePolicyConfig(name="p", substitute=("gpt-4o",),
                               tiers={t: ("bare", "gpt-4o-mini")
                                      for t in ("simple", "standard", "complex")})
    router = Router(catalog, (policy,), Classifier(load_default_rules()), 512)
    decision = router.decide(_chat(**extra), ME)
    assert decision.routed == "gpt-4o-mini", decision
    plain = router.decide(_chat(), ME)
    assert plain.routed == "bare"


def test_vision_request_never_goes_to_a_text_only_model() -> None:
    policy = RoutePolicyConfig(name="p", substitute=("gpt-4o",),
                               tiers={t: ("o3-mini",) for t in ("simple", "standard",
                                                                "complex")})
    router = Router(CATALOG, (policy,), Classifier(load_default_rules()), 512)
    body = _req({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
    assert router.decide(body, ME).routed == "gpt-4o"


def test_context_and_output_limits_gate_candidates() -> None:
    small = build_catalog({"small": ModelConfig(
        input_per_1m=0.01, output_per_1m=0.01, context_window=4096, max_output=1024,
        capabilities=("tools", "sampling"))})
    policy = RoutePolicyConfig(name="p", substitute=("gpt-4o",),
                               tiers={t: ("small",) for t in ("simple", "standard",
                                                              "complex")})
    router = Router(small, (policy,), Classifier([{"tier": "simple"}]), 512)
    assert router.decide(_chat(), ME).routed == "small"
    assert router.decide(_chat("word " * 5000), ME).routed == "gpt-4o"  # ~6k tokens
    assert router.decide(_chat(max_completion_tokens=2000), ME).routed == "gpt-4o"


def test_cost_ceiling_per_tier() -> None:
    policy = RoutePolicyConfig(name="p", substitute=("gpt-4o",),
                               tiers={"simple": ("gpt-4o-mini",)},
                               max_cost_usd={"simple": 1e-9})
    router = Router(CATALOG, (policy,), Classifier(load_default_rules()), 512)
    assert router.decide(_chat(), ME).routed == "gpt-4o"


def test_policy_match_substitute_and_opt_out() -> None:
    scoped = RoutePolicyConfig(name="scoped", match=RouteMatchConfig(namespace="team-*",
                                                                     agent="batch-*"),
                               substitute=("gpt-4o",), tiers={"simple": ("gpt-4o-mini",)})
    router = _router(scoped)
    assert router.decide(_chat(), Identity("team-a", "t", "batch-7")).routed == "gpt-4o-mini"
    assert router.decide(_chat(), Identity("team-a", "t", "chat-1")).reason == "no_policy"
    assert router.decide(_chat(), Identity("team-a", "t", None)).reason == "no_policy"
    assert router.decide(_chat(), Identity("prod", "t", "batch-7")).reason == "no_policy"
    assert router.decide(_chat(model="o3"), Identity("team-a", "t", "batch-7")).reason \
        == "no_policy"
    assert router.decide(_chat(), Identity("team-a", "t", "batch-7"), opt_out=True).reason \
        == "opt_out"


def test_tier_header_overrides_the_classifier() -> None:
    router = _router()
    assert router.decide(_chat(), ME, "complex").routed == "gpt-4o"
    long_text = "Compare these two designs and explain the trade-offs. " * 3
    assert router.decide(_chat(long_text), ME, "simple").routed == "gpt-4.1-nano"


def test_budget_levels_shift_the_tier() -> None:
    router = _router()
    standard = _chat("Summarise this paragraph in two sentences: " + "The team met. " * 80)
    ok = router.decide(standard, ME)
    soft = router.decide(standard, ME, budget_level="soft")
    hard = router.decide(_chat("Think step by step and prove the theorem."), ME,
                         budget_level="hard")
    assert ok.tier == "standard" and ok.routed == "gpt-4o-mini"
    assert soft.tier == "simple" and soft.routed == "gpt-4.1-nano"
    assert hard.reason == "budget_cheapest" and hard.routed == "gpt-4.1-nano"


def test_embeddings_are_never_routed() -> None:
    body = _req({"model": "text-embedding-3-large", "input": "x"}, Endpoint.EMBEDDINGS)
    assert _router().decide(body, ME).reason == "not_routed_endpoint"


def test_conservative_preset_moves_only_simple_requests_within_a_family() -> None:
    router = Router(CATALOG, CONSERVATIVE, Classifier(load_default_rules()), 512)
    assert router.decide(_chat(), ME).routed == "gpt-4o-mini"
    assert router.decide(_chat(model="gpt-5"), ME).routed == "gpt-5-mini"
    assert router.decide(_chat(model="gpt-4o-mini"), ME).routed == "gpt-4o-mini"
    assert router.decide(_chat(tools=TOOLS, tool_choice="required"), ME).routed == "gpt-4o"
    summary = _chat("Summarise this paragraph in two sentences: " + "The team met. " * 80)
    assert router.decide(summary, ME).routed == "gpt-4o"  # standard: untouched


# ------------------------------------------------------------------ retry policy


def test_retry_after_headers_and_retryable_statuses() -> None:
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert [s for s in (400, 401, 404, 408, 422, 429, 500, 502, 503) if retryable_status(s)] \
        == [429, 500, 502, 503]


def test_attempts_retry_then_walk_the_chain() -> None:
    from proxy.config import RetryConfig
    policy = RetryPolicy(RetryConfig(max_retries=2, backoff_ms=100, max_backoff_ms=150,
                                     max_retry_after_s=5,
                                     fallbacks={"gpt-4o*": ("gpt-4o", "gpt-4o-mini",
                                                            "gpt-4.1-nano")}), CATALOG)
    attempts = policy.attempts("gpt-4o")
    first, second = attempts.next(), attempts.next(retry_after=1.5)
    assert first is not None and not first.fallback and 0.05 <= first.delay_s <= 0.1
    assert second is not None and second.delay_s == 1.5
    third = attempts.next()
    assert third is not None and third.fallback and third.model == "gpt-4o-mini"
    fourth = attempts.next()
    assert fourth is not None and fourth.model == "gpt-4.1-nano"
    assert attempts.next() is None
    # A retry-after longer than allowed skips straight to the chain.
    again = policy.attempts("gpt-4o")
    jump = again.next(retry_after=60)
    assert jump is not None and jump.fallback and jump.model == "gpt-4o-mini"
