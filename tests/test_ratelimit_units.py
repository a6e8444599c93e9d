"""The limiter's in-process parts: breaker, local buckets, policy, queue budget."""

from __future__ import annotations

from dataclasses import replace

from proxy.breaker import Breaker
from proxy.config import QuotaConfig, RateLimitConfig, RuleConfig
from proxy.ratelimit.limiter import LocalBuckets
from proxy.ratelimit.policy import KEY_TAG, Policy


def test_half_open_breaker_lets_one_trial_through_at_a_time() -> None:
    breaker = Breaker(failures=2, reset_s=0.0, trial_s=60.0)
    assert breaker.allow() and breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "closed"  # one failure is not enough
    breaker.failure()
    assert breaker.state == "half-open" and breaker.opened == 1  # reset_s 0: trial time
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # everyone else keeps to the fallback meanwhile
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_failed_trial_reopens_the_breaker() -> None:
    breaker = Breaker(failures=1, reset_s=0.0, trial_s=60.0)
    breaker.failure()
    assert breaker.allow()
    breaker.failure()  # the trial failed: open again (the same outage), a new trial later
    assert breaker.opened == 1 and breaker.state != "closed"
    assert breaker.allow()
    breaker.success()
    breaker.success()  # a call sent before the opening answering late changes nothing
    assert breaker.state == "closed" and breaker.opened == 1


def _policy(*rules: RuleConfig) -> Policy:
    return Policy(RateLimitConfig(rules=rules))


def test_policy_charges_only_matching_rules_with_one_bucket_per_scope() -> None:
    policy = _policy(
        RuleConfig(name="agent-rpm", per=("agent",), requests=QuotaConfig(amount=60)),
        RuleConfig(name="gpt4-tpm", match={"model": "gpt-4o*"}, tokens=QuotaConfig(amount=1000)),
        RuleConfig(name="inflight", per=("tenant",), concurrent=3))
    dims = {"namespace": "ns", "tenant": "t1", "agent": "a1", "model": "gpt-4o-mini"}
    charges = policy.charges(dims, tokens=77)
    assert [(c.rule.name, c.quota.kind, c.cost) for c in charges] == [
        ("agent-rpm", "requests", 1), ("gpt4-tpm", "tokens", 77), ("inflight", "concurrent", 1)]
    assert all(c.key.startswith(KEY_TAG) for c in charges)
    other = policy.charges({**dims, "agent": "a2", "model": "o3"}, tokens=77)
    assert [c.rule.name for c in other] == ["agent-rpm", "inflight"]
    assert other[0].key != charges[0].key  # another agent, another bucket
    assert other[1].key == charges[2].key  # same tenant, same slots


def test_local_slots_are_taken_released_and_all_or_nothing() -> None:
    policy = _policy(RuleConfig(name="inflight", concurrent=1),
                     RuleConfig(name="rpm", requests=QuotaConfig(amount=2, period="1h")))
    buckets = LocalBuckets(lease_ttl_s=60)
    charges = policy.charges({}, tokens=1)
    ok, states = buckets.apply(charges, lease="a")
    assert ok and [s.remaining for s in states] == [0, 1]
    ok, states = buckets.apply(charges, lease="b")
    assert not ok and states[0].retry_s > 0 and states[1].remaining == 1  # nothing taken
    release = [c for c in policy.charges({}, tokens=1) if c.quota.kind == "concurrent"]
    buckets.apply([replace(c, cost=-1) for c in release], force=True, lease="a")
    ok, states = buckets.apply(charges, lease="b")
    assert ok and [s.remaining for s in states] == [0, 0]


def test_local_lease_that_is_never_released_expires() -> None:
    policy = _policy(RuleConfig(name="inflight", concurrent=1))
    buckets = LocalBuckets(lease_ttl_s=0.0)  # every lease has lapsed by the next look
    charges = policy.charges({}, tokens=1)
    assert buckets.apply(charges, lease="lost")[0]
    assert buckets.apply(charges, lease="next")[0]
