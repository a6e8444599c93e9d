"""Throughput of lua/ratelimit.lua on one Redis: decisions per second, measured by redis-benchmark.

``.venv/bin/python -m loadtest.bench_lua [--requests N]`` starts a private
redis-server on a free loopback port (pinned to one CPU when there are two),
loads the script, and runs redis-benchmark (pinned to the other CPU) calling
EVALSHA with 1, 3 and 5 buckets per decision, admitted (buckets with room) and
denied (an exhausted bucket). Prints a markdown table; the number that matters
is decisions/s, as each call is one admit-or-deny decision over all its buckets.

``loadtest.bench_ratelimit`` reuses ``private_redis`` and ``script_throughput``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from loadtest.bench import HOST, Server, free_port, stop_server

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "lua" / "ratelimit.lua"
TAG = "{llm-sidecar:rl}"
OUTCOMES = ("admitted", "denied")
CONNECTIONS = 50
PIPELINE = 16
READY_TIMEOUT_S = 10.0
# 1 ns per unit and a capacity of 1e12: a bucket that always has room.
ROOMY_BUCKET = ("0.001", "1000000000000")
# 60 s per unit, capacity 1, cost 2: more than the bucket can ever hold, so denied.
FULL_BUCKET = ("60000000", "1", "2", "0")


@dataclass(frozen=True, slots=True)
class ScriptRow:
    """Decisions/s for a bucket count and an outcome, one value per repetition."""

    buckets: int
    outcome: str
    decisions_per_s: tuple[float, ...]
    usec_per_call: tuple[float, ...]
    """Redis's own time per call, script included (INFO commandstats)."""

    @property
    def median(self) -> float:
        """Median decisions/s over the repetitions."""
        return statistics.median(self.decisions_per_s)

    @property
    def best(self) -> float:
        """Highest decisions/s: noise from other processes only ever lowers it."""
        return max(self.decisions_per_s)


def cpu_placement() -> tuple[int | None, int | None]:
    """(redis-server CPU, client CPU): the last two allowed CPUs, or no pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2 or shutil.which("taskset") is None:
        return None, None
    return allowed[1], allowed[0]


def _pin(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


@contextlib.contextmanager
def private_redis(cpu: int | None, log_dir: Path) -> Iterator[Server]:
    """A redis-server of our own on a free loopback port, without persistence.

    Never the shared 127.0.0.1:6379: other users' keys and load would mix in.
    Pinned to ``cpu`` with taskset (which execs, so the pid is redis-server's);
    stopped when the block exits.
    """
    port = free_port()
    log_path = log_dir / "redis.log"
    with log_path.open("wb") as log:
        # A session of its own, like the other benchmark servers: stop_server kills the group.
        proc = subprocess.Popen(
            [*_pin(cpu), "redis-server", "--port", str(port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(log_dir), "--logfile", ""],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    server = Server("redis", proc, port, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        stop_server(server)


def _wait_ready(server: Server) -> None:
    client = redis.Redis(host=HOST, port=server.port, socket_timeout=1.0)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline and server.proc.poll() is None:
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                if client.ping():
                    return
            time.sleep(0.05)
    finally:
        client.close()
    tail = server.log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server did not start on port {server.port}:\n{tail}")


def script_call(buckets: int, outcome: str) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of one decision over ``buckets`` rate buckets.

    Follows the layout documented at the top of lua/ratelimit.lua: mode, idle
    grace (ms), lease id, lease TTL (ms), then kind, T, capacity, cost,
    reserve per bucket (no reservations: each call decides one request).
    ``denied``: the last bucket can never hold the cost.
    """
    keys = [f"{TAG}:bench:b{i}" for i in range(buckets)]
    argv = ["check", "1000", "bench-lease", "60000"]
    for i in range(buckets):
        exhausted = outcome == "denied" and i == buckets - 1
        argv += ["rate", *(FULL_BUCKET if exhausted else (*ROOMY_BUCKET, "1", "0"))]
    return keys, argv


def _check_call(client: redis.Redis, sha: str, buckets: int, outcome: str) -> None:
    """One call by hand: redis-benchmark counts error replies as served requests."""
    keys, argv = script_call(buckets, outcome)
    try:
        reply: Any = client.evalsha(sha, len(keys), *keys, *argv)
    except redis.ResponseError as exc:
        raise RuntimeError(f"lua/ratelimit.lua rejected the benchmark's call ({exc}); has its "
                           "ARGV layout changed? Update script_call().") from exc
    want = 1 if outcome == "admitted" else 0
    if not isinstance(reply, list) or len(reply) != 2 + 4 * buckets or reply[0] != want:
        raise RuntimeError(f"unexpected reply to a {outcome} call over {buckets} buckets: "
                           f"{reply!r}; has lua/ratelimit.lua's interface changed?")


def _evalsha_stats(client: redis.Redis) -> dict[str, float]:
    stats: dict[str, Any] = client.info("commandstats")
    return dict(stats.get("cmdstat_evalsha", {}))


def _rps(output: str) -> float:
    match = re.search(r"([\d.]+) requests per second", output)
    if match is None:
        raise RuntimeError(f"unexpected redis-benchmark output:\n{output}")
    return float(match.group(1))


def script_throughput(server: Server, requests: int, buckets: Sequence[int] = (1, 3, 5),
                      outcomes: Sequence[str] = OUTCOMES, client_cpu: int | None = None,
                      repeats: int = 1) -> list[ScriptRow]:
    """Decisions/s of lua/ratelimit.lua on ``server``, one row per (buckets, outcome).

    redis-benchmark (pinned to ``client_cpu``) sends ``requests`` EVALSHA calls
    over 50 connections, 16 pipelined per connection. With ``repeats`` > 1 the
    rows are measured round-robin, so a noisy moment hits one repetition of
    each rather than every repetition of one. Each row first checks one call by
    hand and afterwards that Redis counted no failed call, so a script whose
    interface changed fails loudly instead of measuring error replies.
    """
    client = redis.Redis(host=HOST, port=server.port)
    try:
        sha = str(client.script_load(SCRIPT.read_text(encoding="utf-8")))
        cases = [(n, outcome) for n in buckets for outcome in outcomes]
        for n, outcome in cases:
            _check_call(client, sha, n, outcome)
        rps: dict[tuple[int, str], list[float]] = {case: [] for case in cases}
        usec: dict[tuple[int, str], list[float]] = {case: [] for case in cases}
        for _ in range(repeats):
            for n, outcome in cases:
                keys, argv = script_call(n, outcome)
                client.config_resetstat()
                cmd = [*_pin(client_cpu), "redis-benchmark", "-h", HOST, "-p", str(server.port),
                       "-n", str(requests), "-c", str(CONNECTIONS), "-P", str(PIPELINE), "-q",
                       "evalsha", sha, str(n), *keys, *argv]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                stats = _evalsha_stats(client)
                failed = int(stats.get("failed_calls", 0)) + int(stats.get("rejected_calls", 0))
                if failed:
                    raise RuntimeError(f"{failed} of the EVALSHA calls failed ({n} buckets, "
                                       f"{outcome}): the measurement would count errors")
                rps[n, outcome].append(_rps(out))
                usec[n, outcome].append(float(stats.get("usec_per_call", float("nan"))))
        return [ScriptRow(n, outcome, tuple(rps[n, outcome]), tuple(usec[n, outcome]))
                for n, outcome in cases]
    finally:
        client.close()


def redis_version(server: Server) -> str:
    """The private server's version string."""
    client = redis.Redis(host=HOST, port=server.port)
    try:
        info: dict[str, Any] = client.info("server")
        return str(info["redis_version"])
    finally:
        client.close()


def main() -> None:
    """Run the measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every row this many times, round-robin")
    args = parser.parse_args()
    server_cpu, client_cpu = cpu_placement()
    workdir = Path(tempfile.mkdtemp(prefix="bench-lua-"))
    try:
        with private_redis(server_cpu, workdir) as server:
            rows = script_throughput(server, args.requests, client_cpu=client_cpu,
                                     repeats=args.repeats)
            version = redis_version(server)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"redis-server {version}, {args.requests} calls per row, "
          f"{CONNECTIONS} connections, pipeline {PIPELINE}\n")
    print("| buckets per decision | outcome | decisions/s (median) | best | Redis us/call |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.buckets} | {row.outcome} | {row.median:,.0f} | {row.best:,.0f} | "
              f"{statistics.median(row.usec_per_call):.2f} |")


if __name__ == "__main__":
    main()
