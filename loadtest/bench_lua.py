"""Throughput of lua/ratelimit.lua on one Redis: decisions per second, measured by redis-benchmark.

``.venv/bin/python -m loadtest.bench_lua [--requests N]`` starts a private
redis-server on a free loopback port (pinned to CPU 1 when there are two),
loads the script, and runs redis-benchmark (pinned to CPU 0) calling EVALSHA
with 1, 3 and 5 buckets per decision, admitted (buckets with room) and denied
(an exhausted bucket). Prints a markdown table; the number that matters is
decisions/s, as each call is one admit-or-deny decision over all its buckets.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
TAG = "{llm-sidecar:rl}"


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if (os.cpu_count() or 1) >= 2 and shutil.which(
        "taskset") else []


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rps(output: str) -> float:
    match = re.search(r"([\d.]+) requests per second", output)
    if match is None:
        raise RuntimeError(f"unexpected redis-benchmark output:\n{output}")
    return float(match.group(1))


def main() -> None:
    """Run the measurement and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="bench-lua-")
    server = subprocess.Popen(
        [*_pin(1), "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if "Ready to accept connections" in line:
                break
        client = redis.Redis(port=port)
        sha = client.script_load((ROOT / "lua" / "ratelimit.lua").read_text())
        huge = ["0.001", "1000000000000"]  # 1 ns per unit, 1e12 capacity: always room
        rows = []
        for buckets in (1, 3, 5):
            for outcome in ("admitted", "denied"):
                keys = [f"{TAG}:b{i}" for i in range(buckets)]
                argv = ["check", "1000"]
                for i in range(buckets):
                    exhausted = outcome == "denied" and i == buckets - 1
                    argv += ["60000000", "1", "2"] if exhausted else [*huge, "1"]
                cmd = [*_pin(0), "redis-benchmark", "-p", str(port), "-n", str(args.requests),
                       "-c", "50", "-P", "16", "-q", "evalsha", sha, str(buckets), *keys, *argv]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows.append((buckets, outcome, _rps(out)))
        print(f"redis-server {client.info()['redis_version']}, {args.requests} calls per row, "
              "50 connections, pipeline 16\n")
        print("| buckets per decision | outcome | decisions/s |")
        print("|---|---|---|")
        for buckets, outcome, rps in rows:
            print(f"| {buckets} | {outcome} | {rps:,.0f} |")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
