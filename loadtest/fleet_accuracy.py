"""Rate-limit accuracy across replicas: N sidecar processes, one Redis, the openai SDK.

``.venv/bin/python -m loadtest.fleet_accuracy [--duration S] [--replicas N]``

What it measures: whether a fleet of sidecars sharing one Redis admits, in
total, no more than the configured limits allow, and how much of the allowance
it actually uses. The same workload is then run with local buckets (no
``redis_url``: every replica limits on its own), which shows the problem the
shared limiter solves: N replicas admit about N times the limit.

Setup, all on loopback:

- one mock OpenAI upstream (``loadtest.mock_upstream``) in this process, on its
  own event loop thread, so its request counter can be read directly;
- for the ``redis`` backend, one private ``redis-server`` on a free port
  (no persistence), never a shared instance;
- N real ``python -m proxy serve --port 0`` processes, configured by a YAML
  file named in ``SIDECAR_CONFIG``; each reports readiness with its
  "listening on" log line;
- driver threads using the official ``openai`` SDK (``max_retries=0``, so every
  429 is seen), each sending back to back, round-robin over the replicas,
  under one of a few agent ids (``x-agent-id``). They offer several times the
  limits.

Two rules, of different scope and kind:

- ``agent-rps``: requests per second, one bucket per agent. Half the threads
  speak for one busy agent (``hog``), so its bucket is the one that binds.
- ``fleet-tps``: tokens per second, one bucket for the whole fleet. Tokens are
  charged by estimate before the call (body bytes / 4 + max_tokens) and
  reconciled with the real usage afterwards; the figure compared with the
  allowance is the real usage of the admitted requests, taken from the
  responses.

The allowance of a bucket over the window is ``capacity + amount * window /
period``: GCRA (with Redis ``TIME`` as the one clock) guarantees that over any
interval containing all its decisions a bucket admits no more than that. The
window runs from the first request sent to the last answer received, which
contains every decision. For the token bucket the bound holds for real usage
too, because the estimate is never below the real usage here (the mock is asked
for exactly ``max_tokens`` output tokens, and the prompt estimate is above its
word count), so reconciliation only ever refunds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import openai
import orjson
import yaml

from loadtest.bench import free_port
from loadtest.loop_thread import LoopThread
from loadtest.mock_upstream import MockConfig, MockUpstream
from proxy.server import loop_factory

__all__ = [
    "Backend",
    "BucketResult",
    "FleetResult",
    "Scenario",
    "main",
    "render_report",
    "run_backends",
    "run_fleet",
    "start_redis",
    "start_sidecars",
]

Backend = Literal["redis", "local"]
T = TypeVar("T")

CHAT_KEY = "POST /v1/chat/completions"  # the mock's counter key for our requests
_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+/v1)")
_LOG_TAIL = 200  # lines of each child's log kept for error messages


@dataclasses.dataclass(frozen=True, slots=True)
class Scenario:
    """The workload and the limits it is measured against."""

    replicas: int = 4
    duration_s: float = 5.0
    threads: int = 16
    """Driver threads; the first half speak for the ``hog`` agent."""
    hog: str = "hog"
    others: tuple[str, ...] = ("planner", "coder", "critic")
    agent_rps: int = 10
    """``agent-rps``: requests per second per agent (capacity: one second's worth)."""
    fleet_tps: int = 1500
    """``fleet-tps``: tokens per second for the whole fleet (capacity: one second's worth)."""
    max_tokens: int = 48
    prompt: str = "Summarise the state of the fleet in one short line please"
    timeout_ms: float = 1000.0
    """Limiter's Redis budget. Generous: this measures the shared limiter, not the
    fallback (a 2-CPU box running N sidecars flat out misses 5 or 20 ms budgets
    often, and a replica on its fallback admits on top of Redis; REPORT-fleet.md)."""
    request_timeout_s: float = 30.0

    @property
    def agents(self) -> tuple[str, ...]:
        """Every agent id the workload uses."""
        return (self.hog, *self.others)

    def agent_of_thread(self, index: int) -> str:
        """The agent a driver thread speaks for: hog for the first half, then the others."""
        hog_threads = max(1, self.threads // 2)
        if index < hog_threads:
            return self.hog
        return self.others[(index - hog_threads) % len(self.others)]

    def rules(self) -> list[dict[str, Any]]:
        """The ``ratelimit.rules`` section of the sidecars' YAML config."""
        return [
            {"name": "agent-rps", "per": ["agent"],
             "requests": {"amount": self.agent_rps, "period": "1s"}},
            {"name": "fleet-tps",
             "tokens": {"amount": self.fleet_tps, "period": "1s"}},
        ]


@dataclasses.dataclass(frozen=True, slots=True)
class BucketResult:
    """One bucket over the window: what it admitted against what it allows."""

    rule: str
    kind: str
    """``requests`` (admitted = requests) or ``tokens`` (admitted = real usage tokens)."""
    bucket: str
    """``agent=<id>`` or ``fleet`` (one bucket shared by every request)."""
    admitted: int
    allowed: float
    denied: int
    """Requests this rule refused while this bucket was involved (429 naming the rule)."""

    @property
    def ratio(self) -> float:
        """admitted / allowed: above 1.0 the limit was exceeded."""
        return self.admitted / self.allowed if self.allowed else float("inf")


@dataclasses.dataclass(slots=True)
class FleetResult:
    """The outcome of one run against one backend."""

    backend: Backend
    replicas: int
    window_s: float
    sent: int
    admitted: int
    denied: int
    errors: int
    error_samples: list[str]
    upstream_requests: int
    """Chat requests the mock received during the run: must equal ``admitted``."""
    admitted_per_replica: list[int]
    decisions: dict[str, int]
    """Limiter decisions by backend (redis / local / open / closed), summed over
    the replicas' /status; any non-``redis`` one in a Redis run is the fallback."""
    breaker_opened: int
    """Times a replica's Redis circuit breaker opened, summed over the replicas."""
    buckets: list[BucketResult]

    def bucket(self, rule: str, bucket: str) -> BucketResult:
        """The result of one bucket, e.g. ``bucket("fleet-tps", "fleet")``."""
        for b in self.buckets:
            if b.rule == rule and b.bucket == bucket:
                return b
        raise KeyError(f"{rule}/{bucket}")

    @property
    def offered_rps(self) -> float:
        """Requests sent per second over the window."""
        return self.sent / self.window_s if self.window_s else 0.0


# ---------------------------------------------------------------- processes


def _drain(stream: Any, tail: collections.deque[str]) -> threading.Thread:
    """Keep reading a child's output so a full pipe never blocks it; keep the tail."""
    def run() -> None:
        for line in stream:
            tail.append(line)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class ChildProcess:
    """A child process that is ready once a given line appears in its output."""

    def __init__(self, name: str, argv: list[str], ready: re.Pattern[str],
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, env=env)
        self._ready = ready
        self._terminated = False
        self.match: re.Match[str] | None = None

    def wait_ready(self) -> re.Match[str]:
        """Block until the readiness line (the child's own signal: no polling)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if m := self._ready.search(line):
                self.match = m
                _drain(self.proc.stdout, self.log)
                return m
        self.proc.wait(10)
        raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was "
                           f"ready:\n{''.join(self.log)}")

    def terminate(self) -> None:
        """Send SIGTERM once (a second one could cut a sidecar's drain short)."""
        if not self._terminated and self.proc.poll() is None:
            self._terminated = True
            self.proc.terminate()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_redis(workdir: Path) -> tuple[ChildProcess, str]:
    """A private redis-server on a free loopback port, without persistence; returns its URL."""
    port = free_port()  # bind-and-release: redis-server binds it a moment later
    child = ChildProcess(
        "redis-server",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--loglevel", "notice"],
        re.compile(r"Ready to accept connections"))
    try:
        child.wait_ready()
    except BaseException:
        child.stop()
        raise
    return child, f"redis://127.0.0.1:{port}/0"


def _sidecar_env(config: Path) -> dict[str, str]:
    # Only our file configures the children: drop inherited SIDECAR_* overrides.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["SIDECAR_CONFIG"] = str(config)
    env["OTEL_SDK_DISABLED"] = "true"  # no collector here; keep export out of the figures
    return env


def start_sidecars(n: int, config: Path) -> list[ChildProcess]:
    """Start ``n`` sidecar processes at once, then wait for each one's "listening on" line."""
    children = [ChildProcess(f"sidecar-{i}",
                             [sys.executable, "-m", "proxy", "serve", "--port", "0"],
                             _LISTENING, env=_sidecar_env(config)) for i in range(n)]
    try:
        for child in children:
            child.wait_ready()
    except BaseException:
        stop_all(children)
        raise
    return children


def stop_all(children: list[ChildProcess], timeout_s: float = 15.0) -> None:
    """SIGTERM every child first, then wait for each: they drain in parallel."""
    for child in children:
        child.terminate()
    for child in children:
        child.stop(timeout_s)


@contextlib.contextmanager
def running_mock() -> Iterator[MockUpstream]:
    """The mock upstream on a loop thread; ``base_url`` is set while the context is open."""
    factory = loop_factory()
    lt = LoopThread(factory() if factory is not None else None)
    mock = MockUpstream(MockConfig())
    try:
        lt.call(mock.start())
        yield mock
    finally:
        lt.call(mock.stop())
        lt.close()
        lt.loop.close()


# ---------------------------------------------------------------- driving


@dataclasses.dataclass(slots=True)
class _Outcome:
    agent: str
    replica: int
    status: Literal["ok", "denied", "error"]
    tokens: int = 0
    rule: str | None = None
    detail: str | None = None


@dataclasses.dataclass(slots=True)
class _ThreadLog:
    outcomes: list[_Outcome] = dataclasses.field(default_factory=list)
    first_sent: float | None = None
    last_answered: float | None = None


def _drive(index: int, scenario: Scenario, clients: list[openai.OpenAI],
           start: threading.Barrier, deadline: list[float], log: _ThreadLog) -> None:
    """One driver thread: requests back to back until the deadline, rotating replicas."""
    agent = scenario.agent_of_thread(index)
    headers = {"x-agent-id": agent, "x-mock-tokens": str(scenario.max_tokens)}
    messages: list[Any] = [{"role": "user", "content": scenario.prompt}]
    n = len(clients)
    k = index  # threads start on different replicas, so load is even from the first request
    start.wait()
    end = deadline[0]
    while (now := time.monotonic()) < end:
        replica = k % n
        k += 1
        if log.first_sent is None:
            log.first_sent = now
        try:
            resp = clients[replica].chat.completions.create(
                model="gpt-4o", messages=messages, max_tokens=scenario.max_tokens,
                extra_headers=headers)
            usage = resp.usage
            if usage is None:
                log.outcomes.append(_Outcome(agent, replica, "error",
                                             detail="200 without usage"))
            else:
                log.outcomes.append(_Outcome(agent, replica, "ok", usage.total_tokens))
        except openai.RateLimitError as exc:
            rule = exc.response.headers.get("x-sidecar-ratelimit-rule")
            if rule is None:  # a 429 the sidecar did not make is not a limiter decision
                log.outcomes.append(_Outcome(agent, replica, "error",
                                             detail=f"429 without rule: {exc.message}"))
            else:
                log.outcomes.append(_Outcome(agent, replica, "denied", rule=rule))
        except openai.OpenAIError as exc:
            log.outcomes.append(_Outcome(agent, replica, "error",
                                         detail=f"{type(exc).__name__}: {exc}"))
        log.last_answered = time.monotonic()


def _status(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/status", timeout=10) as r:
        doc: dict[str, Any] = orjson.loads(r.read())
    return doc


def _limiter_details(base_url: str) -> tuple[dict[str, int], int]:
    """Decisions by backend and breaker openings, from one replica's /status.

    Read defensively: these are diagnostics, and a replica that does not report
    them must not fail the measurement.
    """
    try:
        details = _status(base_url)["components"]["ratelimit"]["details"]
        raw = details.get("decisions") or {}
        return {str(k): int(v) for k, v in raw.items()}, int(details.get("breaker_opened", 0))
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return {}, 0


def _config(scenario: Scenario, mock_url: str, redis_url: str | None) -> dict[str, Any]:
    ratelimit: dict[str, Any] = {"rules": scenario.rules(), "timeout_ms": scenario.timeout_ms}
    if redis_url is not None:
        ratelimit["redis_url"] = redis_url
        # If Redis were unreachable, each replica would keep only its share.
        ratelimit["local_share"] = 1 / scenario.replicas
    return {
        "server": {"shutdown_timeout_s": 2},
        "upstream": {"base_url": mock_url},
        "telemetry": {"enabled": False},
        "logging": {"level": "info"},  # "listening on" is an info line
        "ratelimit": ratelimit,
        "cache": {"enabled": False},  # repeated prompts must reach the limiter
    }


def run_fleet(backend: Backend, scenario: Scenario, mock: MockUpstream,
              workdir: Path) -> FleetResult:
    """Start the fleet for ``backend``, drive it for ``scenario.duration_s``, tear it down.

    ``mock`` must be running; its request counter is read before and after.
    """
    assert mock.base_url is not None
    with contextlib.ExitStack() as stack:
        redis_url = None
        if backend == "redis":
            redis, redis_url = start_redis(workdir)
            stack.callback(redis.stop)
        config = workdir / f"sidecar-{backend}.yaml"
        config.write_text(yaml.safe_dump(_config(scenario, mock.base_url, redis_url)),
                          encoding="utf-8")
        sidecars = start_sidecars(scenario.replicas, config)
        stack.callback(stop_all, sidecars)
        urls = [c.match.group(1) for c in sidecars if c.match is not None]
        clients = [openai.OpenAI(base_url=u, api_key="sk-fleet", max_retries=0,
                                 timeout=scenario.request_timeout_s) for u in urls]
        for c in clients:
            stack.callback(c.close)

        logs = [_ThreadLog() for _ in range(scenario.threads)]
        deadline = [0.0]

        def set_deadline() -> None:  # runs once, as every thread is released
            deadline[0] = time.monotonic() + scenario.duration_s

        barrier = threading.Barrier(scenario.threads, action=set_deadline)
        before = mock.stats.requests[CHAT_KEY]
        threads = [threading.Thread(target=_drive, name=f"driver-{i}",
                                    args=(i, scenario, clients, barrier, deadline, logs[i]))
                   for i in range(scenario.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        upstream = mock.stats.requests[CHAT_KEY] - before
        decisions: collections.Counter[str] = collections.Counter()
        breaker_opened = 0
        for u in urls:
            by_backend, opened = _limiter_details(u)
            decisions.update(by_backend)
            breaker_opened += opened
    return _summarise(backend, scenario, logs, upstream, dict(decisions), breaker_opened)


def _summarise(backend: Backend, scenario: Scenario, logs: list[_ThreadLog], upstream: int,
               decisions: dict[str, int], breaker_opened: int) -> FleetResult:
    outcomes = [o for log in logs for o in log.outcomes]
    firsts = [log.first_sent for log in logs if log.first_sent is not None]
    lasts = [log.last_answered for log in logs if log.last_answered is not None]
    window = max(lasts) - min(firsts) if firsts and lasts else 0.0
    ok = [o for o in outcomes if o.status == "ok"]
    denied = [o for o in outcomes if o.status == "denied"]
    errors = [o for o in outcomes if o.status == "error"]
    per_replica = [0] * scenario.replicas
    for o in ok:
        per_replica[o.replica] += 1

    # Both rules refill per second with one second's worth of capacity.
    def allowed(amount: int) -> float:
        return amount + amount * window

    buckets = [
        BucketResult("agent-rps", "requests", f"agent={agent}",
                     admitted=sum(1 for o in ok if o.agent == agent),
                     allowed=allowed(scenario.agent_rps),
                     denied=sum(1 for o in denied if o.agent == agent and o.rule == "agent-rps"))
        for agent in scenario.agents
    ]
    buckets.append(BucketResult("fleet-tps", "tokens", "fleet",
                                admitted=sum(o.tokens for o in ok),
                                allowed=allowed(scenario.fleet_tps),
                                denied=sum(1 for o in denied if o.rule == "fleet-tps")))
    return FleetResult(
        backend=backend, replicas=scenario.replicas, window_s=window, sent=len(outcomes),
        admitted=len(ok), denied=len(denied), errors=len(errors),
        error_samples=[o.detail or "" for o in errors[:5]], upstream_requests=upstream,
        admitted_per_replica=per_replica, decisions=decisions,
        breaker_opened=breaker_opened, buckets=buckets)


def run_backends(scenario: Scenario, backends: tuple[Backend, ...] = ("redis", "local"),
                 workdir: Path | None = None) -> dict[Backend, FleetResult]:
    """Run the scenario once per backend against one shared mock upstream."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
        mock = stack.enter_context(running_mock())
        return {b: run_fleet(b, scenario, mock, workdir) for b in backends}


# ---------------------------------------------------------------- report


def render_report(scenario: Scenario, results: dict[Backend, FleetResult]) -> str:
    """The results as markdown: one table of buckets per backend, then the totals."""
    lines: list[str] = [_describe(scenario), ""]
    for backend, r in results.items():
        title = ("shared Redis" if backend == "redis"
                 else "local buckets (no Redis, each replica limits alone)")
        lines += [
            f"### {backend}: {title}",
            "",
            f"{r.replicas} replicas, window {r.window_s:.2f} s, {r.sent} requests sent "
            f"({r.offered_rps:.0f}/s), {r.admitted} admitted, {r.denied} denied (429), "
            f"{r.errors} errors; the mock received {r.upstream_requests}.",
            f"Admitted per replica: {', '.join(map(str, r.admitted_per_replica))}. "
            f"Limiter decisions by backend: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r.decisions.items())) or 'n/a'}"
            f"; Redis breaker opened {r.breaker_opened} times.",
            "",
            "| rule | bucket | unit | admitted | allowed | admitted / allowed | denied by it |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for b in r.buckets:
            lines.append(f"| {b.rule} | {b.bucket} | {b.kind} | {b.admitted} | "
                         f"{b.allowed:.0f} | {b.ratio:.3f} | {b.denied} |")
        if r.error_samples:
            lines += ["", "Errors: " + "; ".join(r.error_samples)]
        lines.append("")
    return "\n".join(lines)


def _describe(scenario: Scenario) -> str:
    return (f"Rules: agent-rps = {scenario.agent_rps} requests/s per agent, fleet-tps = "
            f"{scenario.fleet_tps} tokens/s for the fleet (capacity: 1 s of each). "
            f"{scenario.threads} openai SDK threads ({max(1, scenario.threads // 2)} for "
            f"'{scenario.hog}', the rest for {', '.join(scenario.others)}), max_tokens "
            f"{scenario.max_tokens}, Redis budget {scenario.timeout_ms:g} ms. "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs.")


def main(argv: list[str] | None = None) -> int:
    """Run the measurement, print the markdown report; exit 1 if an invariant failed."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.fleet_accuracy",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    defaults = Scenario()
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of load per backend (default 20)")
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--timeout-ms", type=float, default=defaults.timeout_ms,
                        help="the limiter's Redis budget (ratelimit.timeout_ms)")
    parser.add_argument("--backend", choices=("redis", "local", "both"), default="both")
    args = parser.parse_args(argv)
    scenario = dataclasses.replace(defaults, duration_s=args.duration, replicas=args.replicas,
                                   threads=args.threads, timeout_ms=args.timeout_ms)
    chosen: tuple[Backend, ...] = ("redis", "local") if args.backend == "both" else (
        args.backend,)
    results = run_backends(scenario, chosen)
    print(render_report(scenario, results))
    failures = _check(results)
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def _check(results: dict[Backend, FleetResult]) -> list[str]:
    """The invariants the CLI checks (the test asserts more, on a shorter window)."""
    failures = []
    for backend, r in results.items():
        if r.errors:
            failures.append(f"{backend}: {r.errors} errors")
        if r.upstream_requests != r.admitted:
            failures.append(f"{backend}: mock saw {r.upstream_requests}, "
                            f"clients saw {r.admitted} admitted")
    redis = results.get("redis")
    if redis is not None:
        failures += [f"redis: {b.rule}/{b.bucket} admitted {b.admitted} > allowed "
                     f"{b.allowed:.0f}" for b in redis.buckets if b.admitted > b.allowed]
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
