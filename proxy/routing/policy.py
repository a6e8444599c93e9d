"""Cost policy: may this request's model be replaced by a cheaper one, and by which?

A decision needs four things, all computed once per request: the policy that
covers the requester (first match on namespace and agent), the request's tier
(classifier or ``x-sidecar-tier``), what the request uses (capabilities,
estimated input and output tokens), and the budget level. A candidate is
taken only if it is cheaper than the requested model for this request, has
every capability the request uses, fits its context and output limits, and
stays under the tier's cost ceiling; otherwise the requested model stands.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.config import TIERS, RoutePolicyConfig
from proxy.context import Identity
from proxy.routing.catalog import Catalog, ModelSpec
from proxy.routing.classifier import Classifier
from proxy.routing.features import Features, features_of
from proxy.wire.canonical import CanonicalRequest, Endpoint

# Only these endpoints are routed: an embedding from another model lives in
# another vector space, and legacy completions models are few.
ROUTED = frozenset({Endpoint.CHAT, Endpoint.RESPONSES})

# The shipped conservative preset: simple requests only, within a model family
# (same provider, same generation), never across reasoning and non-reasoning.
CONSERVATIVE = (
    RoutePolicyConfig(name="conservative:gpt-4o", substitute=("gpt-4o", "gpt-4o-20*"),
                      tiers={"simple": ("gpt-4o-mini",)}),
    RoutePolicyConfig(name="conservative:gpt-4.1", substitute=("gpt-4.1", "gpt-4.1-20*"),
                      tiers={"simple": ("gpt-4.1-mini",)}),
    RoutePolicyConfig(name="conservative:gpt-5", substitute=("gpt-5", "gpt-5-20*"),
                      tiers={"simple": ("gpt-5-mini",)}),
    RoutePolicyConfig(name="conservative:gpt-4-turbo", substitute=("gpt-4-turbo*",),
                      tiers={"simple": ("gpt-4o-mini",)}),
)


@dataclass(frozen=True, slots=True)
class Needs:
    """What a request uses, as the catalog describes models."""

    capabilities: frozenset[str]
    input_tokens: int
    output_tokens: int  # what the request allows (or the default), for estimates
    output_limit: int | None  # what it asked for explicitly


def needs_of(canonical: CanonicalRequest, features: Features,
             default_output_tokens: int) -> Needs:
    """The capabilities and token sizes a model must accommodate for this request."""
    body = canonical.body
    caps: set[str] = set()
    if features.has_tools:
        caps.add("tools")
        if body.get("parallel_tool_calls") is not None:
            caps.add("parallel_tool_calls")
    if features.has_images:
        caps.add("vision")
    if features.has_audio:
        caps.add("audio")
    if features.json_schema:
        caps.add("json_schema")
    if features.reasoning_requested:
        caps.add("reasoning")
    # Reasoning models refuse sampling parameters and the legacy max_tokens.
    if features.sampling_params or body.get("max_tokens") is not None:
        caps.add("sampling")
    limit = features.max_output_tokens
    return Needs(frozenset(caps), features.est_input_tokens,
                 limit if limit is not None else default_output_tokens, limit)


@dataclass(slots=True)
class RouteDecision:
    """The outcome for one request: the model to send and why."""

    requested: str
    routed: str
    reason: str  # routed | opt_out | no_policy | unknown_model
    #              | no_candidate | budget_cheapest | budget_no_candidate | not_routed_endpoint
    tier: str | None = None
    policy: str | None = None
    spec: ModelSpec | None = None  # of the routed model
    estimated_cost_usd: float | None = None
    requested_cost_usd: float | None = None

    @property
    def rewritten(self) -> bool:
        """Whether another model than the requested one was chosen."""
        return self.routed != self.requested


class _Policy:
    def __init__(self, cfg: RoutePolicyConfig, catalog: Catalog) -> None:
        self.name = cfg.name
        self.namespace = re.compile(fnmatch.translate(cfg.match.namespace))
        self.agent = re.compile(fnmatch.translate(cfg.match.agent))
        self.agent_any = cfg.match.agent == "*"
        self.substitute = re.compile("|".join(fnmatch.translate(g) for g in cfg.substitute)
                                     or r"(?!)")
        self.tiers: dict[str, tuple[ModelSpec, ...]] = {
            tier: tuple(s for m in cfg.tiers.get(tier, ()) if (s := catalog.get(m)) is not None)
            for tier in TIERS}
        self.ceilings = dict(cfg.max_cost_usd)
        everything = {s.name: s for specs in self.tiers.values() for s in specs}
        self.all_candidates = tuple(everything.values())

    def covers(self, identity: Identity) -> bool:
        if not self.namespace.match(identity.namespace):
            return False
        if identity.agent is None:
            return self.agent_any
        return self.agent.match(identity.agent) is not None


def _down(tier: str) -> str:
    i = TIERS.index(tier)
    return TIERS[max(0, i - 1)]


class Router:
    """Decides, per request, whether and where to move it (see the module docstring)."""

    def __init__(self, catalog: Catalog, policies: Sequence[RoutePolicyConfig],
                 classifier: Classifier, default_output_tokens: int) -> None:
        self.catalog = catalog
        self.classifier = classifier
        self.default_output_tokens = default_output_tokens
        self.policies = [_Policy(p, catalog) for p in policies]
        self._by_identity: dict[tuple[str, str | None, str], _Policy | None] = {}

    @property
    def active(self) -> bool:
        """Whether any policy can rewrite a model."""
        return bool(self.policies)

    def policy_for(self, identity: Identity, model: str) -> _Policy | None:
        """The first policy covering this namespace and agent that may replace ``model``.

        Policies are tried in order, so a narrow policy (one team, one model family)
        goes before a broad one; a policy that does not list the model leaves it to
        the next. Memoized per (namespace, agent, model).
        """
        key = (identity.namespace, identity.agent, model)
        try:
            return self._by_identity[key]
        except KeyError:
            pass
        found = next((p for p in self.policies
                      if p.covers(identity) and p.substitute.match(model)), None)
        if len(self._by_identity) > 4096:
            self._by_identity.clear()
        self._by_identity[key] = found
        return found

    def decide(self, canonical: CanonicalRequest, identity: Identity,
               tier_header: str | None = None, *, opt_out: bool = False,
               budget_level: str = "ok") -> RouteDecision:
        """Choose the model for this request; the requested one unless policy allows a cheaper."""
        requested = canonical.model
        if canonical.endpoint not in ROUTED:
            return RouteDecision(requested, requested, "not_routed_endpoint")
        if opt_out:
            return RouteDecision(requested, requested, "opt_out")
        policy = self.policy_for(identity, requested)
        if policy is None:
            return RouteDecision(requested, requested, "no_policy")
        spec = self.catalog.get(requested)
        if spec is None:
            return RouteDecision(requested, requested, "unknown_model", policy=policy.name)
        features = features_of(canonical.endpoint, canonical.body)
        tier, _ = self.classifier.classify(features, tier_header)
        needs = needs_of(canonical, features, self.default_output_tokens)
        base = self._estimate(spec, needs)
        decision = RouteDecision(requested, requested, "no_candidate", tier, policy.name, spec,
                                 base, base)
        if budget_level == "hard":
            # Only the cheapest tier's fare: the cheapest fitting candidate anywhere.
            fitting = [(self._estimate(c, needs), c) for c in policy.all_candidates
                       if self._fits(c, needs)]
            if not fitting:
                decision.reason = "budget_no_candidate"
                return decision
            cost, best = min(fitting, key=lambda pair: pair[0])
            if cost < base:
                self._take(decision, best, cost, "budget_cheapest")
            else:
                decision.reason = "budget_cheapest"  # the requested model is the cheapest
            return decision
        if budget_level == "soft":
            tier = _down(tier)
            decision.tier = tier
        ceiling = policy.ceilings.get(tier)
        for candidate in policy.tiers[tier]:
            if candidate.name == spec.name:
                break  # the list is in cost order: nothing after it is cheaper
            if not self._fits(candidate, needs):
                continue
            cost = self._estimate(candidate, needs)
            if cost >= base or (ceiling is not None and cost > ceiling):
                continue
            self._take(decision, candidate, cost, "routed")
            break
        return decision

    @staticmethod
    def _take(decision: RouteDecision, spec: ModelSpec, cost: float, reason: str) -> None:
        decision.routed = spec.name
        decision.spec = spec
        decision.estimated_cost_usd = cost
        decision.reason = reason

    @staticmethod
    def _fits(spec: ModelSpec, needs: Needs) -> bool:
        if not needs.capabilities <= spec.capabilities:
            return False
        if needs.output_limit is not None and needs.output_limit > spec.max_output:
            return False
        return needs.input_tokens + min(needs.output_tokens, spec.max_output) \
            <= spec.context_window

    @staticmethod
    def _estimate(spec: ModelSpec, needs: Needs) -> float:
        return spec.estimate(needs.input_tokens, min(needs.output_tokens, spec.max_output))


def describe(decision: RouteDecision) -> dict[str, Any]:
    """A decision as log/trace fields (no prompt content)."""
    return {"requested": decision.requested, "routed": decision.routed,
            "reason": decision.reason, "tier": decision.tier, "policy": decision.policy,
            "estimated_cost_usd": decision.estimated_cost_usd}
