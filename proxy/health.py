"""Component health registry behind /healthz, /readyz and /status.

Each component registers a check: an async callable returning a Health. Checks
run with a latency budget, so a hung dependency makes its own entry "down"
instead of hanging the probe. Only components registered as ``critical`` can
make /readyz fail; the rest show as degraded in /status with their reason.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


class State(enum.StrEnum):
    """A component's state, worst last."""

    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Health:
    """One check's verdict, with details safe to publish (no secrets)."""

    state: State
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


Check = Callable[[], Awaitable[Health]]


@dataclass(slots=True)
class _Component:
    check: Check
    critical: bool
    budget_s: float
    last: Health | None = None
    checked_at: float | None = None
    latency_ms: float | None = None


class HealthRegistry:
    """The components of one sidecar and their latest health."""

    def __init__(self) -> None:
        self._components: dict[str, _Component] = {}

    def register(self, name: str, check: Check, *, critical: bool = False,
                 budget_s: float = 0.25) -> None:
        """Add a component; ``critical`` ones decide readiness."""
        self._components[name] = _Component(check, critical, budget_s)

    async def _run(self, name: str, comp: _Component) -> None:
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(comp.check(), comp.budget_s)
        except TimeoutError:
            result = Health(State.DOWN, f"check exceeded its {comp.budget_s * 1000:.0f} ms budget")
        except Exception as exc:  # a failing check is a finding, not a crash
            result = Health(State.DOWN, f"check failed: {type(exc).__name__}")
        comp.last = result
        comp.checked_at = time.time()
        comp.latency_ms = (time.perf_counter() - started) * 1000

    async def check_all(self) -> None:
        """Run every check concurrently, each within its budget."""
        await asyncio.gather(*(self._run(n, c) for n, c in self._components.items()))

    def ready(self) -> tuple[bool, list[str]]:
        """Whether serving is possible, and the reasons it is not."""
        problems = [f"{name}: {c.last.reason}" for name, c in self._components.items()
                    if c.critical and c.last is not None and c.last.state is State.DOWN]
        return not problems, problems

    def degraded(self) -> dict[str, str]:
        """Components that work in a reduced way (still ready), with their reasons."""
        return {name: c.last.reason for name, c in self._components.items()
                if c.last is not None and c.last.state is State.DEGRADED}

    def snapshot(self) -> dict[str, Any]:
        """The /status document: overall state and one entry per component."""
        components: dict[str, Any] = {}
        worst = State.OK
        order = list(State)
        for name, c in self._components.items():
            last = c.last or Health(State.DOWN, "not checked yet")
            if order.index(last.state) > order.index(worst):
                worst = last.state
            components[name] = {
                "state": last.state.value,
                "critical": c.critical,
                "reason": last.reason,
                "details": last.details,
                "last_check": c.checked_at,
                "check_ms": None if c.latency_ms is None else round(c.latency_ms, 3),
            }
        return {"state": worst.value, "components": components}
