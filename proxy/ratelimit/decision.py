"""What the limiter answers: per-bucket states and the decision over all of them."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.ratelimit.policy import Charge


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket after the decision."""

    remaining: int
    reset_s: float
    retry_s: float  # 0: admits; > 0: wait this long; < 0: never (cost > capacity)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome over all of a request's charges."""

    admitted: bool
    states: list[BucketState]
    backend: str  # redis | reserved | local | open | closed
    denied_by: Charge | None = None

    @property
    def never(self) -> bool:
        """Denied by a bucket that cannot ever hold this request."""
        return any(s.retry_s < 0 for s in self.states)

    @property
    def retry_s(self) -> float:
        """How long to wait before the request could be admitted."""
        return max((s.retry_s for s in self.states), default=0.0)
