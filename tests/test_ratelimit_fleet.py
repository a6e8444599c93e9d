"""Rate-limit accuracy across replicas: 4 sidecar processes, one Redis, the openai SDK.

The workload and the bookkeeping live in ``loadtest.fleet_accuracy``; this
file runs it once per backend with a short window and checks the figures:

- shared Redis: no bucket admits more than ``capacity + amount * window /
  period``, and the buckets that bind still admit most of what they allow
  (a limiter that denied too much would pass the first check alone);
- local buckets: each replica admits the full limit on its own, so the fleet
  admits several times it. That is the problem the shared limiter solves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.fleet_accuracy import Backend, FleetResult, Scenario, render_report, run_backends

# Short enough for CI, long enough that the steady rate outweighs the
# one-second burst capacity in the allowance (a 3 s window: 3 of 4 parts).
SCENARIO = Scenario(replicas=4, duration_s=3.0)
GOOD_SHARE = 0.8  # binding buckets must admit at least this share of their allowance


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Backend, FleetResult]]:
    workdir: Path = tmp_path_factory.mktemp("fleet")
    yield run_backends(SCENARIO, ("redis", "local"), workdir)


def _report(results: dict[Backend, FleetResult]) -> str:
    # Every failure message carries the whole table: the figures explain it.
    return "\n" + render_report(SCENARIO, results)


@pytest.mark.parametrize("backend", ["redis", "local"])
def test_every_answer_is_200_or_429_and_upstream_saw_exactly_the_admitted(
        results: dict[Backend, FleetResult], backend: Backend) -> None:
    r = results[backend]
    assert r.errors == 0, _report(results)
    assert r.upstream_requests == r.admitted, _report(results)
    assert r.admitted + r.denied == r.sent
    # Round-robin spreads the work: every replica admitted some.
    assert all(n > 0 for n in r.admitted_per_replica), _report(results)


def test_shared_redis_keeps_every_bucket_within_its_allowance(
        results: dict[Backend, FleetResult]) -> None:
    r = results["redis"]
    # Every decision came from Redis: the local fallback, which is not exact by
    # design, played no part in these figures.
    assert set(r.decisions) <= {"redis"} and r.decisions.get("redis") == r.sent, \
        _report(results)
    over = [b for b in r.buckets if b.admitted > b.allowed]
    assert not over, _report(results)


def test_shared_redis_admits_most_of_what_binding_buckets_allow(
        results: dict[Backend, FleetResult]) -> None:
    r = results["redis"]
    # The load is a multiple of the limits, or the figures below prove nothing.
    assert r.denied > 2 * r.admitted, _report(results)
    # The fleet token bucket limits the fleet; hog's own bucket limits hog.
    fleet = r.bucket("fleet-tps", "fleet")
    hog = r.bucket("agent-rps", f"agent={SCENARIO.hog}")
    assert fleet.ratio >= GOOD_SHARE and fleet.denied > 0, _report(results)
    assert hog.ratio >= GOOD_SHARE and hog.denied > 0, _report(results)


def test_local_buckets_let_the_fleet_admit_several_times_the_limit(
        results: dict[Backend, FleetResult]) -> None:
    # The problem Redis solves: 4 replicas, each with its own full buckets.
    r = results["local"]
    assert r.bucket("fleet-tps", "fleet").ratio > 2, _report(results)
    assert r.bucket("agent-rps", f"agent={SCENARIO.hog}").ratio > 2, _report(results)
    assert r.admitted > 2 * results["redis"].admitted, _report(results)
