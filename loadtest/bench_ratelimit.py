"""Latency the rate limiter adds to requests through the sidecar, with Redis on loopback.

``.venv/bin/python -m loadtest.bench_ratelimit [--quick] [--reserve-share X] [--out FILE]``

Three targets answer the same pre-serialised ~1 KB chat completion, sent with
a few distinct ``x-agent-id`` values in turn:

``direct``           client -> mock upstream
``sidecar-nolimit``  client -> llm-sidecar without rules -> mock
``sidecar-limit``    the same sidecar configuration plus three rules that all
                     apply to every request (a requests quota per agent, a
                     tokens quota per namespace for ``gpt-4o*``, a global
                     tokens quota), with ``redis_url`` naming a private Redis

The quotas are so large that every request is admitted: this measures what a
decision costs, not what a denial looks like. sidecar-limit runs with the
sidecar's default ``reserve_share`` (reservations: most decisions spend a
block already charged in Redis) unless ``--reserve-share`` says otherwise;
``--reserve-share 0`` makes every request ask Redis. Everything else comes from
``loadtest.bench``: servers pinned to one CPU and the generator to the other,
short blocks rotating between the targets round after round, open-loop
latency measured from each request's intended send time, CPU per request
from ``/proc/PID/task/*/schedstat``, and a bootstrap interval for the
difference of two percentiles from the same run.

Scenarios: open loop at 500 and 1000 req/s, the issue's rates, and 200 req/s
for context (added latency = percentile(sidecar-limit) -
percentile(sidecar-nolimit)); a closed loop (throughput ratio and CPU per
request); proof from the limit sidecar's ``/status`` that every decision went
to Redis (the run exits 1 if not); one decision timed alone through the
sidecar's own Policy and Limiter; and the Lua script's own throughput on the
same Redis (``loadtest.bench_lua``). The redis-server is our own, on a free
loopback port without persistence, stopped at the end; the shared
127.0.0.1:6379 is never touched. Results go to a markdown report and a raw
JSON file in ``loadtest/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import redis
import yaml

from loadtest import bench_lua
from loadtest.bench import (
    BOOTSTRAP_RESAMPLES,
    HOST,
    RESULTS_DIR,
    ROOT,
    Check,
    CpuMeter,
    Plan,
    Results,
    Server,
    Target,
    TargetRun,
    _errors_text,
    _f,
    _interval,
    _range,
    _signed,
    _table,
    added,
    bootstrap_added,
    build_request,
    chat_body,
    closed_loop,
    cpu_ms_per_request,
    errors_by_scenario,
    free_port,
    git_revision,
    machine_info,
    open_loop,
    per_round_added,
    prepare_run,
    process_cpu_s,
    raise_interrupt,
    requests_sent,
    self_cpu_s,
    sidecar_command,
    start_mock,
    start_server,
    stop_server,
    summarize,
)
from proxy.config import ConfigError, RateLimitConfig, load_config
from proxy.ratelimit.limiter import Limiter
from proxy.ratelimit.policy import Policy
from proxy.server import loop_factory

LIMIT = "sidecar-limit"
NOLIMIT = "sidecar-nolimit"
NAMESPACE = "bench"
AGENTS = ("agent-planner", "agent-coder", "agent-reviewer", "agent-tester")
KEY_TAG = "{llm-sidecar:rl}"

# Targets stated by the issue: the latency one at these rates only.
MAX_LIMIT_ADDED_P99_MS = 0.5
TARGET_RATES = (500, 1000)
MIN_SCRIPT_DECISIONS_S = 20_000
SCRIPT_BUCKETS = (1, 3)
# A lower rate, for context: the decision's cost before the server core gets busy.
CONTEXT_RATE = 200

# Metered idle time after each sidecar-limit block: its settle worker charges
# the real token usage to Redis after each answer, and may still be catching up
# when the block's last answer is in. This keeps that work (sidecar and Redis
# CPU) on sidecar-limit's account instead of slowing the next target's block;
# the report shows how much CPU sidecar-limit still used in others' blocks.
LIMIT_SETTLE_S = 0.25
# Decisions timed one after another through the sidecar's own Policy and Limiter.
DECISION_CALLS = 3000
# Other processes using more than this share of a core (or the hypervisor
# stealing more than STEAL_NOISY) during the load phase make the run "noisy".
FOREIGN_NOISY = 0.10
STEAL_NOISY = 0.02
# Server core demand from which queueing for CPU dominates open-loop latency.
NEAR_SATURATION = 0.9

# Quotas far above anything the benchmark can send (the closed loop peaks at a
# few thousand requests and a few million tokens per second), so every request
# is admitted and all three buckets are charged.
RULES: tuple[dict[str, Any], ...] = (
    {"name": "agent-rpm", "per": ["agent"],
     "requests": {"amount": 1_000_000_000, "period": "1m"}},
    {"name": "ns-gpt4o-tpm", "match": {"model": "gpt-4o*"}, "per": ["namespace"],
     "tokens": {"amount": 1_000_000_000_000, "period": "1m"}},
    {"name": "global-tpm", "tokens": {"amount": 10_000_000_000_000, "period": "1m"}},
)


@dataclass(frozen=True, slots=True)
class RateLimitPlan:
    """The load plan (shared with ``loadtest.bench``) plus the script benchmark's size."""

    load: Plan
    context_requests: int
    """Open-loop requests per target at CONTEXT_RATE (``load.open_requests`` at the others)."""
    script_requests: int
    """EVALSHA calls per redis-benchmark run."""
    script_repeats: int
    """redis-benchmark runs per (buckets, outcome), round-robin."""


FULL = RateLimitPlan(
    Plan("full", open_requests=15_000, min_rounds=10, min_block_s=0.5, max_block_s=1.0,
         warmup_s=0.4, ttfc_requests=0, closed_block_s=2.0, closed_rounds=5, profile_s=0.0,
         rates=(CONTEXT_RATE, *TARGET_RATES)),
    context_requests=5000, script_requests=200_000, script_repeats=3)
QUICK = RateLimitPlan(
    Plan("quick", open_requests=1500, min_rounds=3, min_block_s=0.5, max_block_s=0.5,
         warmup_s=0.2, ttfc_requests=0, closed_block_s=1.0, closed_rounds=2, profile_s=0.0,
         rates=(CONTEXT_RATE, *TARGET_RATES)),
    context_requests=600, script_requests=30_000, script_repeats=1)


# ---------------------------------------------------------------------------
# Servers


def sidecar_config(redis_url: str, limited: bool,
                   reserve_share: float | None = None) -> dict[str, Any]:
    """The YAML document of one sidecar: identical but for the rules (and reservations)."""
    ratelimit: dict[str, Any] = {"redis_url": redis_url}
    if limited:
        ratelimit["rules"] = [dict(rule) for rule in RULES]
        if reserve_share is not None:
            ratelimit["reserve_share"] = reserve_share
    # Cache off: the requests repeat, and hits would skip the limiter.
    return {"identity": {"namespace": NAMESPACE}, "ratelimit": ratelimit,
            "cache": {"enabled": False}}


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as YAML and validate it with the sidecar's own loader."""
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        # An empty environment: only the file is checked, not this shell's SIDECAR_*.
        load_config(path, environ={})
    except ConfigError as exc:
        raise SystemExit(f"benchmark config {path} is invalid:\n{exc}") from None
    return path


def sidecar_env(config: Path) -> dict[str, str]:
    """The sidecars' environment: this one minus OTEL_*, SIDECAR_* and the key, plus ``config``.

    Nothing inherited may change what is measured; telemetry stays at its
    default (no exporter configured), as in ``loadtest.bench``.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "SIDECAR_")) and k != "OPENAI_API_KEY"}
    env.update(SIDECAR_CONFIG=str(config), SIDECAR_LOGGING__LEVEL="warning",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return env


def start_sidecars(log_dir: Path, cpu: int | None, redis_url: str,
                   reserve_share: float | None) -> dict[str, Server]:
    """Start mock, sidecar-nolimit and sidecar-limit on ``cpu`` (stops them on failure)."""
    servers: dict[str, Server] = {}
    try:
        servers["mock"] = start_mock(log_dir, cpu)
        upstream = f"http://{HOST}:{servers['mock'].port}/v1"
        for name, limited in ((NOLIMIT, False), (LIMIT, True)):
            config = write_config(log_dir / f"{name}.yaml", sidecar_config(redis_url, limited,
                                                                      reserve_share))
            port = free_port()
            servers[name] = start_server(name, sidecar_command(port, upstream), port, "/readyz",
                                         log_dir, cpu, sidecar_env(config))
    except BaseException:
        for server in servers.values():
            stop_server(server)
        raise
    return servers


# ---------------------------------------------------------------------------
# Proof that the limiter decided in Redis


class LimiterFellBack(RuntimeError):
    """The limit sidecar decided without Redis: its latency would not be the one asked for."""


def _opener() -> urllib.request.OpenerDirector:
    # Never through an HTTP proxy from the environment: loopback only.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def limiter_details(port: int) -> dict[str, Any]:
    """The ``ratelimit`` component of the sidecar's ``/status`` (state, reason, details)."""
    with _opener().open(f"http://{HOST}:{port}/status", timeout=5.0) as resp:
        doc = orjson.loads(resp.read())
    component = doc.get("components", {}).get("ratelimit")
    if component is None:
        raise LimiterFellBack(f"/status of port {port} has no ratelimit component: {doc}")
    return cast(dict[str, Any], component)


def probe(port: int, client: redis.Redis) -> dict[str, Any]:
    """One request per agent through sidecar-limit; its headers and the Redis keys it left.

    GCRA keys expire about a second after their bucket is full again (at
    once, with these quotas), so the keys are listed right after the probe.
    """
    body = chat_body(stream=False)
    headers: dict[str, str] = {}
    for agent in AGENTS:
        req = urllib.request.Request(
            f"http://{HOST}:{port}/v1/chat/completions", data=body, method="POST",
            headers={"Authorization": "Bearer sk-bench", "Content-Type": "application/json",
                     "x-agent-id": agent})
        try:
            with _opener().open(req, timeout=5.0) as resp:
                resp.read()
                headers = {k.lower(): v for k, v in resp.headers.items()
                           if k.lower().startswith("x-ratelimit-")}
        except urllib.error.HTTPError as exc:
            raise LimiterFellBack(f"probe request for {agent} answered {exc.code}: "
                                  f"{exc.read()[:500]!r}") from None
    keys = sorted(k.decode() for k in client.scan_iter(match=f"{KEY_TAG}*", count=1000))
    by_rule: dict[str, int] = {}
    for key in keys:
        # {llm-sidecar:rl}:RULE:KIND:SCOPE; anything else is shown whole.
        parts = key.removeprefix(KEY_TAG + ":").split(":")
        label = ":".join(parts[:2]) if len(parts) >= 3 else key
        by_rule[label] = by_rule.get(label, 0) + 1
    return {"requests": len(AGENTS), "headers": headers, "keys_by_rule": by_rule}


def redis_stats(client: redis.Redis) -> dict[str, Any]:
    """Script calls Redis counted since the last CONFIG RESETSTAT, and its CPU so far."""
    cmd: dict[str, Any] = client.info("commandstats")
    cpu: dict[str, Any] = client.info("cpu")
    evalsha = dict(cmd.get("cmdstat_evalsha", {}))
    return {"evalsha_calls": int(evalsha.get("calls", 0)),
            "evalsha_usec_per_call": float(evalsha.get("usec_per_call", math.nan)),
            "evalsha_failed": int(evalsha.get("failed_calls", 0))
            + int(evalsha.get("rejected_calls", 0)),
            "used_cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])}


def verify_redis_decisions(details: dict[str, Any], expected: int) -> list[str]:
    """Every way the limit sidecar's decisions could have bypassed Redis, as messages."""
    problems = []
    d = details.get("details", {})
    decisions: dict[str, int] = d.get("decisions", {})
    if d.get("backend") != "redis":
        problems.append(f"limiter backend is {d.get('backend')!r}, not 'redis'")
    # "reserved": spent from a block the script charged in Redis beforehand.
    shared = ("redis", "reserved")
    other = {k: v for k, v in decisions.items() if k not in shared and v}
    if other:
        problems.append(f"decisions not made in Redis: {other}")
    if d.get("breaker_opened"):
        problems.append(f"the Redis circuit breaker opened {d['breaker_opened']} time(s)")
    made = sum(decisions.get(k, 0) for k in shared)
    if made != expected:
        problems.append(f"{made} Redis decisions (own call or reserved block) for {expected} "
                        "requests sent to sidecar-limit")
    return problems


# ---------------------------------------------------------------------------
# Noise: what else ran on the two cores


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def core_times(cpus: Sequence[int]) -> dict[int, tuple[float, float]]:
    """(busy s, stolen s) so far per CPU, from /proc/stat (clock ticks)."""
    out: dict[int, tuple[float, float]] = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            out[int(name[3:])] = ((user + nice + system + irq + softirq) / _CLK_TCK,
                                  steal / _CLK_TCK)
    return out


@dataclass(slots=True)
class NoiseMeter:
    """Busy time of the generator and server cores, minus our own processes' CPU."""

    gen_cpu: int | None
    srv_cpu: int | None
    server_pids: list[int]
    t0: float = 0.0
    cores0: dict[int, tuple[float, float]] = field(default_factory=dict)
    ours0: tuple[float, float] = (0.0, 0.0)

    def _ours(self) -> tuple[float, float]:
        return self_cpu_s(), sum(process_cpu_s(pid) for pid in self.server_pids)

    def start(self) -> None:
        """Snapshot now."""
        self.t0 = time.perf_counter()
        self.cores0 = core_times(self._cpus())
        self.ours0 = self._ours()

    def _cpus(self) -> list[int]:
        return [c for c in (self.gen_cpu, self.srv_cpu) if c is not None]

    def stop(self) -> dict[str, Any]:
        """Per core since ``start``: busy, ours, foreign (busy - ours) and steal, in cores."""
        wall = time.perf_counter() - self.t0
        cores = core_times(self._cpus())
        ours = self._ours()
        doc: dict[str, Any] = {"wall_s": wall}
        for role, cpu, i in (("generator", self.gen_cpu, 0), ("server", self.srv_cpu, 1)):
            if cpu is None or cpu not in cores:
                continue
            busy = (cores[cpu][0] - self.cores0[cpu][0]) / wall
            mine = (ours[i] - self.ours0[i]) / wall
            doc[role] = {"cpu": cpu, "busy": busy, "ours": mine,
                         "foreign": max(0.0, busy - mine),
                         "steal": (cores[cpu][1] - self.cores0[cpu][1]) / wall}
        doc["noisy"] = any(doc[r]["foreign"] > FOREIGN_NOISY or doc[r]["steal"] > STEAL_NOISY
                           for r in ("generator", "server") if r in doc)
        return doc


# ---------------------------------------------------------------------------
# The run


@dataclass(slots=True)
class RateLimitResults(Results):
    """Results plus the limit - nolimit statistics, the Redis proof and the script rows."""

    rates: dict[int, dict[str, Any]] = field(default_factory=dict)
    script: list[bench_lua.ScriptRow] = field(default_factory=list)
    script_plan: tuple[int, int] = (0, 0)
    """(calls per redis-benchmark run, repetitions)."""
    requests_by_rate: dict[int, int] = field(default_factory=dict)
    decisions: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per scenario (warm-up included): sidecar-limit's decisions by backend, breaker openings."""
    decision: dict[str, Any] = field(default_factory=dict)
    """The sidecar's Policy + Limiter timed alone (``decision_cost``), or why not."""
    limiter: dict[str, Any] = field(default_factory=dict)
    """sidecar-limit's /status ratelimit component at the end."""
    expected_decisions: int = 0
    fallback: list[str] = field(default_factory=list)
    """Why the limiter's decisions cannot all have come from Redis (empty: they did)."""
    redis: dict[str, Any] = field(default_factory=dict)
    probes: list[dict[str, Any]] = field(default_factory=list)
    noise: dict[str, Any] = field(default_factory=dict)
    limit_runs: dict[str, dict[str, TargetRun]] = field(default_factory=dict)
    """Raw runs by scenario, kept for the statistics computed after the servers stop."""
    reserve_share: float | None = None
    """sidecar-limit's ``ratelimit.reserve_share`` (None: the sidecar's default)."""


def _record(r: RateLimitResults, key: str, runs: dict[str, TargetRun], blocks: int
            ) -> dict[str, dict[str, Any]]:
    """Summaries of one scenario (raw samples kept in ``r``); ``blocks`` metered per target."""
    r.limit_runs[key] = runs
    r.raw[key] = {name: {"latencies_ms": [round(x, 4) for x in run.latencies_ms],
                         "overhead_ms": run.overhead_ms, "block_ends": run.block_ends}
                  for name, run in runs.items()}
    docs = {}
    for name, run in runs.items():
        doc = summarize(run, None if name == "direct" else name)
        doc["redis_cpu_ms_per_req"] = cpu_ms_per_request(run, "redis")
        # Wall time of the blocks themselves, without sidecar-limit's metered settle pauses.
        doc["block_s"] = run.wall_s - (blocks * LIMIT_SETTLE_S if name == LIMIT else 0.0)
        docs[name] = doc
    return docs


def decisions_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Decisions by backend, and breaker openings, between two /status snapshots."""
    b, a = before.get("details", {}), after.get("details", {})
    out = {k: v - b.get("decisions", {}).get(k, 0) for k, v in a.get("decisions", {}).items()}
    out["breaker_opened"] = a.get("breaker_opened", 0) - b.get("breaker_opened", 0)
    return {k: v for k, v in out.items() if v}


def requests_at(rplan: RateLimitPlan, rate: int) -> int:
    """Open-loop requests per target at ``rate``."""
    return rplan.context_requests if rate == CONTEXT_RATE else rplan.load.open_requests


async def run_scenarios(r: RateLimitResults, servers: dict[str, Server],
                        rplan: RateLimitPlan) -> int:
    """Open loop per rate and the closed loop; returns the requests sent to sidecar-limit."""
    targets = [Target("direct", servers["mock"].port, None),
               Target(NOLIMIT, servers[NOLIMIT].port, NOLIMIT),
               Target(LIMIT, servers[LIMIT].port, LIMIT)]
    meter = CpuMeter(servers)
    body = chat_body(stream=False)
    # Every target gets the same requests, one per agent id in turn.
    payloads = {t.name: tuple(build_request(t.port, body, {"x-agent-id": agent})
                              for agent in AGENTS) for t in targets}
    r.machine["request_body_bytes"] = len(body)
    settle_s = {LIMIT: LIMIT_SETTLE_S}
    plan = rplan.load
    port = servers[LIMIT].port
    sent = 0
    # /status between scenarios (never during a block) says where any fallback happened.
    status = limiter_details(port)
    for rate in plan.rates:
        warm: dict[str, TargetRun] = {}
        runs = await open_loop(targets, payloads, meter, plan, rate, requests_at(rplan, rate),
                               False, f"open loop {rate} req/s", settle_s, warm)
        sent += requests_sent(runs[LIMIT], warm[LIMIT])
        r.open_loop[rate] = _record(r, f"open_{rate}", runs, len(runs[LIMIT].block_ends))
        status, before = limiter_details(port), status
        r.decisions[f"open {rate}"] = decisions_delta(before, status)
    warm = {}
    runs = await closed_loop(targets, payloads, meter, plan, settle_s, warm)
    sent += requests_sent(runs[LIMIT], warm[LIMIT])
    r.closed_loop = _record(r, "closed", runs, plan.closed_rounds)
    r.decisions["closed"] = decisions_delta(status, limiter_details(port))
    return sent


async def decision_cost(config: Path, calls: int) -> dict[str, Any]:
    """CPU and wall time of one decision through the sidecar's own limiter, without HTTP.

    ``Policy.charges`` then ``Limiter.decide`` (whatever Redis client the
    limiter uses), one call after another on this (generator) process's event
    loop, with sidecar-limit's ``config`` and Redis on the other core. These are
    the sidecar's internals, which change: if their interface no longer fits,
    the reason is reported instead of failing the whole run.
    """
    try:
        cfg = load_config(config, environ={}).ratelimit
        policy, limiter = Policy(cfg), Limiter(cfg)
        await limiter.start()
        try:
            body_tokens = len(chat_body(stream=False)) // 4 + cfg.default_max_tokens
            charges = [policy.charges({"namespace": NAMESPACE, "tenant": "bench",
                                       "agent": agent, "model": "gpt-4o-mini"}, body_tokens)
                       for agent in AGENTS]
            for i in range(200):  # connection, caches and the script warm
                await limiter.decide(charges[i % len(charges)])
            cpu0, t0 = self_cpu_s(), time.perf_counter()
            for i in range(calls):
                await limiter.decide(policy.charges(
                    {"namespace": NAMESPACE, "tenant": "bench",
                     "agent": AGENTS[i % len(AGENTS)], "model": "gpt-4o-mini"}, body_tokens))
            cpu1, t1 = self_cpu_s(), time.perf_counter()
            backends = dict(limiter.decisions)
        finally:
            await limiter.close()
    except Exception as exc:  # a diagnostic: never lose the run's report over it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"calls": calls, "cpu_us_per_call": (cpu1 - cpu0) * 1e6 / calls,
            "wall_us_per_call": (t1 - t0) * 1e6 / calls, "backends": backends,
            "buckets": len(charges[0])}


def rate_stats(runs: dict[str, TargetRun]) -> dict[str, Any]:
    """limit - nolimit per interleaving round and bootstrapped, at one rate."""
    on, off = runs[LIMIT], runs[NOLIMIT]
    return {"rounds_added_ms": {"p50": per_round_added(on, off, 50),
                                "p99": per_round_added(on, off, 99)},
            "bootstrap_95_ms": bootstrap_added(on.latencies_ms, off.latencies_ms, (50, 99))}


def measure_sidecars(r: RateLimitResults, rplan: RateLimitPlan, redis_server: Server,
                     cpus: tuple[int | None, int | None], out_dir: Path) -> None:
    """Start mock and sidecars beside ``redis_server``, probe, load, probe; stop them."""
    gen_cpu, srv_cpu = cpus
    client = redis.Redis(host=HOST, port=redis_server.port)
    servers = start_sidecars(out_dir, srv_cpu, f"redis://{HOST}:{redis_server.port}/0",
                             r.reserve_share)
    servers["redis"] = redis_server
    try:
        print(f"servers up (logs in {out_dir.relative_to(ROOT)}); {r.pinning}; "
              f"private Redis on port {redis_server.port}", flush=True)
        client.config_resetstat()
        # Fail fast: a limiter that cannot reach Redis would make the whole run moot.
        r.probes.append(probe(servers[LIMIT].port, client))
        problems = verify_redis_decisions(limiter_details(servers[LIMIT].port), len(AGENTS))
        if problems:
            raise LimiterFellBack("before the load: " + "; ".join(problems))
        noise = NoiseMeter(gen_cpu, srv_cpu, [s.pid for s in servers.values()])
        cpu0 = redis_stats(client)["used_cpu_s"]
        noise.start()
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            sent = runner.run(run_scenarios(r, servers, rplan))
        r.noise = noise.stop()
        r.probes.append(probe(servers[LIMIT].port, client))
        r.limiter = limiter_details(servers[LIMIT].port)
        r.redis = redis_stats(client)
        r.redis["used_cpu_s"] -= cpu0
        r.expected_decisions = sent + 2 * len(AGENTS)
        r.fallback = verify_redis_decisions(r.limiter, r.expected_decisions)
        if r.redis["evalsha_failed"]:
            r.fallback.append(f"{r.redis['evalsha_failed']} script calls failed in Redis")
    finally:
        client.close()
        for name, server in servers.items():
            if name != "redis":  # the caller's, and still needed
                stop_server(server)


def run_benchmark(rplan: RateLimitPlan, command: str,
                  reserve_share: float | None = None) -> RateLimitResults:
    """Start Redis, measure the sidecars, then the client and the script alone; stop it all."""
    plan = rplan.load
    stamp, out_dir, srv_cpu, pinning, started = prepare_run(
        "mock, both sidecars and redis-server")
    gen_cpu = next(iter(os.sched_getaffinity(0))) if srv_cpu is not None else None
    r = RateLimitResults(plan, command, started, machine_info(), pinning)
    r.reserve_share = reserve_share
    # The script lives in lua/, outside what bench.py's revision note looks at.
    r.machine["git"] = git_revision(("proxy", "loadtest", "lua"))
    r.script_plan = (rplan.script_requests, rplan.script_repeats)
    r.requests_by_rate = {rate: requests_at(rplan, rate) for rate in plan.rates}
    r.raw["stamp"] = stamp
    t0 = time.perf_counter()
    with bench_lua.private_redis(srv_cpu, out_dir) as redis_server:
        r.machine["redis"] = bench_lua.redis_version(redis_server)
        measure_sidecars(r, rplan, redis_server, (gen_cpu, srv_cpu), out_dir)
        print("  the sidecar's limiter alone ...", flush=True)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            r.decision = runner.run(decision_cost(out_dir / f"{LIMIT}.yaml", DECISION_CALLS))
        print(f"  script throughput on the same Redis: {rplan.script_repeats} x "
              f"{rplan.script_requests} calls per row ...", flush=True)
        r.script = bench_lua.script_throughput(
            redis_server, rplan.script_requests, SCRIPT_BUCKETS, client_cpu=gen_cpu,
            repeats=rplan.script_repeats)
    r.duration_s = time.perf_counter() - t0
    r.machine["loadavg_end"] = os.getloadavg()
    print("  bootstrapping the percentile differences ...", flush=True)
    for rate in plan.rates:
        r.rates[rate] = rate_stats(r.limit_runs[f"open_{rate}"])
    return r


# ---------------------------------------------------------------------------
# Checks and report


def limit_added(runs: Mapping[str, dict[str, Any]], q: str, key: str = "latency_ms") -> float:
    """percentile(sidecar-limit) - percentile(sidecar-nolimit) in ms."""
    return float(runs[LIMIT][key][q] - runs[NOLIMIT][key][q])


def throughput_ratio(r: RateLimitResults) -> float:
    """sidecar-limit over sidecar-nolimit closed-loop throughput."""
    off = r.closed_loop[NOLIMIT].get("throughput_rps", 0.0)
    return r.closed_loop[LIMIT].get("throughput_rps", 0.0) / off if off else math.nan


def _script_row(r: RateLimitResults, buckets: int, outcome: str) -> bench_lua.ScriptRow | None:
    return next((x for x in r.script if x.buckets == buckets and x.outcome == outcome), None)


def expected_keys() -> dict[str, int]:
    """Bucket keys per ``rule:kind`` that one request per agent must leave in Redis."""
    return {f"{rule['name']}:{kind}": len(AGENTS) if "agent" in rule.get("per", ()) else 1
            for rule in RULES for kind in ("requests", "tokens") if kind in rule}


def checks(r: RateLimitResults) -> list[Check]:
    """The issue's targets, plus the proof that the limiter used Redis and zero errors."""
    out: list[Check] = []
    for rate, runs in r.open_loop.items():
        if rate not in TARGET_RATES:
            continue
        p99 = limit_added(runs, "p99")
        lo, hi = r.rates[rate]["bootstrap_95_ms"]["p99"] if rate in r.rates else (math.nan,) * 2
        out.append(Check(f"limiting adds p99 @ {rate} req/s",
                         f"{p99:+.3f} ms (95 % CI {lo:+.3f} .. {hi:+.3f})",
                         f"<= {MAX_LIMIT_ADDED_P99_MS} ms", p99 <= MAX_LIMIT_ADDED_P99_MS))
    for buckets in SCRIPT_BUCKETS:
        row = _script_row(r, buckets, "admitted")
        rps = row.median if row else math.nan
        best = f", best {row.best:,.0f}" if row and len(row.decisions_per_s) > 1 else ""
        out.append(Check(f"script throughput, {buckets} bucket{'s' * (buckets > 1)}, admitted",
                         f"{rps:,.0f} decisions/s (median{best})",
                         f">= {MIN_SCRIPT_DECISIONS_S:,}", rps >= MIN_SCRIPT_DECISIONS_S))
    decisions = r.limiter.get("details", {}).get("decisions", {})
    out.append(Check("decisions made in Redis",
                     "; ".join(r.fallback) if r.fallback else
                     f"{decisions.get('redis', 0)} by a Redis call, "
                     f"{decisions.get('reserved', 0)} from blocks reserved in Redis, none "
                     "elsewhere, "
                     f"{r.redis.get('evalsha_failed', 0)} failed script calls",
                     f"all {r.expected_decisions} requests", not r.fallback))
    want = expected_keys()
    keys = r.probes[-1]["keys_by_rule"] if r.probes else {}
    out.append(Check("every rule charged (Redis keys after the last probe)",
                     ", ".join(f"{k} {n}" for k, n in keys.items()) or "none",
                     ", ".join(f"{k} {n}" for k, n in want.items()),
                     all(keys.get(k) == n for k, n in want.items())))
    errs = errors_by_scenario(r)
    out.append(Check("zero errors (every request admitted)",
                     ", ".join(f"{k}: {v}" for k, v in errs.items()) or "0", "0", not errs))
    return out


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_latency(r: RateLimitResults) -> list[str]:
    """limit - nolimit with its uncertainty, each vs direct, then per-rate detail."""
    rows, vs_direct = [], []
    for rate, runs in r.open_loop.items():
        st = r.rates[rate]
        p99 = limit_added(runs, "p99")
        rows.append([str(rate), _signed(limit_added(runs, "p50")), _signed(p99),
                     _interval(st["bootstrap_95_ms"]["p50"]),
                     _interval(st["bootstrap_95_ms"]["p99"]),
                     _range(st["rounds_added_ms"]["p50"]), _range(st["rounds_added_ms"]["p99"]),
                     _decisions_text(r, f"open {rate}"),
                     _verdict(p99 <= MAX_LIMIT_ADDED_P99_MS) if rate in TARGET_RATES
                     else "(context)"])
        vs_direct.append([str(rate), _signed(added(runs, NOLIMIT, "p50")),
                          _signed(added(runs, NOLIMIT, "p99")), _signed(added(runs, LIMIT, "p50")),
                          _signed(added(runs, LIMIT, "p99"))])
    out = ["## Latency added by limiting (sidecar-limit - sidecar-nolimit, open loop)", "",
           f"Target: p99 added <= {MAX_LIMIT_ADDED_P99_MS} ms at 500 and 1000 req/s; "
           f"{CONTEXT_RATE} req/s is context (the cost before the server core gets busy). "
           f"Bootstrap: 95 % interval over {BOOTSTRAP_RESAMPLES} resamples of the requests; "
           "per round: the difference within each interleaving round (adjacent blocks), "
           "median [min .. max].", "",
           *_table(["rate (req/s)", "+p50 ms", "+p99 ms", "+p50 95 % CI", "+p99 95 % CI",
                    "+p50 per round", "+p99 per round", "limit decisions (warm-up incl.)",
                    "p99 target"], rows), "",
           "A decision made locally (Redis call over its time budget, or breaker open) is "
           "faster than one in Redis, so a row with local decisions understates the cost.", "",
           "### Both sidecars vs direct", "",
           *_table(["rate (req/s)", "nolimit +p50 ms", "nolimit +p99 ms", "limit +p50 ms",
                    "limit +p99 ms"], vs_direct), ""]
    for rate, runs in r.open_loop.items():
        rows = []
        for name, doc in runs.items():
            head = doc.get("overhead_header_ms")
            lat = doc["latency_ms"]
            rows.append([name, str(doc["completed"]), _errors_text(doc), _f(lat["p50"]),
                         _f(lat["p90"]), _f(lat["p99"]), _f(lat["p99.9"]), _f(lat["max"]),
                         _f(doc["proxy_cpu_ms_per_req"]),
                         _f(doc["redis_cpu_ms_per_req"]) if name == LIMIT else "-",
                         f"{_f(head['p50'])} / {_f(head['p99'])}" if head else "n/a"])
        lag = runs["direct"]["send_lag_ms"]
        busy = {name: _core_share(doc) for name, doc in runs.items()}
        out += [f"### Open loop {rate} req/s", "",
                *_table(["target", "ok", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                         "max ms", "sidecar CPU ms/req", "Redis CPU ms/req",
                         "x-sidecar-overhead-ms p50 / p99"], rows), "",
                "Server core demand during each target's blocks (CPU seconds of all processes "
                "on it per second of block; over 100 %: more work than the core could do, the "
                "backlog ran on into the pause after the block): "
                + ", ".join(f"{n} {b:.0%}" for n, b in busy.items())
                + f". sidecar-limit's own CPU during the other targets' blocks (its settle work "
                f"spilling over): {_f(_spill(runs) * 1000, 1)} ms per second. Generator send lag "
                f"behind schedule (direct blocks): p50 {_f(lag['p50'])} ms, p99 "
                f"{_f(lag['p99'])} ms.", ""]
    return out


def _decisions_text(r: RateLimitResults, scenario: str) -> str:
    """sidecar-limit's decisions in one scenario by backend, e.g. ``redis 15600, local 40``."""
    doc = r.decisions.get(scenario, {})
    parts = [f"{k} {v}" for k, v in doc.items() if k != "breaker_opened"]
    if doc.get("breaker_opened"):
        parts.append(f"breaker opened {doc['breaker_opened']}x")
    return ", ".join(parts) or "none"


def _core_share(doc: dict[str, Any]) -> float:
    """Server CPU seconds per second of a target's blocks (its settle work included)."""
    servers = sum(v for k, v in doc["cpu_s"].items() if k != "generator")
    return servers / doc["block_s"] if doc["block_s"] > 0 else math.nan


def _spill(runs: Mapping[str, dict[str, Any]]) -> float:
    """sidecar-limit's CPU seconds per second of the other targets' blocks."""
    others = [doc for name, doc in runs.items() if name != LIMIT]
    wall = sum(doc["wall_s"] for doc in others)
    return sum(doc["cpu_s"].get(LIMIT, 0.0) for doc in others) / wall if wall else math.nan


def report_closed_loop(r: RateLimitResults) -> list[str]:
    """Throughput and CPU per request of both sidecars (and direct)."""
    rows = []
    for name, doc in r.closed_loop.items():
        cpu = doc["proxy_cpu_ms_per_req"]
        rows.append([name, _f(doc.get("throughput_rps", math.nan), 0), _errors_text(doc),
                     _f(cpu), _f(1000.0 / cpu, 0) if cpu and not math.isnan(cpu) else "n/a",
                     _f(doc["redis_cpu_ms_per_req"]) if name == LIMIT else "-",
                     _f(doc["mock_cpu_ms_per_req"]),
                     f"{doc['cpu_s'].get('generator', math.nan) / doc['block_s']:.0%}"])
    on, off = (r.closed_loop[n]["proxy_cpu_ms_per_req"] for n in (LIMIT, NOLIMIT))
    cpu = (f"; CPU per request {_f(off)} -> {_f(on)} ms ({_signed(on - off)} ms, "
           f"{(on - off) / off:+.0%})" if off else "")
    return ["## Max throughput (closed loop)", "",
            f"{r.plan.workers} connections send back to back; blocks of {r.plan.closed_block_s} s "
            f"rotate between the targets for {r.plan.closed_rounds} rounds. Mock, sidecars and "
            "Redis share one core, so sidecar-limit's throughput also pays for Redis's CPU; "
            "'sidecar-only req/s' is 1000 / its CPU ms per request.", "",
            *_table(["target", "req/s", "errors", "sidecar CPU ms/req", "sidecar-only req/s",
                     "Redis CPU ms/req", "mock CPU ms/req", "generator CPU"], rows), "",
            f"sidecar-limit's decisions: {_decisions_text(r, 'closed')}. "
            f"sidecar-limit / sidecar-nolimit throughput: **{_f(throughput_ratio(r), 2)}**"
            f"{cpu}.", ""]


def _decision_alone(r: RateLimitResults) -> str:
    """One sentence on ``decision_cost``: its figures, or why there are none."""
    d = r.decision
    if "error" in d or not d:
        return ("Timing the limiter alone did not work with this version of the sidecar's "
                f"internals ({d.get('error', 'not run')}).")
    backends = ", ".join(f"{k} {v}" for k, v in d.get("backends", {}).items())
    return (f"The sidecar's own `Policy.charges` + `Limiter.decide` timed alone, one decision "
            f"after another on the generator's event loop ({d['buckets']} buckets, Redis on "
            f"the other core, no HTTP; decisions by backend: {backends}): "
            f"{_f(d['cpu_us_per_call'], 0)} us of CPU and {_f(d['wall_us_per_call'], 0)} us "
            "of wall time per decision.")


def report_cost(r: RateLimitResults) -> list[str]:
    """Extra CPU per request with limits, and the decision path timed on its own."""
    calls = r.redis.get("evalsha_calls", 0)
    per_req = calls / r.expected_decisions if r.expected_decisions else math.nan
    rows = []
    scenarios = [*((f"open {rate}", runs) for rate, runs in r.open_loop.items()),
                 ("closed loop", r.closed_loop)]
    for label, runs in scenarios:
        off, on = runs[NOLIMIT]["proxy_cpu_ms_per_req"], runs[LIMIT]["proxy_cpu_ms_per_req"]
        rows.append([label, _f(off), _f(on), _signed(on - off),
                     f"{(on - off) / off:+.0%}" if off else "n/a",
                     _f(runs[LIMIT]["redis_cpu_ms_per_req"])])
    return ["## Where the limiter's cost goes (CPU per request)", "",
            *_table(["scenario", "nolimit sidecar ms/req", "limit sidecar ms/req",
                     "limiting +ms/req", "limiting +%", "Redis ms/req (limit)"], rows), "",
            f"{_decision_alone(r)} Through the sidecar, Redis counted {_f(per_req, 2)} script "
            "calls per request (decisions plus token corrections; see 'Where the decisions "
            "were made'); the rest of the extra CPU is the limit stage's own work on the "
            "request and settle paths. Inside Redis a call takes "
            f"{_f(r.redis.get('evalsha_usec_per_call', math.nan), 1)} us (wall time, while "
            "sharing the core).", ""]


def _header_int(probe_doc: dict[str, Any], name: str) -> int:
    """An integer x-ratelimit-* header from a probe (-1: absent or not a number)."""
    value = probe_doc.get("headers", {}).get(name, "")
    return int(value) if value.isdigit() else -1


def report_redis(r: RateLimitResults) -> list[str]:
    """What /status and Redis itself say about the decisions."""
    d = r.limiter.get("details", {})
    calls = r.redis.get("evalsha_calls", 0)
    per_req = calls / r.expected_decisions if r.expected_decisions else math.nan
    first, last = (r.probes[0], r.probes[-1]) if r.probes else ({}, {})
    keys = ", ".join(f"`{k}` {n}" for k, n in last.get("keys_by_rule", {}).items()) or "none"
    heads = ", ".join(f"`{k}: {v}`" for k, v in first.get("headers", {}).items()) or "none"
    over = [kind for kind in ("requests", "tokens")
            if _header_int(first, f"x-ratelimit-remaining-{kind}")
            > _header_int(first, f"x-ratelimit-limit-{kind}")]
    if over:
        heads += (". Note: `x-ratelimit-remaining-" + "`/`".join(over) + "` exceeds the "
                  "limit it belongs to, which a client should never see")
    verdict = ("every decision was made by the script in Redis" if not r.fallback else
               "**NOT ALL IN REDIS: " + "; ".join(r.fallback) + "**. The per-scenario counts "
               "in the latency table show where; those rows understate the cost of a Redis "
               "decision")
    return ["## Where the decisions were made", "",
            f"sidecar-limit's `/status` after the run: ratelimit component state "
            f"`{r.limiter.get('state', '?')}`, backend `{d.get('backend')}`, breaker "
            f"`{d.get('breaker')}` (opened {d.get('breaker_opened')} times), decisions "
            f"`{orjson.dumps(d.get('decisions', {})).decode()}` for "
            f"{r.expected_decisions} requests sent to it (warm-ups and "
            f"{2 * len(AGENTS)} probe requests included): {verdict}.", "",
            f"Redis counted {calls} EVALSHA calls, {_f(per_req, 2)} per request: the "
            "decisions, plus the token corrections (real usage - estimate; never zero here, "
            "as the estimate assumes the default 1024 output tokens) that the sidecar sends "
            "after the answers, off the response path. "
            f"{_f(r.redis.get('evalsha_usec_per_call', math.nan), 2)} us each "
            f"inside Redis, {r.redis.get('evalsha_failed', 0)} failed; Redis used "
            f"{_f(r.redis.get('used_cpu_s', math.nan), 1)} CPU s over the load phase. "
            f"Keys right after the last probe, by rule and kind: {keys} (one per agent for "
            f"the per-agent rule, one each for the namespace and global rules: all three rules "
            f"applied). An admitted answer's headers: {heads}.", ""]


def report_script(r: RateLimitResults) -> list[str]:
    """The Lua script's throughput on one Redis, with the analysis that still holds."""
    calls, repeats = r.script_plan
    evalsha = r.redis.get("evalsha_calls", 0)
    per_req = evalsha / r.expected_decisions if r.expected_decisions else math.nan
    rows = [[str(x.buckets), x.outcome, f"{x.median:,.0f}",
             " / ".join(f"{v:,.0f}" for v in x.decisions_per_s),
             _f(statistics.median(x.usec_per_call), 2),
             _verdict(x.median >= MIN_SCRIPT_DECISIONS_S) if x.outcome == "admitted" else "-"]
            for x in r.script]
    return ["## Lua script throughput (one Redis)", "",
            f"`loadtest.bench_lua.script_throughput` on the same private redis-server "
            f"{r.machine.get('redis', '?')} (still pinned to the server core; the sidecars are "
            f"stopped by then): redis-benchmark, pinned to the other core, sends {calls:,} "
            f"EVALSHA calls per run over {bench_lua.CONNECTIONS} connections, pipeline depth "
            f"{bench_lua.PIPELINE}; {repeats} run(s) per row, round-robin. Target: at least "
            f"{MIN_SCRIPT_DECISIONS_S:,} decisions/s, on the median. 'Redis us/call' is "
            "Redis's own wall time per call (INFO commandstats), which grows when the core is "
            "shared.", "",
            *_table(["buckets per decision", "outcome", "decisions/s (median)", "each run",
                     "Redis us/call", "target"], rows), "",
            "- An admitted decision costs one GET and one SET per bucket. A denied one costs "
            "only the GETs, because nothing is charged.",
            "- Redis runs the script single-threaded, so these figures are also the ceiling "
            "for one shard. Every rate-limit key shares the hash tag `{llm-sidecar:rl}`, so on "
            "a cluster they all live on one shard.",
            f"- Through the sidecar, each request of this run cost Redis {_f(per_req, 2)} "
            "script calls (its decision and its share of the token corrections; see above), "
            "so one Redis serves that many times fewer such requests per second than the "
            "table's decisions/s.",
            "- The previous report (2026-11-25, before concurrent quotas were added to the "
            "script) measured 168,634 (1 bucket) and 82,781 (3 buckets) admitted decisions/s "
            "with the same method, on the machine of that run; see 'Noise' for this "
            "machine's speed.", ""]


def report_noise(r: RateLimitResults) -> list[str]:
    """What else used the two cores during the load phase."""
    n = r.noise
    parts = []
    for role in ("generator", "server"):
        c = n.get(role)
        if c:
            parts.append(f"{role} core (CPU {c['cpu']}): busy {c['busy']:.0%}, of which ours "
                         f"{c['ours']:.0%}, other processes {c['foreign']:.0%}, stolen by the "
                         f"hypervisor {c['steal']:.1%}")
    la0, la1 = r.machine["loadavg_start"], r.machine.get("loadavg_end", (math.nan,) * 3)
    verdict = ("**This run was noisy**: other processes used more than "
               f"{FOREIGN_NOISY:.0%} of a core (or the hypervisor stole more than "
               f"{STEAL_NOISY:.0%}). The interleaved limit - nolimit differences are still "
               "comparable (both sidecars were equally exposed), but absolute latencies, "
               "throughput and the script's decisions/s are lower than on a quiet machine."
               if n.get("noisy") else "The run was quiet enough: other processes used at most "
               f"{FOREIGN_NOISY:.0%} of either core.")
    direct = r.closed_loop.get("direct", {})
    speed = (f" Machine speed, for comparing runs: direct (the mock alone) serves "
             f"{_f(direct.get('throughput_rps', math.nan), 0)} req/s in the closed loop at "
             f"{_f(direct.get('mock_cpu_ms_per_req', math.nan))} ms of mock CPU per request; "
             "`loadtest/REPORT.md` has the same figures for its machine.")
    return ["## Noise", "",
            f"Over the {n.get('wall_s', math.nan):.0f} s of load: " + "; ".join(parts)
            + f". Load average {la0[0]:.2f} at the start, {la1[0]:.2f} at the end (on "
            f"{r.machine['nproc']} CPUs). 'Ours' is the generator's CPU on its core and the "
            "mock's, both sidecars' and Redis's on theirs; 'other processes' also contains "
            "kernel time (interrupts, loopback softirqs) not charged to any process. " + verdict
            + speed, ""]


def summary(r: RateLimitResults) -> list[str]:
    """The verdict in words, with the cause the numbers point to."""
    lines = []
    for rate in TARGET_RATES:
        runs = r.open_loop.get(rate)
        if runs is None:
            continue
        p99 = limit_added(runs, "p99")
        on, off = _core_share(runs[LIMIT]), _core_share(runs[NOLIMIT])
        cause = (f"The server core (mock, sidecar, Redis) was asked for {on:.0%} of its "
                 f"capacity during sidecar-limit's blocks against {off:.0%} without limits: "
                 "at or near saturation, so requests queued for CPU, and that queueing is "
                 "most of the added latency." if on >= NEAR_SATURATION else
                 f"The server core was {on:.0%} busy during sidecar-limit's blocks "
                 f"({off:.0%} without limits).")
        if off >= NEAR_SATURATION:
            cause += (" Even without limits the core was near saturation on this machine, so "
                      "this rate measures queueing more than the decision.")
        lines.append(f"- {rate} req/s: limiting adds {p99:+.3f} ms at p99 (target <= "
                     f"{MAX_LIMIT_ADDED_P99_MS} ms): "
                     f"**{_verdict(p99 <= MAX_LIMIT_ADDED_P99_MS)}**. {cause}")
    ctx = r.open_loop.get(CONTEXT_RATE)
    if ctx is not None:
        h_on = ctx[LIMIT].get("overhead_header_ms", {}).get("p50", math.nan)
        h_off = ctx[NOLIMIT].get("overhead_header_ms", {}).get("p50", math.nan)
        lines.append(
            f"- Before saturation ({CONTEXT_RATE} req/s, server core "
            f"{_core_share(ctx[LIMIT]):.0%} busy with limits) limiting adds "
            f"{limit_added(ctx, 'p50'):+.3f} ms at p50 and {limit_added(ctx, 'p99'):+.3f} ms at "
            f"p99; the sidecar's own `x-sidecar-overhead-ms` p50 rises from {_f(h_off)} to "
            f"{_f(h_on)} ms, so the decision alone takes about {_f(h_on - h_off)} ms in the "
            "handler.")
    cl = r.closed_loop
    if cl:
        on, off = cl[LIMIT]["proxy_cpu_ms_per_req"], cl[NOLIMIT]["proxy_cpu_ms_per_req"]
        d = r.decision
        alone = (f" A decision timed alone through the sidecar's limiter takes "
                 f"{_f(d['cpu_us_per_call'], 0)} us of CPU." if "cpu_us_per_call" in d else "")
        lines.append(
            f"- Cost: limiting takes {on - off:+.3f} ms of sidecar CPU per request "
            f"({(on - off) / off:+.0%}; closed loop) plus {_f(cl[LIMIT]['redis_cpu_ms_per_req'])}"
            f" ms in Redis; closed-loop throughput with limits is {_f(throughput_ratio(r), 2)}"
            f" of that without.{alone}")
    a3 = _script_row(r, 3, "admitted")
    if a3 is not None:
        lines.append(f"- The script itself is not the bottleneck: {a3.median:,.0f} admitted "
                     f"3-bucket decisions/s on one Redis, {a3.median / MIN_SCRIPT_DECISIONS_S:.1f}x"
                     " the target.")
    if r.fallback:
        lines.append("- The limiter did not decide every request in Redis: it decides locally "
                     "when a Redis call runs over `ratelimit.timeout_ms` or while its breaker "
                     "is open. The latency table shows in which scenarios; see also 'Where the "
                     "decisions were made'. The run therefore exits with status 1.")
    return ["## Summary", "", *lines, ""]


def how_to_read(r: RateLimitResults) -> list[str]:
    """What the numbers mean (fixed text around this run's Redis time per call)."""
    usec = r.redis.get("evalsha_usec_per_call", math.nan)
    return [
        "## How to read this", "",
        "The figure that answers the issue is **limiting adds p99**: the 99th percentile of "
        "sidecar-limit minus that of sidecar-nolimit, both measured from the requests' "
        "intended send times in the same interleaved run, so machine noise falls on both "
        "alike. It is a difference of percentiles, not a percentile of per-request "
        "differences, so it can come out slightly negative when the cost is below the noise; "
        "the bootstrap interval shows how far it could move with other samples of the same "
        "run (it treats requests as independent, which noise bursts are not), and the "
        "per-round spread shows how much it varies from one ~1 s block pair to the next. "
        "PASS means the point estimate is within the target; an interval reaching above the "
        "target means the margin is not established by this run. The cost measured is that "
        f"of a decision on an otherwise idle, loopback Redis: the script call ({_f(usec, 0)} us "
        "per call inside Redis in this run) plus a loopback round trip and the client work "
        "in the sidecar. A Redis across the "
        "network adds its round trip (typically 0.1-0.5 ms within a cluster) to every "
        "decision, at p50 as much as at p99. The token correction after the answer is off the "
        "response path; it shows in CPU per request, not in latency. The mock, both sidecars "
        "and Redis share one core: once limiting's extra CPU brings that core near "
        "saturation, requests queue for it and the added latency is mostly that queueing, not "
        "the decision itself ('server core demand' per rate shows when; "
        f"{CONTEXT_RATE} req/s shows the cost before it). 'vs direct' rows are the whole "
        "sidecar's cost, for scale.", ""]


def reading(r: RateLimitResults) -> list[str]:
    """Observations computed from the numbers."""
    lines = []
    for rate, runs in r.open_loop.items():
        st = r.rates[rate]
        rounds = [x for x in st["rounds_added_ms"]["p99"] if not math.isnan(x)]
        pos = sum(1 for x in rounds if x > 0)
        h_on = runs[LIMIT].get("overhead_header_ms", {})
        h_off = runs[NOLIMIT].get("overhead_header_ms", {})
        lo, hi = st["bootstrap_95_ms"]["p99"]
        lines.append(
            f"- {rate} req/s: limiting adds {limit_added(runs, 'p50'):+.3f} ms at p50 and "
            f"{limit_added(runs, 'p99'):+.3f} ms at p99 (95 % CI {lo:+.3f} .. {hi:+.3f}; p99 "
            f"higher with limits in {pos} of {len(rounds)} rounds). The sidecar's own "
            f"`x-sidecar-overhead-ms` p50 goes from {_f(h_off.get('p50', math.nan))} to "
            f"{_f(h_on.get('p50', math.nan))} ms: the decision's time inside the handler. CPU "
            f"{_f(runs[NOLIMIT]['proxy_cpu_ms_per_req'])} -> "
            f"{_f(runs[LIMIT]['proxy_cpu_ms_per_req'])} ms per request in the sidecar, plus "
            f"{_f(runs[LIMIT]['redis_cpu_ms_per_req'])} ms in Redis; server core demand "
            f"{_core_share(runs[LIMIT]):.0%} during sidecar-limit's blocks "
            f"({_core_share(runs[NOLIMIT]):.0%} during sidecar-nolimit's). Limiter decisions: "
            f"{_decisions_text(r, f'open {rate}')}.")
    lines.append(f"- Closed loop: limit / nolimit throughput {_f(throughput_ratio(r), 2)}.")
    a1, a3 = _script_row(r, 1, "admitted"), _script_row(r, 3, "admitted")
    if a1 and a3:
        lines.append(f"- Script: {a1.median:,.0f} (1 bucket) and {a3.median:,.0f} (3 buckets) "
                     f"admitted decisions/s, {a3.median / MIN_SCRIPT_DECISIONS_S:.1f}x the "
                     "target at 3 buckets, which is what every request of this benchmark takes.")
    return lines


def _reserve_text(r: RateLimitResults) -> str:
    share = r.reserve_share if r.reserve_share is not None else RateLimitConfig().reserve_share
    if share == 0:
        return "0: every request's decision is its own Redis script call"
    return (f"{share:g}{'' if r.reserve_share is not None else ' (the default)'}: a Redis "
            f"call may also take a block of {share:.1%} of a bucket's capacity, and the "
            "replica's next requests spend it with no Redis call ('reserved' decisions)")


def render_report(r: RateLimitResults, json_path: Path) -> str:
    """The whole markdown report."""
    m = r.machine
    counts = ", ".join(f"{n:,} at {rate}" + (" (context)" if rate not in TARGET_RATES else "")
                       for rate, n in r.requests_by_rate.items())
    rules = "; ".join(
        f"`{x['name']}`: " + ", ".join(
            [f"per {'/'.join(x['per'])}" if x.get("per") else "one global bucket",
             *(f"match {k} `{v}`" for k, v in x.get("match", {}).items()),
             *(f"{x[k]['amount']:,} {k} per {x[k]['period']}"
               for k in ("requests", "tokens") if k in x)])
        for x in RULES)
    out = ["# Rate limiter: latency added through the sidecar, and script throughput", "",
           f"- Date: {r.started} ({r.plan.name} run, {r.duration_s:.0f} s)",
           f"- Command: `{r.command}`",
           f"- Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; Python "
           f"{m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, redis-server "
           f"{m.get('redis', '?')}",
           f"- Code: git {m['git']}",
           f"- Pinning: {r.pinning}",
           f"- Raw results: `{json_path.relative_to(ROOT)}`", "",
           "## Results against targets", "",
           *(f"- **{_verdict(c.ok)}** {c.name}: {c.measured} (target {c.limit})"
             for c in checks(r)),
           f"- (context) closed-loop throughput sidecar-limit / sidecar-nolimit: "
           f"{_f(throughput_ratio(r), 2)}", "", *summary(r),
           "## Method", "",
           "- Targets: `direct` (client -> mock), `sidecar-nolimit` (llm-sidecar, config with "
           "`redis_url` but no rules, so no limit stage) and `sidecar-limit` (the same config "
           f"plus three rules, all applying to every request: {rules}). The quotas are so "
           "large that every request is admitted: this measures the cost of a decision, not "
           "denials. `redis_url` names a private `redis-server` on a free loopback port "
           "(`--save \"\" --appendonly no`), started and stopped by the benchmark.",
           f"- Reservations: sidecar-limit's `ratelimit.reserve_share` is {_reserve_text(r)}.",
           f"- Request: the same pre-serialised {m.get('request_body_bytes', '?')}-byte chat "
           "completion (gpt-4o-mini, no max_tokens, so the token estimate is body/4 + the "
           "default 1024) for every target, with `x-agent-id` cycling through "
           f"{len(AGENTS)} agents ({', '.join(AGENTS)}); namespace `{NAMESPACE}`. The mock "
           "answers at once with a usage block, so the limiter also corrects the token "
           "estimate after each answer.",
           "- Interleaving (from `loadtest/bench.py`): blocks of at most "
           f"{r.plan.max_block_s:g} s rotate direct -> nolimit -> limit, each round starting "
           "one target later; an unrecorded warm-up block per target first. After each "
           f"sidecar-limit block the meter runs on for {LIMIT_SETTLE_S * 1000:.0f} ms so the "
           "token corrections it queued are charged to it.",
           f"- Open loop, requests per target: {counts} req/s, on a fixed schedule; latency "
           "from the *intended* send time, so a stall "
           "delays nothing silently. Added by limiting = percentile(sidecar-limit) - "
           "percentile(sidecar-nolimit).",
           "- CPU per request: `/proc/PID/task/*/schedstat` of each process (Redis included) "
           "before and after each block, divided by the requests completed in it.",
           f"- Closed loop: {r.plan.workers} connections back to back, same interleaving.",
           "- Proof: one probe request per agent before and after the load, then sidecar-limit's"
           " `/status` (ratelimit component: backend, breaker, decisions by backend) and Redis's "
           "own INFO commandstats. The run fails loudly if any decision was not made in Redis.",
           "- Placement: the generator on one core; mock, both sidecars and Redis on the other, "
           "so Redis's CPU competes with the sidecar's (pessimistic compared with a Redis on "
           "another node, optimistic in having no network). Redis is not on the generator's "
           "core because the generator busy-waits the last 1.5 ms before each send, which "
           "would delay Redis's replies.", "",
           *how_to_read(r), *report_latency(r), *report_closed_loop(r), *report_cost(r),
           *report_redis(r),
           *report_script(r), *report_noise(r), "## Reading the numbers", "", *reading(r), "",
           "## Not measured here", "",
           "- Accuracy across replicas (admitted / allowed with several sidecars sharing one "
           "Redis): `loadtest/fleet_accuracy.py`, `loadtest/REPORT-fleet.md`.",
           "- Latency under denials, queueing (`max_wait`), concurrent quotas or a Redis "
           "outage: this benchmark only ever admits, with requests and tokens quotas.", ""]
    return "\n".join(out)


def write_outputs(r: RateLimitResults, out: Path) -> Path:
    """Write the JSON results and the markdown report; returns the JSON path."""
    json_path = RESULTS_DIR / f"ratelimit-{r.raw['stamp']}.json"
    doc = {"plan": asdict(r.plan), "script_plan": r.script_plan, "command": r.command,
           "started": r.started, "duration_s": r.duration_s, "machine": r.machine,
           "pinning": r.pinning, "rules": RULES, "agents": AGENTS,
           "open_loop": r.open_loop, "closed_loop": r.closed_loop, "rates": r.rates,
           "script": [asdict(x) for x in r.script], "limiter": r.limiter,
           "expected_decisions": r.expected_decisions, "fallback": r.fallback,
           "decisions_by_scenario": r.decisions, "decision_alone": r.decision,
           "requests_by_rate": r.requests_by_rate,
           "redis": r.redis, "probes": r.probes, "noise": r.noise,
           "checks": [asdict(c) for c in checks(r)], "samples": r.raw}
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))
    out.write_text(render_report(r, json_path))
    return json_path


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, write the report; exit 1 if the limiter did not decide in Redis."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_ratelimit",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~1 minute)")
    parser.add_argument("--reserve-share", type=float, default=None,
                        help="sidecar-limit's ratelimit.reserve_share (default: the "
                             "sidecar's; 0: every request asks Redis)")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "REPORT-ratelimit.md",
                        help="markdown report path (default loadtest/REPORT-ratelimit.md)")
    args = parser.parse_args(argv)
    exe = os.path.relpath(sys.executable, Path.cwd())
    command = shlex.join([exe, "-m", "loadtest.bench_ratelimit",
                          *(sys.argv[1:] if argv is None else argv)])
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers and Redis.
    signal.signal(signal.SIGTERM, raise_interrupt)
    rplan = QUICK if args.quick else FULL
    print(f"llm-sidecar rate-limit benchmark ({rplan.load.name})", flush=True)
    try:
        results = run_benchmark(rplan, command, args.reserve_share)
    except LimiterFellBack as exc:
        raise SystemExit(f"FAILED: the limiter did not decide in Redis: {exc}") from None
    json_path = write_outputs(results, args.out)
    print(f"report: {args.out}\nraw results: {json_path}")
    for c in checks(results):
        print(f"  {_verdict(c.ok)}  {c.name}: {c.measured} (target {c.limit})")
    if results.fallback:
        raise SystemExit("FAILED: the limiter did not decide every request in Redis: "
                         + "; ".join(results.fallback))


if __name__ == "__main__":
    main()
