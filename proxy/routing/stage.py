"""The route stage: budgets, model rewriting and pricing of every answer.

On the way in it checks the requester's budgets (one Redis round trip, only
when a budget covers them), denies at a hard limit or asks the router for a
model, and rewrites the request's ``model`` (or, in dry-run, only records
what it would have done). After the answer it prices what the upstream
really charged and adds it to the budgets.

Headers out: ``x-sidecar-model-requested`` and ``x-sidecar-model-routed``
(the model actually sent, after any fallback), ``x-sidecar-cost-usd`` (the
answer's cost from its usage; for a stream, whose headers leave before its
usage is known, the estimate, marked by ``x-sidecar-cost-basis: estimate``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from proxy.context import ATTRIBUTE_PREFIX, RequestContext, Stage
from proxy.routing.budget import BudgetBook, BudgetStatus, Scope
from proxy.routing.catalog import Catalog
from proxy.routing.policy import ROUTED, RouteDecision, Router
from proxy.wire import errors
from proxy.wire.headers import (
    COST_BASIS_HEADER,
    COST_HEADER,
    MODEL_REQUESTED_HEADER,
    MODEL_ROUTED_HEADER,
    header_value,
)

log = logging.getLogger("proxy.routing")

_ROUTE_OFF = "off"
CACHE_RESULT = ATTRIBUTE_PREFIX + "cache.result"


@dataclass(slots=True)
class RouteState:
    """What the route stage decided for one request, for its settle hook and telemetry."""

    decision: RouteDecision
    scopes: tuple[Scope, ...]
    budget: BudgetStatus | None
    applied: bool
    cost_usd: float | None = None


def budget_exceeded(status: BudgetStatus) -> web.Response:
    """429 for a request its budget no longer allows (retrying will not help)."""
    period = "today" if status.period == "day" else "this month"
    limit = f" of ${status.limit_usd:.2f}" if status.limit_usd is not None else ""
    return errors.error_response(
        429, f"Budget '{status.budget}' is spent for {period} (${status.spent_usd:.2f}"
        f"{limit}). Requests resume when the period ends or the budget is raised.",
        "insufficient_quota", "budget_exceeded", headers={"x-should-retry": "false"})


class RouteStage(Stage):
    """Budgets, routing and pricing (see the module docstring)."""

    name = "route"

    def __init__(self, catalog: Catalog, router: Router, budgets: BudgetBook | None,
                 *, dry_run: bool = False, route_header: str = "x-sidecar-route",
                 tier_header: str = "x-sidecar-tier") -> None:
        self.catalog = catalog
        self.router = router
        self.budgets = budgets
        self.dry_run = dry_run
        self.route_header = route_header
        self.tier_header = tier_header

    async def on_request(self, ctx: RequestContext) -> web.StreamResponse | None:
        canonical = ctx.canonical
        identity = ctx.identity
        if identity is None or not canonical.model:
            return None
        scopes: tuple[Scope, ...] = ()
        status: BudgetStatus | None = None
        if self.budgets is not None:
            scopes = self.budgets.scopes(identity)
            if scopes:
                status = await self.budgets.status(scopes)
                ctx.annotate("budget.level", status.level)
                if status.budget is not None:
                    ctx.annotate("budget.name", status.budget)
        level = status.level if status is not None else "ok"
        headers = ctx.request.headers
        opt_out = headers.get(self.route_header, "").strip().lower() == _ROUTE_OFF
        decision = self.router.decide(canonical, identity, headers.get(self.tier_header),
                                      opt_out=opt_out, budget_level=level)
        if status is not None and level == "hard" and (
                status.on_hard == "deny" or decision.reason != "budget_cheapest"):
            log.info("budget %s exhausted (%s); request denied", status.budget, status.period)
            ctx.route = RouteState(decision, scopes, status, applied=False)
            ctx.error_kind = "budget_exceeded"
            return budget_exceeded(status)
        applied = decision.rewritten and not self.dry_run
        ctx.route = RouteState(decision, scopes, status, applied)
        if decision.tier is not None:
            ctx.annotate("route.tier", decision.tier)
        ctx.annotate("route.reason", decision.reason)
        ctx.annotate("route.requested", header_value(decision.requested))
        if decision.rewritten:
            ctx.annotate("route.candidate", decision.routed)
            if self.dry_run:
                ctx.annotate("route.dry_run", True)
                log.info("dry run: would route %s to %s (tier %s, policy %s)",
                         decision.requested, decision.routed, decision.tier, decision.policy)
        spec = decision.spec if applied else self.catalog.get(decision.requested)
        if applied and spec is not None:
            canonical.set("model", spec.serves)
            ctx.upstream_name = spec.upstream
        ctx.response_headers[MODEL_REQUESTED_HEADER] = header_value(decision.requested)
        ctx.response_headers[MODEL_ROUTED_HEADER] = header_value(
            decision.routed if applied else decision.requested)
        if canonical.endpoint in ROUTED and canonical.stream:
            estimate = (decision.estimated_cost_usd if applied
                        else decision.requested_cost_usd)
            if estimate is not None:
                ctx.response_headers[COST_HEADER] = f"{estimate:.6f}"
                ctx.response_headers[COST_BASIS_HEADER] = "estimate"
        else:
            ctx.answer_hook = self._price_answer
        return None

    def _price_answer(self, ctx: RequestContext) -> None:
        cost = self._cost(ctx)
        if cost is not None:
            ctx.response_headers[COST_HEADER] = f"{cost:.6f}"
            ctx.response_headers[COST_BASIS_HEADER] = "usage"

    def _cost(self, ctx: RequestContext) -> float | None:
        state: RouteState | None = ctx.route
        if state is not None and state.cost_usd is not None:
            return state.cost_usd
        model = ctx.answered_by or ctx.canonical.model
        cost = self.catalog.cost(model, ctx.usage()) if ctx.status == 200 else None
        if state is not None:
            state.cost_usd = cost
        return cost

    async def on_settle(self, ctx: RequestContext) -> None:
        if ctx.status != 200:
            return
        state: RouteState | None = ctx.route
        if state is None:
            # Answered before routing: a cache hit saved what the answer cost.
            if ctx.attributes.get(CACHE_RESULT) == "hit":
                # Priced as the model that wrote the answer: a routed answer cached
                # under the requested model saved only the cheaper call.
                answered = ctx.summary().model
                model = (answered if answered and self.catalog.get(answered) is not None
                         else ctx.canonical.model)
                avoided = self.catalog.cost(model, ctx.usage())
                if avoided:
                    ctx.annotate("cost.saved_usd", round(avoided, 8))
                    ctx.annotate("cost.saved_by", "cache")
            return
        cost = self._cost(ctx)
        if cost is None:
            return
        ctx.annotate("cost_usd", round(cost, 8))
        requested = state.decision.requested
        answered = ctx.answered_by or ctx.canonical.model
        if state.applied and answered != requested:
            spec = self.catalog.get(requested)
            usage = ctx.usage()
            if spec is not None and usage is not None and (saved := spec.cost(usage) - cost) > 0:
                # The same tokens at the requested model's prices: an estimate, since
                # another model may have answered at another length.
                ctx.annotate("cost.saved_usd", round(saved, 8))
                ctx.annotate("cost.saved_by", "routing")
        if self.budgets is not None and state.scopes and cost > 0:
            await self.budgets.charge(state.scopes, cost)
