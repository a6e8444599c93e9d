"""A consecutive-failure circuit breaker in front of a Redis that may be slow or down.

Used by the limiter and the cache: while it is open they skip Redis and use
their fallback, so a dead Redis costs one timeout per request only until the
breaker opens, and nothing after. One log line per opening and per closing.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("proxy.redis")


class Breaker:
    """Consecutive-failure circuit breaker with a timed half-open trial."""

    def __init__(self, failures: int, reset_s: float, trial_s: float,
                 name: str = "rate limiter", fallback: str = "local fallback policy in force"
                 ) -> None:
        self.name = name
        self.fallback = fallback
        self.threshold = failures
        self.reset_s = reset_s
        self.trial_s = trial_s
        self.failures = 0
        self.open_until = 0.0
        self.opened = 0  # times it opened, for /status and logs
        self._trial_until = 0.0
        self._tripped = False  # opened and not yet closed by a success

    @property
    def state(self) -> str:
        """closed, open or half-open."""
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half-open"

    @property
    def state_code(self) -> int:
        """The state as a number for a gauge: 0 closed, 1 half-open, 2 open."""
        return {"closed": 0, "half-open": 1, "open": 2}[self.state]

    def allow(self) -> bool:
        """Whether to try Redis now (closed, or half-open: one trial after the wait)."""
        state = self.state
        if state != "half-open":
            return state == "closed"
        # One trial at a time, so a still-dead Redis costs one request its budget,
        # not every request that arrives meanwhile. A trial that never reports
        # back (its request was cancelled) expires.
        now = time.monotonic()
        if now < self._trial_until:
            return False
        self._trial_until = now + self.trial_s
        return True

    def success(self) -> None:
        # Calls sent before the breaker opened can succeed after it did: only the
        # first success after an opening closes it (and logs), not each of them.
        if self._tripped:
            log.warning("%s: Redis is back, breaker closed", self.name)
            self._tripped = False
        self.failures = 0
        self._trial_until = 0.0

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            if not self._tripped:
                self._tripped = True
                self.opened += 1
                log.warning("%s: Redis unavailable, breaker open for %.1fs (%s)",
                            self.name, self.reset_s, self.fallback)
            self.open_until = time.monotonic() + self.reset_s
            self._trial_until = 0.0
