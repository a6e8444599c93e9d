"""Performance benchmark of llm-sidecar against a direct call and a minimal Python relay.

``.venv/bin/python -m loadtest.bench [--quick] [--profile] [--out loadtest/REPORT.md]``

Three targets answer the same pre-serialised ~1 KB chat completion:

``direct``   client -> mock upstream
``relay``    client -> ``loadtest.relay_baseline`` (the leanest aiohttp relay) -> mock
``sidecar``  client -> llm-sidecar -> mock

What makes the numbers comparable on a small, shared, noisy machine:

- The three servers are pinned to one CPU, the load generator (this process)
  to another, so the generator never steals CPU from what it measures.
- The targets are measured *interleaved*: short blocks rotate between them,
  round after round, so a noisy neighbour hurts all three alike. Added latency
  is ``percentile(target) - percentile(direct)`` over the same period.
- The open loop sends on a fixed schedule, and every latency is measured
  from the request's *intended* send time, so a stall delays nothing silently
  (no coordinated omission).
- The generator is a tiny HTTP/1.1 client on raw keep-alive connections
  (asyncio protocols, pre-built request bytes, minimal response parsing),
  several times cheaper per request than aiohttp's client, so it is not what
  saturates first in the closed loop.

Scenarios: open loop at 100/300/1000 req/s (latency), closed loop (max
throughput), streaming time to first chunk, and optionally a py-spy profile
of the sidecar under closed-loop load. Results go to a markdown report and a
raw JSON file in ``loadtest/results/``.

``--telemetry`` runs a separate benchmark instead: ``direct``, ``sidecar-off``
(``OTEL_SDK_DISABLED=true``) and ``sidecar-otel`` (traces at 100 % sampling and
metrics exported over OTLP/HTTP to ``loadtest.otlp_sink``), interleaved at
100/500/1000 req/s plus a closed loop; it reports the latency and CPU that
telemetry adds (``loadtest/REPORT-telemetry.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import datetime as dt
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import random
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import orjson

from proxy.server import loop_factory

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "loadtest" / "results"
TARGETS = ("direct", "relay", "sidecar")

# Targets the sidecar must meet (issue acceptance criteria).
MAX_ADDED_P50_MS = 1.0
MAX_ADDED_P99_MS = 2.0
MIN_THROUGHPUT_RATIO = 0.75
MAX_ADDED_TTFC_P50_MS = 1.0
# Generator CPU above this share of its core means it may be what limits throughput.
GENERATOR_BUSY = 0.85

DRAIN_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
READY_ATTEMPTS = 150
READY_INTERVAL_S = 0.1
# uvloop timers tick in whole milliseconds; the last stretch before a send is
# spent yielding to the loop (which keeps polling sockets) for sub-ms accuracy.
SPIN_S = 0.0015
STREAM_HEADERS = {"x-mock-ttft-ms": "20", "x-mock-tokens": "16", "x-mock-tps": "400"}


@dataclass(frozen=True, slots=True)
class Plan:
    """How much load each scenario sends (full run or ``--quick``)."""

    name: str
    open_requests: int
    """Requests per target per rate in the open loop."""
    min_rounds: int
    """Interleaving rounds at least (each round: one block per target)."""
    min_block_s: float
    max_block_s: float
    warmup_s: float
    ttfc_requests: int
    closed_block_s: float
    closed_rounds: int
    profile_s: float
    rates: tuple[int, ...] = (100, 300, 1000)
    ttfc_rate: int = 50
    workers: int = 64
    open_pool: int = 32


FULL = Plan("full", open_requests=3000, min_rounds=4, min_block_s=0.5, max_block_s=1.5,
            warmup_s=0.4, ttfc_requests=1000, closed_block_s=2.0, closed_rounds=5,
            profile_s=10.0)
QUICK = Plan("quick", open_requests=300, min_rounds=2, min_block_s=0.5, max_block_s=1.5,
             warmup_s=0.2, ttfc_requests=150, closed_block_s=1.0, closed_rounds=2,
             profile_s=3.0)


# ---------------------------------------------------------------------------
# Server processes


@dataclass(slots=True)
class Server:
    """One benchmarked server process (its own process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        """The server's process id (taskset execs, so it is the Python process)."""
        return self.proc.pid


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(name: str, cmd: list[str], port: int, ready_path: str, log_dir: Path,
                 cpu: int | None, env: dict[str, str] | None = None) -> Server:
    """Start ``cmd`` (pinned to ``cpu`` with taskset) and wait until it answers."""
    argv = ["taskset", "-c", str(cpu), *cmd] if cpu is not None else cmd
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        # A new session makes the server a process group we can stop as a whole.
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    server = Server(name, proc, port, log_path)
    try:
        _wait_ready(server, f"http://{HOST}:{port}{ready_path}")
    except BaseException:
        stop_server(server)
        raise
    return server


def _wait_ready(server: Server, url: str) -> None:
    # Never go through an HTTP proxy from the environment: loopback only.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(READY_ATTEMPTS):
        if server.proc.poll() is not None:
            break
        with contextlib.suppress(OSError), opener.open(url, timeout=1.0) as resp:
            if resp.status == 200:
                return
        time.sleep(READY_INTERVAL_S)
    tail = server.log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{server.name} did not become ready at {url}:\n{tail}")


def stop_server(server: Server) -> None:
    """SIGTERM the server's process group, SIGKILL it if it does not exit in time."""
    if server.proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(wait_s)
            return


def start_mock(log_dir: Path, cpu: int | None) -> Server:
    """Start the mock upstream on a free port."""
    port = free_port()
    return start_server(
        "mock", [sys.executable, "-m", "loadtest.mock_upstream", "--host", HOST, "--port",
                 str(port)], port, "/v1/models", log_dir, cpu)


def sidecar_command(port: int, upstream: str) -> list[str]:
    """``llm-sidecar serve`` on ``port`` in front of ``upstream`` (the venv's entry point)."""
    py = sys.executable
    sidecar_bin = Path(py).parent / "llm-sidecar"
    cmd = [str(sidecar_bin)] if sidecar_bin.exists() else [py, "-m", "proxy"]
    return [*cmd, "serve", "--host", HOST, "--port", str(port), "--upstream", upstream]


def start_servers(log_dir: Path, cpu: int | None) -> dict[str, Server]:
    """Start mock, relay and sidecar; returns them by name (stops them on failure)."""
    py = sys.executable
    servers: dict[str, Server] = {}
    try:
        servers["mock"] = start_mock(log_dir, cpu)
        upstream = f"http://{HOST}:{servers['mock'].port}/v1"
        port = free_port()
        servers["relay"] = start_server(
            "relay", [py, "-m", "loadtest.relay_baseline", "--host", HOST, "--port", str(port),
                      "--upstream", upstream], port, "/v1/models", log_dir, cpu)
        port = free_port()
        # Cache off: every request is the same, so all but the first would be hits
        # and this would measure the cache, not the proxy path.
        env = dict(os.environ, SIDECAR_LOGGING__LEVEL="warning", SIDECAR_CACHE__ENABLED="false")
        # The relay forwards the client's key; so must the sidecar for a fair comparison.
        env.pop("OPENAI_API_KEY", None)
        servers["sidecar"] = start_server(
            "sidecar", sidecar_command(port, upstream), port, "/readyz", log_dir, cpu, env)
    except BaseException:
        for server in servers.values():
            stop_server(server)
        raise
    return servers


# ---------------------------------------------------------------------------
# CPU accounting

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds used so far by all threads of ``pid``.

    ``/proc/PID/task/*/schedstat`` counts nanoseconds; ``/proc/PID/stat``
    (utime + stime) only clock ticks of 10 ms, too coarse for short blocks,
    so it is the fallback.
    """
    try:
        total = 0
        for task in os.scandir(f"/proc/{pid}/task"):
            with open(f"{task.path}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        if total > 0:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name may contain spaces; fields restart after its ')'.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def self_cpu_s() -> float:
    """CPU seconds used by this (generator) process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Snapshots the CPU time of every server and of the generator."""

    def __init__(self, servers: dict[str, Server]) -> None:
        self.pids = {name: server.pid for name, server in servers.items()}

    def snapshot(self) -> dict[str, float]:
        """CPU seconds so far, keyed by server name plus ``generator``."""
        snap = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        snap["generator"] = self_cpu_s()
        return snap


# ---------------------------------------------------------------------------
# A minimal HTTP/1.1 client (keep-alive, one request at a time per connection)


class Reply(NamedTuple):
    """What the generator keeps of a response."""

    status: int
    done_at: float
    """perf_counter() when the last byte arrived."""
    first_data_at: float
    """perf_counter() when the first chunk carrying an SSE ``data:`` line arrived (0: none)."""
    overhead_ms: float | None
    """The ``x-sidecar-overhead-ms`` header, when asked for and present."""


OnReply = Callable[["HttpConnection", Reply | None, str | None], None]
"""Called with (connection, reply, None) or (connection, None, error)."""


class _BadResponse(Exception):
    """The response does not follow the HTTP/1.1 framing this client supports."""


def _header(head: bytes, name: bytes) -> bytes | None:
    """Value of header ``name`` in a lower-cased response head (first occurrence)."""
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start:end if end >= 0 else None].strip()


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; parses Content-Length and chunked responses.

    Callbacks instead of coroutines keep the per-request cost to a few
    microseconds: the reply is handed over from ``data_received`` directly,
    and a closed-loop worker sends its next request from that callback.
    """

    def __init__(self, want_overhead: bool) -> None:
        self.transport: asyncio.Transport | None = None
        self.usable = False
        self._want_overhead = want_overhead
        self._buf = bytearray()
        self._on_reply: OnReply | None = None
        self._reset()

    def _reset(self) -> None:
        self._body_start = -1
        self._length = -1
        self._chunked = False
        self._scan = 0
        self._status = 0
        self._first_data_at = 0.0
        self._overhead: float | None = None
        self._close_after = False

    @property
    def busy(self) -> bool:
        """Whether a request is waiting for its response."""
        return self._on_reply is not None

    def send(self, payload: bytes, on_reply: OnReply) -> None:
        """Write a complete pre-built request; ``on_reply`` gets the outcome."""
        assert self._on_reply is None and self.transport is not None
        self._on_reply = on_reply
        self.transport.write(payload)

    def abort(self, reason: str) -> None:
        """Give up on the pending request (reported as ``reason``) and drop the connection."""
        self._fail(reason)

    def close(self) -> None:
        """Close the connection (idle or not)."""
        self.usable = False
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.usable = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("connection lost" if exc is None else f"connection lost ({type(exc).__name__})")

    def eof_received(self) -> bool | None:
        self.usable = False
        return None  # let the transport close; connection_lost reports a pending request

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._on_reply is None:
            self._fail("unexpected bytes on an idle connection")
            return
        buf = self._buf
        buf += data
        try:
            if self._body_start < 0 and not self._parse_head():
                return
            end = self._scan_chunks(now) if self._chunked else self._body_start + self._length
        except (_BadResponse, ValueError) as exc:
            self._fail(f"bad response: {exc}")
            return
        if end < 0 or len(buf) < end:
            return
        if len(buf) > end:
            self._fail("bytes after the response")
            return
        buf.clear()
        reply = Reply(self._status, now, self._first_data_at, self._overhead)
        close_after = self._close_after
        self._reset()
        on_reply, self._on_reply = self._on_reply, None
        if close_after:
            self.close()
        on_reply(self, reply, None)

    # -- parsing

    def _parse_head(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                raise _BadResponse("response head too large")
            return False
        head = bytes(buf[:end]).lower()
        if not head.startswith(b"http/1.1 "):
            raise _BadResponse("not an HTTP/1.1 status line")
        self._status = int(head[9:12])
        encoding = _header(head, b"transfer-encoding")
        length = _header(head, b"content-length")
        if encoding is not None and b"chunked" in encoding:
            self._chunked = True
        elif length is not None:
            self._length = int(length)
        elif self._status in (204, 304):
            self._length = 0
        else:
            raise _BadResponse("no Content-Length and not chunked")
        self._close_after = _header(head, b"connection") == b"close"
        if self._want_overhead:
            overhead = _header(head, b"x-sidecar-overhead-ms")
            self._overhead = float(overhead) if overhead else None
        self._body_start = self._scan = end + 4
        return True

    def _scan_chunks(self, now: float) -> int:
        """Advance over complete chunks; the message's end offset, or -1 for "need more"."""
        buf = self._buf
        pos = self._scan
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                return -1
            size = int(bytes(buf[pos:nl]).split(b";", 1)[0], 16)
            if size == 0:
                # Last chunk, optional trailers, then an empty line.
                end = buf.find(b"\r\n\r\n", nl)
                return -1 if end < 0 else end + 4
            data_end = nl + 2 + size
            if len(buf) < data_end + 2:
                return -1
            if not self._first_data_at and buf.find(b"data:", nl + 2, data_end) >= 0:
                self._first_data_at = now
            pos = self._scan = data_end + 2

    def _fail(self, reason: str) -> None:
        self.usable = False
        on_reply, self._on_reply = self._on_reply, None
        if self.transport is not None:
            self.transport.abort()
        if on_reply is not None:
            on_reply(self, None, reason)


class Pool:
    """Keep-alive connections to one target."""

    def __init__(self, port: int, want_overhead: bool) -> None:
        self.port = port
        self.want_overhead = want_overhead
        self.idle: list[HttpConnection] = []
        self.opened: list[HttpConnection] = []

    async def connect(self) -> HttpConnection:
        """Open one more connection."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, conn = await loop.create_connection(
                lambda: HttpConnection(self.want_overhead), HOST, self.port)
        self.opened.append(conn)
        return conn

    async def fill(self, n: int) -> list[HttpConnection]:
        """Open ``n`` connections, add them to the idle list and return them."""
        conns = await asyncio.gather(*(self.connect() for _ in range(n)))
        self.idle.extend(conns)
        return list(conns)

    def take(self) -> HttpConnection | None:
        """An idle usable connection, or None."""
        while self.idle:
            conn = self.idle.pop()
            if conn.usable and not conn.busy:
                return conn
        return None

    def give(self, conn: HttpConnection) -> None:
        """Return a connection after its response."""
        if conn.usable:
            self.idle.append(conn)

    def abort_busy(self, reason: str) -> None:
        """Fail every request still waiting (used when a drain times out)."""
        for conn in self.opened:
            if conn.busy:
                conn.abort(reason)

    def close(self) -> None:
        """Close every connection."""
        for conn in self.opened:
            conn.close()
        self.opened.clear()
        self.idle.clear()


Payload = bytes | tuple[bytes, ...]
"""A target's pre-built request, or several sent in turn (e.g. one per agent id)."""


def payload_source(payload: Payload) -> Callable[[], bytes]:
    """A callable returning the request to send next (cycling through a tuple)."""
    # Both are C-level iterators: a few tens of ns per request on the generator.
    if isinstance(payload, bytes):
        return itertools.repeat(payload).__next__
    return itertools.cycle(payload).__next__


def build_request(port: int, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    """The complete HTTP/1.1 request bytes, built once per target."""
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: {HOST}:{port}",
        "Authorization: Bearer sk-bench",
        "Content-Type: application/json",
        "Accept: application/json",
        "User-Agent: llm-sidecar-bench/1",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (extra or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat_body(stream: bool, size: int = 1024) -> bytes:
    """A ~``size``-byte chat completion request (system + user message, temperature 0)."""
    doc: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system",
             "content": "You are a careful assistant that answers in one short paragraph."},
            {"role": "user", "content": ""},
        ],
        "temperature": 0,
    }
    if stream:
        doc["stream"] = True
    filler = "Summarise the benchmark methodology and list the sources of noise. "
    base = len(orjson.dumps(doc))
    text = (filler * (size // len(filler) + 1))[:max(0, size - base)]
    doc["messages"][1]["content"] = text
    return orjson.dumps(doc)


# ---------------------------------------------------------------------------
# Samples and statistics


@dataclass(slots=True)
class TargetRun:
    """Everything measured for one target in one scenario."""

    latencies_ms: list[float] = field(default_factory=list)
    """Open loop: response time (or TTFC) from the intended send time."""
    totals_ms: list[float] = field(default_factory=list)
    """Streaming: time to the end of the stream from the intended send time."""
    overhead_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    """How late the generator actually sent, vs the schedule."""
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    completed: int = 0
    """Successful responses (all blocks, drain included)."""
    in_window: int = 0
    """Closed loop: successful responses completed before the block deadline."""
    window_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per process (servers and generator) over this target's blocks."""
    block_ends: list[int] = field(default_factory=list)
    """Open loop: ``len(latencies_ms)`` after each recorded block (per-round statistics)."""
    intended_at: list[float] | None = None
    """Open loop, if a list: each ``latencies_ms`` entry's intended send time (perf_counter)."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """n, mean and the percentiles the report uses."""
    s = sorted(values)
    return {
        "n": len(s),
        "mean": sum(s) / len(s) if s else math.nan,
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "p99.9": percentile(s, 99.9),
        "max": s[-1] if s else math.nan,
    }


def cpu_ms_per_request(run: TargetRun, process: str) -> float:
    """CPU milliseconds ``process`` spent per successful request of this target."""
    if not run.completed or process not in run.cpu_s:
        return math.nan
    return run.cpu_s[process] * 1000.0 / run.completed


def summarize(run: TargetRun, proxy: str | None) -> dict[str, Any]:
    """The JSON-ready summary of one target in one scenario."""
    doc: dict[str, Any] = {
        "completed": run.completed,
        "errors": dict(run.errors),
        "latency_ms": distribution(run.latencies_ms),
        "send_lag_ms": distribution(run.send_lag_ms),
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "mock_cpu_ms_per_req": cpu_ms_per_request(run, "mock"),
        "proxy_cpu_ms_per_req": cpu_ms_per_request(run, proxy) if proxy else math.nan,
        "generator_cpu_util": (run.cpu_s.get("generator", math.nan) / run.wall_s
                               if run.wall_s else math.nan),
        # Keys with a colon ("sidecar:threads") are parts of a process already counted.
        "server_core_util": (sum(v for k, v in run.cpu_s.items()
                                 if k != "generator" and ":" not in k)
                             / run.wall_s if run.wall_s else math.nan),
    }
    if run.totals_ms:
        doc["stream_total_ms"] = distribution(run.totals_ms)
    if run.overhead_ms:
        doc["overhead_header_ms"] = distribution(run.overhead_ms)
    if run.window_s:
        doc["throughput_rps"] = run.in_window / run.window_s
        doc["in_window"] = run.in_window
        doc["window_s"] = run.window_s
    return doc


# ---------------------------------------------------------------------------
# Load: one block against one target


@dataclass(slots=True)
class Target:
    """A benchmarked endpoint and the process whose CPU it costs (None for direct)."""

    name: str
    port: int
    proxy: str | None


async def wait_until(t: float) -> None:
    """Sleep until perf_counter() reaches ``t``, accurate to well under a millisecond."""
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        await asyncio.sleep(left - SPIN_S if left > 2 * SPIN_S else 0)


class OpenBlock:
    """Sends ``n`` requests at a constant rate, each timed from its intended send time.

    Sending never waits for a response: an idle connection is taken from the
    pool (or a new one opened in a task), so a slow answer delays nothing else.
    """

    def __init__(self, pool: Pool, payload: Payload, run: TargetRun, stream: bool) -> None:
        self.pool = pool
        self.next_payload = payload_source(payload)
        self.run = run
        self.stream = stream
        self.inflight = 0
        self.scheduled_all = False
        self.drained = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    async def execute(self, rate: float, n: int) -> None:
        """Send on schedule, then wait (bounded) for every response."""
        start = time.perf_counter() + 0.001
        interval = 1.0 / rate
        for i in range(n):
            intended = start + i * interval
            await wait_until(intended)
            self._launch(intended)
        self.scheduled_all = True
        if self.inflight == 0:
            self.drained.set()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await self.drained.wait()
        except TimeoutError:
            self.pool.abort_busy("timeout")
            for task in list(self.tasks):
                task.cancel()

    def _launch(self, intended: float) -> None:
        self.inflight += 1
        conn = self.pool.take()
        if conn is not None:
            self._send(conn, intended)
            return
        task = asyncio.get_running_loop().create_task(self._connect_and_send(intended))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect_and_send(self, intended: float) -> None:
        try:
            conn = await self.pool.connect()
        except (OSError, TimeoutError) as exc:
            self._done(None, None, f"connect failed ({type(exc).__name__})", intended)
            return
        except asyncio.CancelledError:
            self._done(None, None, "timeout", intended)
            raise
        self._send(conn, intended)

    def _send(self, conn: HttpConnection, intended: float) -> None:
        self.run.send_lag_ms.append((time.perf_counter() - intended) * 1000.0)
        conn.send(self.next_payload(),
                  lambda c, reply, error: self._done(c, reply, error, intended))

    def _done(self, conn: HttpConnection | None, reply: Reply | None, error: str | None,
              intended: float) -> None:
        self.inflight -= 1
        run = self.run
        if reply is None:
            run.errors[error or "error"] += 1
        elif reply.status != 200:
            run.errors[f"HTTP {reply.status}"] += 1
        elif self.stream and not reply.first_data_at:
            run.errors["stream without data"] += 1
        else:
            run.completed += 1
            if self.stream:
                run.latencies_ms.append((reply.first_data_at - intended) * 1000.0)
                run.totals_ms.append((reply.done_at - intended) * 1000.0)
            else:
                run.latencies_ms.append((reply.done_at - intended) * 1000.0)
            if run.intended_at is not None:
                run.intended_at.append(intended)
            if reply.overhead_ms is not None:
                run.overhead_ms.append(reply.overhead_ms)
        if conn is not None:
            self.pool.give(conn)
        if self.inflight == 0 and self.scheduled_all:
            self.drained.set()


class ClosedBlock:
    """Every connection sends back to back until the deadline (one worker per connection)."""

    def __init__(self, conns: list[HttpConnection], payload: Payload, run: TargetRun) -> None:
        self.conns = conns
        self.next_payload = payload_source(payload)
        self.run = run
        self.deadline = 0.0
        self.active = 0
        self.finished = asyncio.Event()

    async def execute(self, seconds: float) -> None:
        """Run for ``seconds``, then wait (bounded) for the requests still in flight."""
        self.deadline = time.perf_counter() + seconds
        workers = [c for c in self.conns if c.usable and not c.busy]
        self.active = len(workers)
        self.run.window_s += seconds
        if not workers:
            self.run.errors["no usable connection"] += 1
            return
        for conn in workers:
            conn.send(self.next_payload(), self._done)
        try:
            async with asyncio.timeout(seconds + DRAIN_TIMEOUT_S):
                await self.finished.wait()
        except TimeoutError:
            for conn in self.conns:
                if conn.busy:
                    conn.abort("timeout")

    def _done(self, conn: HttpConnection, reply: Reply | None, error: str | None) -> None:
        run = self.run
        if reply is None:
            run.errors[error or "error"] += 1
        elif reply.status != 200:
            run.errors[f"HTTP {reply.status}"] += 1
        else:
            run.completed += 1
            if reply.done_at <= self.deadline:
                run.in_window += 1
        if conn.usable and time.perf_counter() < self.deadline:
            conn.send(self.next_payload(), self._done)
            return
        self.active -= 1
        if self.active == 0:
            self.finished.set()


@contextlib.contextmanager
def metered(meter: CpuMeter, run: TargetRun) -> Iterator[None]:
    """Charge the CPU and wall time of the enclosed block to ``run``.

    The collector is paused inside the block: a collection pause in the
    generator would land on whichever target happens to be active.
    """
    gc.collect()
    gc.disable()
    before = meter.snapshot()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        run.wall_s += time.perf_counter() - t0
        after = meter.snapshot()
        for name, value in after.items():
            run.cpu_s[name] = run.cpu_s.get(name, 0.0) + value - before[name]
        gc.enable()


def rotation(targets: Sequence[Target], rounds: int) -> Iterator[tuple[int, Target]]:
    """(round, target) pairs; each round starts one target later so no one always follows."""
    for r in range(rounds):
        for i in range(len(targets)):
            yield r, targets[(r + i) % len(targets)]


# ---------------------------------------------------------------------------
# Scenarios


def open_loop_shape(plan: Plan, rate: int, requests: int) -> tuple[float, int, int]:
    """(block seconds, requests per block, rounds) for ``requests`` per target at ``rate``."""
    block_s = min(plan.max_block_s, max(plan.min_block_s, requests / (rate * plan.min_rounds)))
    per_block = max(1, round(rate * block_s))
    rounds = max(plan.min_rounds, math.ceil(requests / per_block))
    return block_s, per_block, rounds


async def settle(target: Target, settle_s: Mapping[str, float] | None) -> None:
    """Wait ``settle_s[target]`` seconds after a block, if given (see ``open_loop``)."""
    pause = settle_s.get(target.name, 0.0) if settle_s else 0.0
    if pause > 0:
        await asyncio.sleep(pause)


def warmup_requests(plan: Plan, rate: int) -> int:
    """Requests in each target's unrecorded warm-up block of an open loop at ``rate``."""
    return max(1, round(rate * plan.warmup_s))


async def open_loop(targets: Sequence[Target], payloads: Mapping[str, Payload], meter: CpuMeter,
                    plan: Plan, rate: int, requests: int, stream: bool,
                    label: str, settle_s: Mapping[str, float] | None = None,
                    warmups: dict[str, TargetRun] | None = None,
                    keep_times: bool = False) -> dict[str, TargetRun]:
    """Interleaved open-loop blocks at ``rate`` req/s per active target.

    ``settle_s`` keeps metering a target for that many seconds after each of
    its blocks, so background work its requests caused (a batched span
    export) is charged to it and does not land in the next target's block.
    ``warmups``, if given, receives each target's unrecorded warm-up run.
    ``keep_times`` records each request's intended send time (``intended_at``).
    """
    block_s, per_block, rounds = open_loop_shape(plan, rate, requests)
    pools = {t.name: Pool(t.port, t.name.startswith("sidecar")) for t in targets}
    runs = {t.name: TargetRun(intended_at=[] if keep_times else None) for t in targets}
    try:
        for t in targets:
            await pools[t.name].fill(plan.open_pool)
        for t in targets:  # warm-up, not recorded
            warm = TargetRun()
            if warmups is not None:
                warmups[t.name] = warm
            await OpenBlock(pools[t.name], payloads[t.name], warm, stream).execute(
                rate, warmup_requests(plan, rate))
            await settle(t, settle_s)
        for _, t in rotation(targets, rounds):
            with metered(meter, runs[t.name]):
                await OpenBlock(pools[t.name], payloads[t.name], runs[t.name], stream).execute(
                    rate, per_block)
                await settle(t, settle_s)
            runs[t.name].block_ends.append(len(runs[t.name].latencies_ms))
    finally:
        for pool in pools.values():
            pool.close()
    done = {name: run.completed for name, run in runs.items()}
    print(f"  {label}: {rounds} rounds x {block_s:.2f}s blocks, completed {done}", flush=True)
    return runs


async def closed_loop(targets: Sequence[Target], payloads: Mapping[str, Payload], meter: CpuMeter,
                      plan: Plan, settle_s: Mapping[str, float] | None = None,
                      warmups: dict[str, TargetRun] | None = None) -> dict[str, TargetRun]:
    """Interleaved closed-loop blocks: ``plan.workers`` connections sending back to back.

    ``settle_s``, ``warmups``: as for ``open_loop`` (throughput counts only the block).
    """
    pools = {t.name: Pool(t.port, False) for t in targets}
    runs = {t.name: TargetRun() for t in targets}
    try:
        conns = {t.name: await pools[t.name].fill(plan.workers) for t in targets}
        for t in targets:  # warm-up: lets the proxies open their upstream pools
            warm = TargetRun()
            if warmups is not None:
                warmups[t.name] = warm
            await ClosedBlock(conns[t.name], payloads[t.name], warm).execute(0.5)
            await settle(t, settle_s)
        for _, t in rotation(targets, plan.closed_rounds):
            with metered(meter, runs[t.name]):
                await ClosedBlock(conns[t.name], payloads[t.name], runs[t.name]).execute(
                    plan.closed_block_s)
                await settle(t, settle_s)
    finally:
        for pool in pools.values():
            pool.close()
    rps = {name: round(run.in_window / run.window_s) for name, run in runs.items()}
    print(f"  closed loop: {plan.closed_rounds} rounds x {plan.closed_block_s}s, req/s {rps}",
          flush=True)
    return runs


# ---------------------------------------------------------------------------
# Profile


@dataclass(slots=True)
class Profile:
    """py-spy result: aggregated frames, or why there is none."""

    ok: bool
    message: str
    samples: int = 0
    expected_samples: int = 0
    self_top: list[tuple[str, int]] = field(default_factory=list)
    inclusive_top: list[tuple[str, int]] = field(default_factory=list)
    by_package: list[tuple[str, int]] = field(default_factory=list)
    throughput_rps: float = 0.0


def _package(frame: str) -> str:
    """Coarse owner of a frame such as ``handle (proxy/pipeline.py:160)``."""
    where = frame.rpartition(" (")[2].rstrip(")")
    path = where.rpartition(":")[0] or where
    if path.startswith("proxy/"):
        return "proxy/" + path.split("/")[1].removesuffix(".py")
    if "/" in path:
        return path.split("/")[0]
    return path.removesuffix(".py")  # stdlib modules are shown without a package


def aggregate_stacks(lines: Sequence[str], top: int = 15) -> Profile:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.strip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):  # a recursive function counts once per sample
            inclusive[frame] += count
    # Entry points (<module>, main, Runner.run) are on every stack and say nothing.
    shown = [(f, c) for f, c in inclusive.most_common() if c < total]
    return Profile(True, "", total, 0, own.most_common(top), shown[:top],
                   packages.most_common(12))


async def profile_sidecar(target: Target, pid: int, payload: bytes, plan: Plan,
                          out_dir: Path, name: str = "sidecar") -> Profile:
    """Record the sidecar with py-spy while a closed loop keeps it busy.

    The raw stacks go to ``out_dir/{name}-profile.txt``.
    """
    spy = Path(sys.executable).parent / "py-spy"
    raw_path = out_dir / f"{name}-profile.txt"
    log_path = out_dir / ("py-spy.log" if name == "sidecar" else f"py-spy-{name}.log")
    rate = 200
    seconds = max(1, round(plan.profile_s))
    pool = Pool(target.port, False)
    try:
        conns = await pool.fill(plan.workers)
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                str(spy), "record", "--format", "raw", "--function", "-r", str(rate),
                "-d", str(seconds), "--pid", str(pid), "-o", str(raw_path),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        run = TargetRun()
        # Keep the load on a little longer than py-spy samples.
        await ClosedBlock(conns, payload, run).execute(seconds + 1.5)
        try:
            async with asyncio.timeout(20):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            code = -1
    except OSError as exc:
        return Profile(False, f"py-spy could not run: {exc}")
    finally:
        pool.close()
    log_text = log_path.read_text(errors="replace").strip()
    if code != 0 or not raw_path.exists():
        return Profile(False, f"py-spy failed (exit {code}): {log_text[-500:]}")
    prof = aggregate_stacks(raw_path.read_text(errors="replace").splitlines())
    prof.expected_samples = rate * seconds
    prof.throughput_rps = run.in_window / run.window_s if run.window_s else 0.0
    prof.message = log_text.splitlines()[-2] if log_text.count("\n") else log_text
    return prof


# ---------------------------------------------------------------------------
# Machine description and pinning


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, Python and library versions, load average."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "aiohttp": aiohttp.__version__,
        "uvloop": importlib.metadata.version("uvloop"),
        "loadavg_start": os.getloadavg(),
        "git": git_revision(),
    }


def git_revision(paths: Sequence[str] = ("proxy", "loadtest")) -> str:
    """The measured commit, plus the files under ``paths`` changed since."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths],
                               cwd=ROOT, text=True, capture_output=True, timeout=10,
                               check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # The report and raw results themselves do not make the code dirty.
    changed = [line for line in dirty.splitlines()
               if not line.endswith(("REPORT.md", "REPORT-telemetry.md", "REPORT-ratelimit.md",
                                     "REPORT-semantic.md", "REPORT-cache.md",
                                     "REPORT-workload.md",
                                     "results/"))]
    if not changed:
        return rev
    return f"{rev} + local changes in " + ", ".join(line[3:] for line in changed)


def choose_cpus(servers: str = "mock, relay and sidecar") -> tuple[int | None, int | None, str]:
    """(generator CPU, server CPU, description); no pinning with fewer than two CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None, (f"only {len(allowed)} CPU available: NOT pinned; generator and "
                            "servers share the CPU, so latencies include their contention")
    gen, srv = allowed[0], allowed[1]
    return gen, srv, (f"load generator pinned to CPU {gen} (sched_setaffinity); {servers} "
                      f"pinned together to CPU {srv} (taskset -c {srv})")


# ---------------------------------------------------------------------------
# The whole run


@dataclass(slots=True)
class Results:
    """Everything the report needs."""

    plan: Plan
    command: str
    started: str
    machine: dict[str, Any]
    pinning: str
    duration_s: float = 0.0
    open_loop: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    closed_loop: dict[str, dict[str, Any]] = field(default_factory=dict)
    ttfc: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile: Profile | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _proxy_of(name: str) -> str | None:
    return None if name == "direct" else name


def _record(results: Results, key: str, runs: dict[str, TargetRun]) -> dict[str, dict[str, Any]]:
    results.raw[key] = {name: {"latencies_ms": [round(x, 4) for x in run.latencies_ms],
                               "totals_ms": [round(x, 4) for x in run.totals_ms],
                               "overhead_ms": run.overhead_ms}
                        for name, run in runs.items()}
    return {name: summarize(run, _proxy_of(name)) for name, run in runs.items()}


async def run_scenarios(results: Results, servers: dict[str, Server], plan: Plan,
                        with_profile: bool, out_dir: Path) -> None:
    """Run every scenario against the started servers and fill ``results``."""
    targets = [Target("direct", servers["mock"].port, None),
               Target("relay", servers["relay"].port, "relay"),
               Target("sidecar", servers["sidecar"].port, "sidecar")]
    meter = CpuMeter(servers)
    body = chat_body(stream=False)
    stream_body = chat_body(stream=True)
    payloads = {t.name: build_request(t.port, body) for t in targets}
    stream_payloads = {t.name: build_request(t.port, stream_body, STREAM_HEADERS)
                       for t in targets}
    results.machine["request_body_bytes"] = len(body)

    for rate in plan.rates:
        runs = await open_loop(targets, payloads, meter, plan, rate, plan.open_requests,
                               False, f"open loop {rate} req/s")
        results.open_loop[rate] = _record(results, f"open_{rate}", runs)
    runs = await closed_loop(targets, payloads, meter, plan)
    results.closed_loop = _record(results, "closed", runs)
    runs = await open_loop(targets, stream_payloads, meter, plan, plan.ttfc_rate,
                           plan.ttfc_requests, True, f"streaming TTFC {plan.ttfc_rate} req/s")
    results.ttfc = _record(results, "ttfc", runs)
    if with_profile:
        print("  profiling the sidecar with py-spy ...", flush=True)
        results.profile = await profile_sidecar(targets[2], servers["sidecar"].pid,
                                                payloads["sidecar"], plan, out_dir)
        print(f"  profile: {'ok' if results.profile.ok else results.profile.message}",
              flush=True)


class RunSetup(NamedTuple):
    """A run's time stamp, output directory and CPU placement."""

    stamp: str
    out_dir: Path
    server_cpu: int | None
    pinning: str
    started: str


def prepare_run(servers: str = "mock, relay and sidecar") -> RunSetup:
    """Create the run's output directory and pin this process to the generator CPU."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS_DIR / f"run-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    gen_cpu, srv_cpu, pinning = choose_cpus(servers)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return RunSetup(stamp, out_dir, srv_cpu, pinning, started)


def run_benchmark(plan: Plan, with_profile: bool, command: str) -> Results:
    """Start the servers, run the scenarios, stop the servers (always)."""
    stamp, out_dir, srv_cpu, pinning, started = prepare_run()
    results = Results(plan, command, started, machine_info(), pinning)
    results.raw["stamp"] = stamp
    t0 = time.perf_counter()
    servers = start_servers(out_dir, srv_cpu)
    try:
        print(f"servers up (logs in {out_dir.relative_to(ROOT)}); {pinning}", flush=True)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run_scenarios(results, servers, plan, with_profile, out_dir))
    finally:
        for server in servers.values():
            stop_server(server)
    results.duration_s = time.perf_counter() - t0
    results.machine["loadavg_end"] = os.getloadavg()
    return results


# ---------------------------------------------------------------------------
# Checks and report


@dataclass(frozen=True, slots=True)
class Check:
    """One acceptance target and whether it was met."""

    name: str
    measured: str
    limit: str
    ok: bool


def added(results_by_target: dict[str, dict[str, Any]], target: str, q: str,
          key: str = "latency_ms") -> float:
    """percentile(target) - percentile(direct) in ms."""
    return float(results_by_target[target][key][q] - results_by_target["direct"][key][q])


def throughput_ratio(r: Results) -> float:
    """Sidecar throughput over relay throughput in the closed loop."""
    relay = r.closed_loop["relay"].get("throughput_rps", 0.0)
    sidecar = r.closed_loop["sidecar"].get("throughput_rps", 0.0)
    return sidecar / relay if relay else math.nan


def total_errors(r: Results) -> dict[str, int]:
    """Errors per scenario/target, only where there were some."""
    found: dict[str, int] = {}
    scenarios: list[tuple[str, dict[str, dict[str, Any]]]] = [
        *((f"open {rate}", runs) for rate, runs in r.open_loop.items()),
        ("closed", r.closed_loop), ("ttfc", r.ttfc)]
    for label, runs in scenarios:
        for name, doc in runs.items():
            n = sum(doc["errors"].values())
            if n:
                found[f"{label}/{name}"] = n
    return found


def checks(r: Results) -> list[Check]:
    """Evaluate the sidecar's targets."""
    out: list[Check] = []
    for rate, runs in r.open_loop.items():
        p50, p99 = added(runs, "sidecar", "p50"), added(runs, "sidecar", "p99")
        out.append(Check(f"added p50 @ {rate} req/s", f"{p50:.3f} ms",
                         f"<= {MAX_ADDED_P50_MS} ms", p50 <= MAX_ADDED_P50_MS))
        out.append(Check(f"added p99 @ {rate} req/s", f"{p99:.3f} ms",
                         f"<= {MAX_ADDED_P99_MS} ms", p99 <= MAX_ADDED_P99_MS))
    ratio = throughput_ratio(r)
    out.append(Check("max throughput sidecar/relay", f"{ratio:.2f}",
                     f">= {MIN_THROUGHPUT_RATIO}", ratio >= MIN_THROUGHPUT_RATIO))
    ttfc = added(r.ttfc, "sidecar", "p50")
    out.append(Check("added TTFC p50", f"{ttfc:.3f} ms", f"<= {MAX_ADDED_TTFC_P50_MS} ms",
                     ttfc <= MAX_ADDED_TTFC_P50_MS))
    errs = total_errors(r)
    out.append(Check("zero errors", ", ".join(f"{k}: {v}" for k, v in errs.items()) or "0",
                     "0", not errs))
    return out


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _errors_text(doc: dict[str, Any]) -> str:
    errs: dict[str, int] = doc["errors"]
    return ", ".join(f"{k}: {v}" for k, v in errs.items()) if errs else "0"


def report_open_loop(r: Results) -> list[str]:
    """Summary of added latency, then one detailed table per rate."""
    rows = []
    for rate, runs in r.open_loop.items():
        s50, s99 = added(runs, "sidecar", "p50"), added(runs, "sidecar", "p99")
        verdict = "PASS" if s50 <= MAX_ADDED_P50_MS and s99 <= MAX_ADDED_P99_MS else "FAIL"
        rows.append([str(rate), _signed(added(runs, "relay", "p50")),
                     _signed(added(runs, "relay", "p99")), _signed(s50), _signed(s99),
                     verdict])
    out = ["## Added latency (open loop, vs direct)", "",
           f"Target for the sidecar: added p50 <= {MAX_ADDED_P50_MS} ms and p99 <= "
           f"{MAX_ADDED_P99_MS} ms. The relay row is the Python/aiohttp floor.", "",
           *_table(["rate (req/s)", "relay +p50 ms", "relay +p99 ms", "sidecar +p50 ms",
                    "sidecar +p99 ms", "sidecar"], rows), ""]
    for rate, runs in r.open_loop.items():
        out += [f"### Open loop {rate} req/s", ""]
        out += _table(["target", "ok", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                       "max ms", "proxy CPU ms/req", "mock CPU ms/req"],
                      [[name, str(doc["completed"]), _errors_text(doc),
                        _f(doc["latency_ms"]["p50"]), _f(doc["latency_ms"]["p90"]),
                        _f(doc["latency_ms"]["p99"]), _f(doc["latency_ms"]["p99.9"]),
                        _f(doc["latency_ms"]["max"]), _f(doc["proxy_cpu_ms_per_req"]),
                        _f(doc["mock_cpu_ms_per_req"])] for name, doc in runs.items()])
        head = runs["sidecar"].get("overhead_header_ms")
        lag = runs["direct"]["send_lag_ms"]
        h50, h99 = (_f(head["p50"]), _f(head["p99"])) if head else ("n/a", "n/a")
        out += ["", f"Sidecar's own `x-sidecar-overhead-ms`: p50 {h50} ms, p99 {h99} ms. "
                f"Generator send lag behind schedule (direct blocks): p50 {_f(lag['p50'])} ms, "
                f"p99 {_f(lag['p99'])} ms.", ""]
    return out


def report_closed_loop(r: Results) -> list[str]:
    """Throughput table, ratio and the generator-saturation verdict."""
    cl = r.closed_loop
    rows = []
    for name, doc in cl.items():
        cpu = doc["proxy_cpu_ms_per_req"]
        rows.append([name, _f(doc.get("throughput_rps", math.nan), 0), _errors_text(doc),
                     _f(cpu), _f(1000.0 / cpu, 0) if cpu and not math.isnan(cpu) else "n/a",
                     _f(doc["mock_cpu_ms_per_req"]), f"{doc['server_core_util']:.0%}",
                     f"{doc['generator_cpu_util']:.0%}"])
    ratio = throughput_ratio(r)
    gen_max = max(doc["generator_cpu_util"] for doc in cl.values())
    rps = [doc.get("throughput_rps", 0.0) for doc in cl.values()]
    flat = max(rps) > 0 and (max(rps) - min(rps)) / max(rps) < 0.1
    if gen_max >= GENERATOR_BUSY or flat:
        verdict = (f"The generator may be the bottleneck (its CPU peaked at {gen_max:.0%}"
                   f"{', and all three targets reach about the same throughput' if flat else ''}).")
    else:
        verdict = (f"The generator is not the bottleneck: its CPU peaked at {gen_max:.0%} of its "
                   "core while the server core was saturated.")
    return ["## Max throughput (closed loop)", "",
            f"{r.plan.workers} connections send back to back; blocks of {r.plan.closed_block_s} s "
            f"rotate between targets for {r.plan.closed_rounds} rounds. Mock and proxy share one "
            "core, so a proxied target's throughput is 1 / (proxy CPU + mock CPU) per request; "
            "'proxy-only req/s' is 1000 / proxy CPU ms per request, what the proxy alone could "
            "serve on a dedicated core.", "",
            *_table(["target", "req/s", "errors", "proxy CPU ms/req", "proxy-only req/s",
                     "mock CPU ms/req", "server core busy", "generator CPU"], rows), "",
            f"Sidecar / relay throughput: **{_f(ratio, 2)}** (target >= {MIN_THROUGHPUT_RATIO}: "
            f"{'PASS' if ratio >= MIN_THROUGHPUT_RATIO else 'FAIL'}). {verdict}", ""]


def report_ttfc(r: Results) -> list[str]:
    """Streaming time-to-first-chunk table."""
    rows = []
    for name, doc in r.ttfc.items():
        lat = doc["latency_ms"]
        total = doc.get("stream_total_ms", {})
        plus50 = added(r.ttfc, name, "p50") if name != "direct" else math.nan
        plus99 = added(r.ttfc, name, "p99") if name != "direct" else math.nan
        rows.append([name, str(doc["completed"]), _errors_text(doc), _f(lat["p50"]),
                     _f(lat["p99"]), _signed(plus50), _signed(plus99),
                     _f(total.get("p50", math.nan)), _f(doc["proxy_cpu_ms_per_req"])])
    hdrs = ", ".join(f"`{k}: {v}`" for k, v in STREAM_HEADERS.items())
    return [f"## Streaming: time to first chunk ({r.plan.ttfc_rate} req/s open loop)", "",
            f"`stream: true` with {hdrs}: the mock sends the stream head at once, the first "
            "`data:` chunk after 20 ms, then 16 tokens paced at 400/s. TTFC is measured from "
            "the intended send time to the arrival of the first chunk carrying a `data:` line.",
            "", *_table(["target", "ok", "errors", "TTFC p50 ms", "TTFC p99 ms", "added p50",
                         "added p99", "full stream p50 ms", "proxy CPU ms/req"], rows), ""]


def _frame(frame: str) -> str:
    return "`" + frame.replace("|", "\\|") + "`"


def report_profile(r: Results) -> list[str]:
    """Top functions by self and inclusive time from py-spy."""
    prof = r.profile
    if prof is None:
        return ["## Profile", "", "Not run (pass `--profile`).", ""]
    if not prof.ok:
        return ["## Profile", "", f"py-spy did not produce a profile: {prof.message}", ""]
    out = ["## Profile of the sidecar (py-spy)", "",
           f"`py-spy record --format raw --function -r 200 -d {round(r.plan.profile_s)}` on the "
           f"sidecar during a closed-loop run against it alone ({_f(prof.throughput_rps, 0)} "
           f"req/s while sampled; py-spy pauses the process for each sample, so this run is "
           f"slower). {prof.samples} non-idle samples of {prof.expected_samples} taken "
           f"(the rest: waiting in the event loop). Percentages are of non-idle samples; "
           "raw stacks in `loadtest/results/.../sidecar-profile.txt`.", "",
           "py-spy charges time spent in C code and system calls to the Python frame that "
           "called it: `StreamWriter._writelines` is the socket write (`transport.writelines`;"
           " on loopback the kernel's send path also does most of the receiver's TCP work), "
           "and `Runner.run` stands for uvloop's C event loop itself (epoll, socket reads, "
           "callback dispatch).", "",
           *profile_tables(prof)]
    return [*out, ""]


def profile_tables(prof: Profile) -> list[str]:
    """Self time, inclusive time and self time by package, as markdown tables."""
    n = prof.samples or 1
    out = ["### Top functions by self time (own frame)", ""]
    out += _table(["#", "function (file:first line)", "samples", "%"],
                  [[str(i), _frame(f), str(c), f"{c / n:.1%}"]
                   for i, (f, c) in enumerate(prof.self_top, 1)])
    out += ["", "### Top functions by inclusive time (entry points on every stack omitted)",
            ""]
    out += _table(["#", "function (file:first line)", "samples", "%"],
                  [[str(i), _frame(f), str(c), f"{c / n:.1%}"]
                   for i, (f, c) in enumerate(prof.inclusive_top, 1)])
    out += ["", "### Self time by package", ""]
    out += _table(["package / module", "samples", "%"],
                  [[f"`{p}`", str(c), f"{c / n:.1%}"] for p, c in prof.by_package])
    return out


def reading(r: Results) -> list[str]:
    """Observations computed from the numbers (the 'why' needs the profile and judgement)."""
    lines = []
    for rate, runs in r.open_loop.items():
        s50, s99 = added(runs, "sidecar", "p50"), added(runs, "sidecar", "p99")
        r50, r99 = added(runs, "relay", "p50"), added(runs, "relay", "p99")
        miss = []
        if s50 > MAX_ADDED_P50_MS:
            miss.append(f"p50 {s50:.3f} > {MAX_ADDED_P50_MS}")
        if s99 > MAX_ADDED_P99_MS:
            miss.append(f"p99 {s99:.3f} > {MAX_ADDED_P99_MS}")
        lines.append(f"- {rate} req/s: sidecar adds {s50:.3f} ms at p50 and {s99:.3f} ms at p99 "
                     f"(relay: {r50:.3f} / {r99:.3f} ms); "
                     + (f"misses: {', '.join(miss)}." if miss else "within target."))
    top_rate = max(r.open_loop)
    head = r.open_loop[top_rate]["sidecar"].get("overhead_header_ms")
    if head:
        outside = added(r.open_loop[top_rate], "sidecar", "p50")
        lines.append(
            f"- The sidecar's own `x-sidecar-overhead-ms` at {top_rate} req/s is p50 "
            f"{head['p50']:.3f} ms: it counts only the time outside the upstream exchange. The "
            f"added latency measured from outside ({outside:.3f} ms) also contains the extra "
            "hop itself (aiohttp client, a second connection, a "
            "second HTTP parse and write), which the relay pays as well.")
    cl = r.closed_loop
    s_cpu, r_cpu = cl["sidecar"]["proxy_cpu_ms_per_req"], cl["relay"]["proxy_cpu_ms_per_req"]
    lines.append(f"- CPU per request (closed loop): sidecar {s_cpu:.3f} ms vs relay {r_cpu:.3f} ms "
                 f"({s_cpu / r_cpu:.2f}x); the mock needs {cl['direct']['mock_cpu_ms_per_req']:.3f}"
                 f" ms. Throughput ratio sidecar/relay {throughput_ratio(r):.2f}.")
    t50 = added(r.ttfc, "sidecar", "p50")
    lines.append(f"- Streaming: sidecar adds {t50:.3f} ms to the first chunk at p50 "
                 f"(relay {added(r.ttfc, 'relay', 'p50'):.3f} ms).")
    prof = r.profile
    if prof is not None and prof.ok and prof.samples:
        top = ", ".join(f"{_frame(f)} {c / prof.samples:.0%}" for f, c in prof.self_top[:3])
        pk = ", ".join(f"{p} {c / prof.samples:.0%}" for p, c in prof.by_package[:4])
        lines.append(f"- Profile: top self-time frames {top}; by package: {pk}.")
    la0, la1 = r.machine["loadavg_start"], r.machine.get("loadavg_end", (math.nan,) * 3)
    lines.append(f"- Noise: load average {la0[0]:.2f} at start, {la1[0]:.2f} at the end "
                 f"(on {r.machine['nproc']} CPUs); interleaving spreads it over all targets.")
    return lines


def render_report(r: Results, json_path: Path) -> str:
    """The whole markdown report."""
    m = r.machine
    out = ["# llm-sidecar performance benchmark", "",
           f"- Date: {r.started} ({r.plan.name} run, {r.duration_s:.0f} s)",
           f"- Command: `{r.command}`",
           f"- Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; "
           f"Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}",
           f"- Code: git {m['git']}",
           f"- Pinning: {r.pinning}",
           f"- Raw results: `{json_path.relative_to(ROOT)}`", "",
           "## Method", "",
           "- Targets: `direct` (client -> mock), `relay` (client -> `loadtest/relay_baseline.py`"
           ", a minimal aiohttp relay: the Python floor) and `sidecar` (client -> llm-sidecar ->"
           " mock; embedded defaults except `SIDECAR_CACHE__ENABLED=false`, since the requests "
           "repeat and would otherwise be cache hits). The mock answers with zero latency in the "
           "latency runs, so differences are pure proxy cost. All servers run on uvloop.",
           f"- Request: the same pre-serialised {m['request_body_bytes']}-byte chat completion "
           "(gpt-4o-mini, system + user message, temperature 0) with `Authorization: Bearer "
           "sk-bench`, sent over keep-alive connections by a minimal HTTP/1.1 client on raw "
           "asyncio protocols (pre-built request bytes, Content-Length and chunked parsing).",
           "- Interleaving: blocks of 0.5-1.5 s rotate direct -> relay -> sidecar (each round "
           "starts one target later), so machine noise hits the three targets alike; each "
           "scenario starts with an unrecorded warm-up block per target.",
           f"- Open loop: constant arrival schedule at 100/300/1000 req/s (per target, while its "
           f"block is active), {r.plan.open_requests} requests per target per rate; latency is "
           "measured from the *intended* send time, and sending never waits for a response "
           "(no coordinated omission). Added latency = percentile(target) - percentile(direct).",
           "- CPU per request: server CPU time (`/proc/PID/task/*/schedstat`, ns) before and "
           "after each block, divided by the requests completed in it.",
           "- The generator's garbage collector is paused within blocks (collected between).",
           ""]
    out += ["## Results against targets", ""]
    out += [f"- **{'PASS' if c.ok else 'FAIL'}** {c.name}: {c.measured} (target {c.limit})"
            for c in checks(r)]
    out += ["", *report_open_loop(r), *report_closed_loop(r), *report_ttfc(r),
            *report_profile(r), "## Reading the numbers", "", *reading(r), ""]
    return "\n".join(out)


def write_outputs(r: Results, out: Path) -> Path:
    """Write the JSON results and the markdown report; returns the JSON path."""
    json_path = RESULTS_DIR / f"bench-{r.raw['stamp']}.json"
    doc = {"plan": asdict(r.plan), "command": r.command, "started": r.started,
           "duration_s": r.duration_s, "machine": r.machine, "pinning": r.pinning,
           "open_loop": r.open_loop, "closed_loop": r.closed_loop, "ttfc": r.ttfc,
           "profile": asdict(r.profile) if r.profile else None,
           "checks": [asdict(c) for c in checks(r)], "samples": r.raw}
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))
    out.write_text(render_report(r, json_path))
    return json_path


# ---------------------------------------------------------------------------
# Telemetry cost (--telemetry): OTLP export at 100 % sampling vs telemetry off

OTEL = "sidecar-otel"
OFF = "sidecar-off"
TELEMETRY_KEY_RATE = 500
MAX_TELEMETRY_ADDED_P99_MS = 0.2
# The agent's trace context: a sampled parent, so the sidecar continues this trace.
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BSP_SCHEDULE_DELAY_MS = 1000
METRIC_EXPORT_INTERVAL_MS = 5000
# Metered idle time after each sidecar-otel block: one batch-export period plus margin.
OTEL_SETTLE_S = BSP_SCHEDULE_DELAY_MS / 1000 + 0.25
SPANS_PER_REQUEST = 2
IDLE_LEAF = "Condition.wait (threading.py:"
"""The request span and its ``llm_sidecar.upstream`` child."""
BOOTSTRAP_RESAMPLES = 400
BURST_GAP = 5
EXPORT_NEAR_S = 0.05
BURST_MIN = 3
# The SDK's default OTEL_BSP_MAX_EXPORT_BATCH_SIZE: a full batch wakes the export thread.
BSP_MAX_EXPORT_BATCH = 512

TELEMETRY_FULL = Plan("full", open_requests=3000, min_rounds=6, min_block_s=0.5, max_block_s=3.0,
                      warmup_s=0.4, ttfc_requests=0, closed_block_s=2.0, closed_rounds=5,
                      profile_s=10.0, rates=(100, TELEMETRY_KEY_RATE, 1000))
TELEMETRY_QUICK = Plan("quick", open_requests=300, min_rounds=2, min_block_s=0.5,
                       max_block_s=1.5, warmup_s=0.2, ttfc_requests=0, closed_block_s=1.0,
                       closed_rounds=2, profile_s=3.0, rates=(100, TELEMETRY_KEY_RATE, 1000))

# Profile frames that are telemetry work (matched anywhere on a stack), by where it happens.
TELEMETRY_FRAMES: tuple[tuple[str, str], ...] = (
    ("request path: trace context in (`TelemetryStage.on_request`)",
     "TelemetryStage.on_request ("),
    ("after the answer: spans built (`TelemetryStage._emit_spans`)",
     "TelemetryStage._emit_spans ("),
    ("  of which span end -> batch queue (`BatchSpanProcessor.on_end`)",
     "BatchSpanProcessor.on_end ("),
    ("after the answer: metrics recorded (`TelemetryStage._record_metrics`)",
     "TelemetryStage._record_metrics ("),
    ("span export thread (`BatchProcessor.worker`)", "BatchProcessor.worker ("),
    ("  of which protobuf encoding (`encode_spans`)", "encode_spans ("),
    ("  of which HTTP POST (`Session.request`)", "Session.request ("),
    ("metric export thread (`PeriodicExportingMetricReader._ticker`)",
     "PeriodicExportingMetricReader._ticker ("),
)


def telemetry_requests(plan: Plan, rate: int) -> int:
    """Requests per target at ``rate``: twice as many at the rate the target is set for."""
    return plan.open_requests * (2 if rate == TELEMETRY_KEY_RATE else 1)


def telemetry_sidecar_env(**otel: str) -> dict[str, str]:
    """The sidecars' environment: no inherited OTEL_* or key, warnings only, plus ``otel``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OTEL_") and k != "OPENAI_API_KEY"}
    # The OTLP exporter uses requests, which honours HTTP(S)_PROXY: stay on loopback.
    env.update(SIDECAR_LOGGING__LEVEL="warning", SIDECAR_CACHE__ENABLED="false",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(otel)
    return env


def otel_sidecar_command(port: int, upstream: str, switch_interval_ms: float | None
                         ) -> list[str]:
    """``sidecar_command``, optionally under ``sys.setswitchinterval`` (a diagnostic)."""
    cmd = sidecar_command(port, upstream)
    if switch_interval_ms is None:
        return cmd
    code = (f"import sys; sys.setswitchinterval({switch_interval_ms / 1000!r}); "
            "sys.argv[0] = 'llm-sidecar'; from proxy.cli import main; main()")
    return [sys.executable, "-c", code, *cmd[cmd.index("serve"):]]


def start_telemetry_servers(log_dir: Path, cpu: int | None,
                            switch_interval_ms: float | None = None) -> dict[str, Server]:
    """Start mock, OTLP sink, sidecar-off and sidecar-otel (stops them on failure)."""
    servers: dict[str, Server] = {}
    try:
        servers["mock"] = start_mock(log_dir, cpu)
        upstream = f"http://{HOST}:{servers['mock'].port}/v1"
        port = free_port()
        servers["sink"] = start_server(
            "sink", [sys.executable, "-m", "loadtest.otlp_sink", "--host", HOST, "--port",
                     str(port)], port, "/stats", log_dir, cpu)
        sink_url = f"http://{HOST}:{port}"
        port = free_port()
        servers[OFF] = start_server(
            OFF, sidecar_command(port, upstream), port, "/readyz", log_dir, cpu,
            telemetry_sidecar_env(OTEL_SDK_DISABLED="true"))
        port = free_port()
        servers[OTEL] = start_server(
            OTEL, otel_sidecar_command(port, upstream, switch_interval_ms), port, "/readyz",
            log_dir, cpu,
            telemetry_sidecar_env(
                OTEL_EXPORTER_OTLP_ENDPOINT=sink_url, OTEL_TRACES_SAMPLER="always_on",
                OTEL_BSP_SCHEDULE_DELAY=str(BSP_SCHEDULE_DELAY_MS),
                OTEL_METRIC_EXPORT_INTERVAL=str(METRIC_EXPORT_INTERVAL_MS)))
    except BaseException:
        for server in servers.values():
            stop_server(server)
        raise
    return servers


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of the process's main thread (the sidecar's event loop)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0]) / 1e9


class ThreadCpuMeter(CpuMeter):
    """Also meters, as ``NAME:threads``, the CPU of the named servers' other threads."""

    def __init__(self, servers: dict[str, Server], split: Sequence[str]) -> None:
        super().__init__(servers)
        self.split = tuple(split)

    def snapshot(self) -> dict[str, float]:
        snap = super().snapshot()
        for name in self.split:
            snap[f"{name}:threads"] = max(0.0, snap[name] - main_thread_cpu_s(self.pids[name]))
        return snap


def sink_stats(port: int) -> dict[str, Any]:
    """The OTLP sink's counters (``GET /stats``)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{HOST}:{port}/stats", timeout=5.0) as resp:
        return cast(dict[str, Any], orjson.loads(resp.read()))


def requests_sent(*runs: TargetRun) -> int:
    """Requests answered or failed in these runs."""
    return sum(run.completed + sum(run.errors.values()) for run in runs)


def export_delta(before: dict[str, Any], after: dict[str, Any], sent: int) -> dict[str, Any]:
    """What the sink received between two ``/stats`` snapshots, for ``sent`` otel requests."""
    keys = ("trace_exports", "trace_bytes", "spans", "metric_exports", "metric_bytes",
            "metric_points", "bad_requests")
    doc: dict[str, Any] = {k: after[k] - before[k] for k in keys}
    for key in ("span_names", "trace_ids"):
        doc[key] = {n: c - before[key].get(n, 0) for n, c in after[key].items()
                    if c - before[key].get(n, 0)}
    doc["otel_requests"] = sent
    doc["spans_per_request"] = doc["spans"] / sent if sent else math.nan
    return doc


def _block_samples(run: TargetRun) -> list[list[float]]:
    starts = [0, *run.block_ends[:-1]]
    return [sorted(run.latencies_ms[a:b]) for a, b in zip(starts, run.block_ends, strict=True)]


def per_round_added(on: TargetRun, off: TargetRun, q: float) -> list[float]:
    """percentile(on) - percentile(off) per interleaving round (adjacent blocks)."""
    return [percentile(a, q) - percentile(b, q)
            for a, b in zip(_block_samples(on), _block_samples(off), strict=False)]


def bootstrap_added(on: Sequence[float], off: Sequence[float], qs: Sequence[float],
                    n: int = BOOTSTRAP_RESAMPLES, seed: int = 1) -> dict[str, list[float]]:
    """95 % bootstrap interval of percentile(on) - percentile(off), per ``q``.

    Resamples requests independently, so it ignores correlation in time; the
    per-round spread is the check on that.
    """
    if not on or not off:
        return {f"p{q:g}": [math.nan, math.nan] for q in qs}
    rng = random.Random(seed)
    diffs: dict[float, list[float]] = {q: [] for q in qs}
    for _ in range(n):
        a = sorted(rng.choices(on, k=len(on)))
        b = sorted(rng.choices(off, k=len(off)))
        for q in qs:
            diffs[q].append(percentile(a, q) - percentile(b, q))
    out = {}
    for q, d in diffs.items():
        d.sort()
        out[f"p{q:g}"] = [percentile(d, 2.5), percentile(d, 97.5)]
    return out


def slow_bursts(run: TargetRun, threshold_ms: float) -> list[dict[str, Any]]:
    """Groups of at least ``BURST_MIN`` requests over ``threshold_ms`` close together.

    Requests are taken in completion order within each block; slow requests at
    most ``BURST_GAP`` positions apart belong to the same burst.
    """
    bursts = []
    starts = [0, *run.block_ends[:-1]]
    for block, (a, b) in enumerate(zip(starts, run.block_ends, strict=True)):
        lat = run.latencies_ms[a:b]
        groups: list[list[int]] = []
        for i, x in enumerate(lat):
            if x <= threshold_ms:
                continue
            if groups and i - groups[-1][-1] <= BURST_GAP:
                groups[-1].append(i)
            else:
                groups.append([i])
        bursts += [{"block": block, "start": g[0], "size": len(g),
                    "max_ms": round(max(lat[i] for i in g), 3)}
                   for g in groups if len(g) >= BURST_MIN]
    return bursts


def export_overlap(run: TargetRun, threshold_ms: float, export_at: Sequence[float]
                   ) -> dict[str, Any]:
    """How many slow requests, and how many of all, complete near a trace export.

    "Near": within ``EXPORT_NEAR_S`` of a trace export's arrival at the sink
    (both clocks are CLOCK_MONOTONIC). The share of all requests is the
    chance level to compare the slow requests' share with.
    """
    arrivals = sorted(export_at)
    if run.intended_at is None or not arrivals:
        return {"window_s": EXPORT_NEAR_S, "slow": 0, "slow_near": 0, "all": 0, "all_near": 0}

    def near(t: float) -> bool:
        i = bisect.bisect_left(arrivals, t)
        return any(abs(arrivals[j] - t) <= EXPORT_NEAR_S for j in (i - 1, i)
                   if 0 <= j < len(arrivals))

    done = [(t + ms / 1000.0, ms) for t, ms in zip(run.intended_at, run.latencies_ms,
                                                   strict=True)]
    slow = [near(t) for t, ms in done if ms > threshold_ms]
    every = [near(t) for t, _ in done]
    return {"window_s": EXPORT_NEAR_S, "slow": len(slow), "slow_near": sum(slow),
            "all": len(every), "all_near": sum(every)}


def tail_stats(runs: dict[str, TargetRun], export_at: Sequence[float]) -> dict[str, Any]:
    """Requests above sidecar-off's p99, otel's slow bursts and their overlap with exports."""
    threshold = percentile(sorted(runs[OFF].latencies_ms), 99)
    share = {name: (sum(1 for x in runs[name].latencies_ms if x > threshold)
                    / len(runs[name].latencies_ms) if runs[name].latencies_ms else math.nan)
             for name in (OFF, OTEL)}
    return {"threshold_ms": threshold, "share_above": share,
            "bursts": {name: slow_bursts(runs[name], threshold) for name in (OFF, OTEL)},
            "export_overlap": {name: export_overlap(runs[name], threshold, export_at)
                               for name in (OFF, OTEL)},
            "blocks": len(runs[OTEL].block_ends),
            "requests_per_block": (runs[OTEL].block_ends[0] if runs[OTEL].block_ends else 0)}


def rate_stats(runs: dict[str, TargetRun], export_at: Sequence[float]) -> dict[str, Any]:
    """Uncertainty of otel - off at one rate, the tail's shape, non-main-thread CPU."""
    on, off = runs[OTEL], runs[OFF]
    return {
        "tail": tail_stats(runs, export_at),
        "rounds_added_ms": {"p50": per_round_added(on, off, 50),
                            "p99": per_round_added(on, off, 99)},
        "bootstrap_95_ms": bootstrap_added(on.latencies_ms, off.latencies_ms, (50, 99)),
        "threads_cpu_ms_per_req": {name: cpu_ms_per_request(runs[name], f"{name}:threads")
                                   for name in (OFF, OTEL)},
        "sink_cpu_ms_per_otel_req": cpu_ms_per_request(on, "sink"),
    }


def telemetry_breakdown(lines: Sequence[str]) -> list[tuple[str, int]]:
    """Non-idle samples whose stack contains each of ``TELEMETRY_FRAMES`` (and any of them)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count_text = line.strip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        hit = False
        for label, prefix in TELEMETRY_FRAMES:
            if any(f.startswith(prefix) for f in frames):
                counts[label] += int(count_text)
                hit = hit or not label.startswith(" ")
        if hit:
            counts["all telemetry work"] += int(count_text)
    return [*((label, counts[label]) for label, _ in TELEMETRY_FRAMES),
            ("all telemetry work", counts["all telemetry work"])]


def busy_stacks(lines: Sequence[str]) -> list[str]:
    """Raw py-spy lines minus threads sleeping in ``Condition.wait`` (Event.wait).

    py-spy's idle detection misses Python 3.11's timed lock waits, so the span
    and metric export threads would count as busy while they sleep.
    """
    return [line for line in lines
            if not line.strip().rpartition(" ")[0].rpartition(";")[2].startswith(IDLE_LEAF)]


def reaggregate(prof: Profile, lines: Sequence[str]) -> Profile:
    """``prof`` recomputed from ``lines`` (keeping its run's throughput and message)."""
    new = aggregate_stacks(lines)
    new.expected_samples, new.throughput_rps = prof.expected_samples, prof.throughput_rps
    new.message = (f"{prof.samples - new.samples} samples of threads sleeping in "
                   "`Condition.wait` dropped")
    return new


@dataclass(slots=True)
class TelemetryResults(Results):
    """Results plus what the OTLP sink received and the otel - off statistics."""

    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per scenario: what the sink received, for how many sidecar-otel requests."""
    rates: dict[int, dict[str, Any]] = field(default_factory=dict)
    breakdown: list[tuple[str, int]] = field(default_factory=list)
    sink_total: dict[str, Any] = field(default_factory=dict)
    dropped_warnings: int = 0
    """'Queue full, dropping' lines in the sidecar-otel log (span queue overflow)."""
    switch_interval_ms: float | None = None
    """Diagnostic: sidecar-otel ran under this GIL switch interval (None: Python's 5 ms)."""


async def run_telemetry_scenarios(r: TelemetryResults, servers: dict[str, Server], plan: Plan,
                                  with_profile: bool, out_dir: Path) -> None:
    """Open loops per rate, closed loop and optional profile: direct / off / otel."""
    targets = [Target("direct", servers["mock"].port, None),
               Target(OFF, servers[OFF].port, OFF),
               Target(OTEL, servers[OTEL].port, OTEL)]
    meter = ThreadCpuMeter(servers, (OFF, OTEL))
    body = chat_body(stream=False)
    payloads = {t.name: build_request(t.port, body, {"traceparent": TRACEPARENT})
                for t in targets}
    r.machine["request_body_bytes"] = len(body)
    settle_s = {OTEL: OTEL_SETTLE_S}
    sink = servers["sink"].port

    for rate in plan.rates:
        before = sink_stats(sink)
        warm: dict[str, TargetRun] = {}
        runs = await open_loop(targets, payloads, meter, plan, rate,
                               telemetry_requests(plan, rate), False,
                               f"open loop {rate} req/s", settle_s, warm, keep_times=True)
        after = sink_stats(sink)
        r.exports[f"open {rate}"] = export_delta(before, after,
                                                 requests_sent(runs[OTEL], warm[OTEL]))
        r.open_loop[rate] = _record(r, f"open_{rate}", runs)
        r.rates[rate] = rate_stats(runs, after["trace_export_at"])
    before = sink_stats(sink)
    warm = {}
    runs = await closed_loop(targets, payloads, meter, plan, settle_s, warm)
    r.exports["closed"] = export_delta(before, sink_stats(sink),
                                       requests_sent(runs[OTEL], warm[OTEL]))
    r.closed_loop = _record(r, "closed", runs)
    r.closed_loop[OTEL]["threads_cpu_ms_per_req"] = cpu_ms_per_request(
        runs[OTEL], f"{OTEL}:threads")
    if with_profile:
        print("  profiling sidecar-otel with py-spy ...", flush=True)
        before = sink_stats(sink)
        r.profile = await profile_sidecar(targets[2], servers[OTEL].pid, payloads[OTEL], plan,
                                          out_dir, OTEL)
        await asyncio.sleep(OTEL_SETTLE_S)
        r.exports["profile"] = export_delta(before, sink_stats(sink), 0)
        raw_path = out_dir / f"{OTEL}-profile.txt"
        if r.profile.ok and raw_path.exists():
            lines = busy_stacks(raw_path.read_text(errors="replace").splitlines())
            r.profile = reaggregate(r.profile, lines)
            r.breakdown = telemetry_breakdown(lines)
        print(f"  profile: {'ok' if r.profile.ok else r.profile.message}", flush=True)
    r.sink_total = sink_stats(sink)


def run_telemetry_benchmark(plan: Plan, with_profile: bool, command: str,
                            switch_interval_ms: float | None = None) -> TelemetryResults:
    """Start mock, sink and both sidecars, run the scenarios, stop them (always)."""
    stamp, out_dir, srv_cpu, pinning, started = prepare_run(
        f"mock, OTLP sink, {OFF} and {OTEL}")
    r = TelemetryResults(plan, command, started, machine_info(), pinning)
    r.machine["opentelemetry_sdk"] = importlib.metadata.version("opentelemetry-sdk")
    r.switch_interval_ms = switch_interval_ms
    r.raw["stamp"] = stamp
    t0 = time.perf_counter()
    servers = start_telemetry_servers(out_dir, srv_cpu, switch_interval_ms)
    try:
        print(f"servers up (logs in {out_dir.relative_to(ROOT)}); {pinning}", flush=True)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(run_telemetry_scenarios(r, servers, plan, with_profile, out_dir))
    finally:
        # Sidecars first: sidecar-otel flushes its last telemetry to the sink on exit.
        for server in reversed(servers.values()):
            stop_server(server)
    r.duration_s = time.perf_counter() - t0
    r.machine["loadavg_end"] = os.getloadavg()
    log_text = servers[OTEL].log_path.read_text(errors="replace")
    r.dropped_warnings = log_text.count("Queue full, dropping")
    return r


def telemetry_added(runs: dict[str, dict[str, Any]], q: str) -> float:
    """percentile(sidecar-otel) - percentile(sidecar-off) in ms."""
    return float(runs[OTEL]["latency_ms"][q] - runs[OFF]["latency_ms"][q])


def errors_by_scenario(r: Results) -> dict[str, int]:
    """Failed requests per ``scenario/target`` (open loops and the closed loop)."""
    found: dict[str, int] = {}
    scenarios = [*((f"open {rate}", runs) for rate, runs in r.open_loop.items()),
                 ("closed", r.closed_loop)]
    for label, runs in scenarios:
        for name, doc in runs.items():
            n = sum(doc["errors"].values())
            if n:
                found[f"{label}/{name}"] = n
    return found


def telemetry_throughput_ratio(r: TelemetryResults) -> float:
    """sidecar-otel over sidecar-off closed-loop throughput."""
    off = r.closed_loop[OFF].get("throughput_rps", 0.0)
    return r.closed_loop[OTEL].get("throughput_rps", 0.0) / off if off else math.nan


def telemetry_checks(r: TelemetryResults) -> list[Check]:
    """The telemetry target, zero errors and proof that spans were exported."""
    out: list[Check] = []
    for rate, runs in r.open_loop.items():
        p99 = telemetry_added(runs, "p99")
        name = f"telemetry added p99 @ {rate} req/s"
        limit = f"<= {MAX_TELEMETRY_ADDED_P99_MS} ms"
        if rate != TELEMETRY_KEY_RATE:
            name, limit = name + " (context)", limit + " (target is set at 500 req/s only)"
        out.append(Check(name, f"{p99:.3f} ms", limit, p99 <= MAX_TELEMETRY_ADDED_P99_MS))
    errs = errors_by_scenario(r)
    out.append(Check("zero errors", ", ".join(f"{k}: {v}" for k, v in errs.items()) or "0",
                     "0", not errs))
    sent = sum(doc["otel_requests"] for k, doc in r.exports.items() if k.startswith("open"))
    spans = sum(doc["spans"] for k, doc in r.exports.items() if k.startswith("open"))
    out.append(Check("spans exported (open loops)", f"{spans} spans for {sent} requests",
                     f"{SPANS_PER_REQUEST} per request",
                     sent > 0 and spans == SPANS_PER_REQUEST * sent))
    return out


def _range(values: Sequence[float]) -> str:
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return "n/a"
    return f"{percentile(v, 50):+.3f} [{v[0]:+.3f} .. {v[-1]:+.3f}]"


def _interval(pair: Sequence[float]) -> str:
    return f"[{_signed(pair[0])}, {_signed(pair[1])}]"


def report_telemetry_latency(r: TelemetryResults) -> list[str]:
    """Telemetry added (otel - off), both sidecars vs direct, then per-rate detail."""
    rows, vs_direct = [], []
    for rate, runs in r.open_loop.items():
        st = r.rates[rate]
        p99 = telemetry_added(runs, "p99")
        verdict = ("PASS" if p99 <= MAX_TELEMETRY_ADDED_P99_MS else "FAIL") + (
            "" if rate == TELEMETRY_KEY_RATE else " (context)")
        rows.append([str(rate), _signed(telemetry_added(runs, "p50")), _signed(p99),
                     _signed(telemetry_added(runs, "p99.9")),
                     _interval(st["bootstrap_95_ms"]["p50"]),
                     _interval(st["bootstrap_95_ms"]["p99"]),
                     _range(st["rounds_added_ms"]["p99"]), verdict])
        vs_direct.append([str(rate), _signed(added(runs, OFF, "p50")),
                          _signed(added(runs, OFF, "p99")), _signed(added(runs, OTEL, "p50")),
                          _signed(added(runs, OTEL, "p99"))])
    out = ["## Telemetry added latency (sidecar-otel - sidecar-off, open loop)", "",
           f"Target: p99 added <= {MAX_TELEMETRY_ADDED_P99_MS} ms at {TELEMETRY_KEY_RATE} "
           "req/s with 100 % sampling. The other rates are context. Bootstrap: 95 % interval "
           f"over {BOOTSTRAP_RESAMPLES} resamples of the requests; per round: the difference "
           "in each interleaving round (adjacent blocks), median [min .. max].", "",
           *_table(["rate (req/s)", "+p50 ms", "+p99 ms", "+p99.9 ms", "+p50 95 % CI",
                    "+p99 95 % CI", "+p99 per round", "p99 target"], rows), "",
           "### Both sidecars vs direct", "",
           *_table(["rate (req/s)", "off +p50 ms", "off +p99 ms", "otel +p50 ms",
                    "otel +p99 ms"], vs_direct), "", *report_tail(r)]
    for rate, runs in r.open_loop.items():
        st = r.rates[rate]
        threads = st["threads_cpu_ms_per_req"]
        out += [f"### Open loop {rate} req/s", ""]
        rows = []
        for name, doc in runs.items():
            head = doc.get("overhead_header_ms")
            rows.append([name, str(doc["completed"]), _errors_text(doc),
                         _f(doc["latency_ms"]["p50"]), _f(doc["latency_ms"]["p90"]),
                         _f(doc["latency_ms"]["p99"]), _f(doc["latency_ms"]["p99.9"]),
                         _f(doc["latency_ms"]["max"]), _f(doc["proxy_cpu_ms_per_req"]),
                         _f(threads.get(name, math.nan)), _f(doc["mock_cpu_ms_per_req"]),
                         f"{_f(head['p50'])} / {_f(head['p99'])}" if head else "n/a"])
        lag = runs["direct"]["send_lag_ms"]
        out += [*_table(["target", "ok", "errors", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                         "max ms", "proxy CPU ms/req", "of which other threads",
                         "mock CPU ms/req", "x-sidecar-overhead-ms p50 / p99"], rows), "",
                f"OTLP sink CPU per sidecar-otel request: "
                f"{_f(st['sink_cpu_ms_per_otel_req'])} ms. Generator send lag behind schedule "
                f"(direct blocks): p50 {_f(lag['p50'])} ms, p99 {_f(lag['p99'])} ms.", ""]
    return out


def report_tail(r: TelemetryResults) -> list[str]:
    """The shape of sidecar-otel's tail: share above off's p99 and bursts of slow requests."""
    rows = []
    for rate in r.open_loop:
        tail = r.rates[rate]["tail"]
        bursts = tail["bursts"][OTEL]
        starts = ", ".join(str(b["start"]) for b in bursts[:12]) + (
            ", ..." if len(bursts) > 12 else "")
        peaks = sorted(b["max_ms"] for b in bursts)
        ov = tail["export_overlap"][OTEL]
        rows.append([str(rate), _f(tail["threshold_ms"]),
                     f"{tail['share_above'][OFF]:.1%}", f"{tail['share_above'][OTEL]:.1%}",
                     f"{len(tail['bursts'][OFF])} / {len(bursts)}",
                     f"{tail['blocks']} x {tail['requests_per_block']}", starts or "-",
                     (f"{max(b['size'] for b in bursts)} / {percentile(peaks, 50):.1f} / "
                      f"{peaks[-1]:.1f}") if bursts else "-",
                     f"{_share(ov['slow_near'], ov['slow'])} of {ov['slow']}",
                     _share(ov["all_near"], ov["all"]),
                     str(r.exports[f"open {rate}"]["trace_exports"])])
    return ["### Where the tail comes from", "",
            "Requests slower than sidecar-off's p99 at the same rate, and bursts: at least "
            f"{BURST_MIN} such requests at most {BURST_GAP} apart (in completion order within "
            f"a block). The export thread wakes when {BSP_MAX_EXPORT_BATCH} spans are queued "
            f"(= {BSP_MAX_EXPORT_BATCH // SPANS_PER_REQUEST} requests; each block starts with "
            f"an empty queue) or {BSP_SCHEDULE_DELAY_MS} ms after its last wake-up. 'Near an "
            f"export': the request completed within {EXPORT_NEAR_S * 1000:.0f} ms of a trace "
            "export's arrival at the sink (same monotonic clock); the share of all requests "
            "near one is the chance level.", "",
            *_table(["rate (req/s)", "off p99 ms", "off above", "otel above",
                     "bursts off / otel", "otel blocks x requests", "otel burst starts "
                     "(request # in block)", "otel bursts: most requests / median peak ms / "
                     "max peak ms",
                     "slow otel reqs near an export", "all otel reqs near one",
                     "trace exports"], rows),
            ""]


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "n/a"


def report_telemetry_cpu(r: TelemetryResults) -> list[str]:
    """CPU per request of each sidecar, the difference, the export threads and the sink."""
    rows = []
    scenarios = [*((str(rate), runs, r.rates[rate]["threads_cpu_ms_per_req"])
                   for rate, runs in r.open_loop.items()),
                 ("closed loop", r.closed_loop,
                  {OTEL: r.closed_loop[OTEL].get("threads_cpu_ms_per_req", math.nan)})]
    for label, runs, threads in scenarios:
        off, on = runs[OFF]["proxy_cpu_ms_per_req"], runs[OTEL]["proxy_cpu_ms_per_req"]
        sink = (runs[OTEL]["cpu_s"].get("sink", math.nan) * 1000 / runs[OTEL]["completed"]
                if runs[OTEL]["completed"] else math.nan)
        rows.append([label, _f(off), _f(on), _signed(on - off),
                     f"{(on - off) / off:+.0%}" if off else "n/a",
                     _f(threads.get(OTEL, math.nan)), _f(sink)])
    return ["## CPU per request", "",
            "Process CPU (all threads) over each target's blocks, including the metered "
            f"{OTEL_SETTLE_S:.2f} s after every sidecar-otel block in which its last batch is "
            "exported, divided by the requests it answered. 'Export threads' is the CPU of "
            "sidecar-otel's threads other than the event loop's (span batch export, metric "
            "export). The sink's CPU is not part of the sidecar's, but runs on the same core.",
            "", *_table(["scenario (req/s)", "sidecar-off ms/req", "sidecar-otel ms/req",
                         "telemetry +ms/req", "telemetry +%", "otel export threads ms/req",
                         "OTLP sink ms/req"], rows), ""]


def report_telemetry_exports(r: TelemetryResults) -> list[str]:
    """What reached the OTLP sink, per scenario."""
    rows = []
    for label, doc in r.exports.items():
        names = ", ".join(f"`{n}` {c}" for n, c in doc["span_names"].items()) or "-"
        rows.append([label, str(doc["otel_requests"] or "n/a"), str(doc["spans"]),
                     _f(doc["spans_per_request"], 2), names, str(doc["trace_exports"]),
                     _f(doc["trace_bytes"] / 1024, 0), str(doc["metric_exports"]),
                     str(doc["metric_points"])])
    total = r.sink_total
    traces = total.get("trace_ids", {})
    own = traces.get(TRACEPARENT.split("-")[1], 0)
    return ["## Exported telemetry (what the OTLP sink received)", "",
            "Requests count sidecar-otel's warm-up too. Spans per request should be "
            f"{SPANS_PER_REQUEST}: the request span `chat gpt-4o-mini` (SERVER) and its "
            "`llm_sidecar.upstream` child (CLIENT). The profile row's requests are not counted.",
            "", *_table(["scenario", "otel requests", "spans", "spans/req", "span names",
                         "trace exports", "trace KB", "metric exports", "metric points"], rows),
            "", f"Whole run: {total.get('spans', 0)} spans in {total.get('trace_exports', 0)} "
            f"trace exports ({total.get('trace_bytes', 0) / 1e6:.1f} MB), "
            f"{total.get('metric_exports', 0)} metric exports "
            f"({', '.join(total.get('metric_names', [])) or 'none'}); "
            f"{own} spans in the agent's trace `{TRACEPARENT.split('-')[1]}` (trace "
            f"continuation); undecodable exports: {total.get('bad_requests', 0)}; "
            f"'Queue full, dropping' warnings in the sidecar-otel log: {r.dropped_warnings}.",
            ""]


def report_telemetry_closed_loop(r: TelemetryResults) -> list[str]:
    """Throughput of both sidecars (and direct) in the closed loop."""
    rows = []
    for name, doc in r.closed_loop.items():
        cpu = doc["proxy_cpu_ms_per_req"]
        sink = (doc["cpu_s"].get("sink", 0.0) * 1000 / doc["completed"]
                if doc["completed"] else math.nan)
        # sidecar-otel's metered time includes its settle pauses; show the block time only.
        wall = doc["wall_s"] - (r.plan.closed_rounds * OTEL_SETTLE_S if name == OTEL else 0.0)
        busy = sum(v for k, v in doc["cpu_s"].items() if k != "generator" and ":" not in k)
        rows.append([name, _f(doc.get("throughput_rps", math.nan), 0), _errors_text(doc),
                     _f(cpu), _f(1000.0 / cpu, 0) if cpu and not math.isnan(cpu) else "n/a",
                     _f(doc["mock_cpu_ms_per_req"]), _f(sink), f"{busy / wall:.0%}",
                     f"{doc['cpu_s'].get('generator', math.nan) / wall:.0%}"])
    on, off = (r.closed_loop[n]["proxy_cpu_ms_per_req"] for n in (OTEL, OFF))
    exp = r.exports.get("closed", {})
    return ["## Max throughput (closed loop)", "",
            f"{r.plan.workers} connections send back to back; blocks of {r.plan.closed_block_s} "
            f"s rotate between the targets for {r.plan.closed_rounds} rounds. Mock, sink and "
            "sidecar share one core, so a sidecar's throughput is 1 / (its CPU + mock CPU (+ "
            "sink CPU)) per request; 'proxy-only req/s' is 1000 / its CPU ms per request. "
            "Core busy and generator CPU are over the blocks themselves (sidecar-otel's CPU "
            "includes the export finished in its settle pauses).", "",
            *_table(["target", "req/s", "errors", "proxy CPU ms/req", "proxy-only req/s",
                     "mock CPU ms/req", "sink CPU ms/req", "server core busy",
                     "generator CPU"], rows), "",
            f"sidecar-otel / sidecar-off throughput: **{_f(telemetry_throughput_ratio(r), 2)}**"
            f" (proxy-only: {_f(off / on, 2) if on else 'n/a'}). Spans received for the "
            f"closed loop: {exp.get('spans', 0)} for {exp.get('otel_requests', 0)} requests "
            f"({_f(exp.get('spans_per_request', math.nan), 2)} per request; fewer than "
            f"{SPANS_PER_REQUEST} means the batch queue overflowed and spans were dropped).", ""]


def report_telemetry_profile(r: TelemetryResults) -> list[str]:
    """py-spy of sidecar-otel: where its telemetry work is, then the usual tables."""
    prof = r.profile
    if prof is None:
        return ["## Profile", "", "Not run (pass `--profile`).", ""]
    if not prof.ok:
        return ["## Profile", "", f"py-spy did not produce a profile: {prof.message}", ""]
    n = prof.samples or 1
    exp = r.exports.get("profile", {})
    out = ["## Profile of sidecar-otel (py-spy)", "",
           f"`py-spy record --format raw --function -r 200 -d {round(r.plan.profile_s)}` on "
           f"sidecar-otel during a closed-loop run against it alone ({_f(prof.throughput_rps, 0)}"
           f" req/s while sampled; {exp.get('spans', 0)} spans exported meanwhile). "
           f"{prof.samples} non-idle samples of {prof.expected_samples} per thread ({prof.message};"
           " py-spy takes those timed waits for work). All threads are sampled, so the event "
           "loop and the export threads add up; a thread waiting for the GIL counts as idle. "
           "Percentages are of non-idle samples; raw stacks in "
           f"`loadtest/results/.../{OTEL}-profile.txt`.", "",
           "### Telemetry work (samples whose stack contains the frame)", ""]
    out += _table(["where", "samples", "%"],
                  [[label, str(c), f"{c / n:.1%}"] for label, c in r.breakdown])
    return [*out, "", *profile_tables(prof), ""]


def telemetry_reading(r: TelemetryResults) -> list[str]:
    """Observations computed from the numbers."""
    lines = []
    for rate, runs in r.open_loop.items():
        st = r.rates[rate]
        lo, hi = st["bootstrap_95_ms"]["p99"]
        rounds = [x for x in st["rounds_added_ms"]["p99"] if not math.isnan(x)]
        pos = sum(1 for x in rounds if x > 0)
        lines.append(
            f"- {rate} req/s: telemetry adds {telemetry_added(runs, 'p50'):+.3f} ms at p50 and "
            f"{telemetry_added(runs, 'p99'):+.3f} ms at p99 (95 % CI {lo:+.3f} .. {hi:+.3f}; "
            f"p99 higher with telemetry in {pos} of {len(rounds)} rounds); CPU "
            f"{runs[OFF]['proxy_cpu_ms_per_req']:.3f} -> {runs[OTEL]['proxy_cpu_ms_per_req']:.3f}"
            f" ms/req, of which {st['threads_cpu_ms_per_req'][OTEL]:.3f} ms in export threads.")
    for rate in r.open_loop:
        tail = r.rates[rate]["tail"]
        bursts = tail["bursts"][OTEL]
        ov = tail["export_overlap"][OTEL]
        peaks = sorted(b["max_ms"] for b in bursts)
        shape = (f"they come in {len(bursts)} bursts (off: {len(tail['bursts'][OFF])}) of up to "
                 f"{max(b['size'] for b in bursts)} requests, peaking at "
                 f"{percentile(peaks, 50):.1f} ms (median) and {peaks[-1]:.1f} ms (max)"
                 if bursts else "no bursts")
        lines.append(
            f"- Tail shape at {rate} req/s: {tail['share_above'][OTEL]:.1%} of sidecar-otel's "
            f"requests are slower than sidecar-off's p99 ({tail['threshold_ms']:.3f} ms; off: "
            f"{tail['share_above'][OFF]:.1%}); {shape}. {_share(ov['slow_near'], ov['slow'])} "
            f"of those slow requests completed within {EXPORT_NEAR_S * 1000:.0f} ms of a trace "
            f"export reaching the sink, against {_share(ov['all_near'], ov['all'])} of all its "
            "requests.")
    for rate, runs in r.open_loop.items():
        th = r.rates[rate]["threads_cpu_ms_per_req"]
        main_on = runs[OTEL]["proxy_cpu_ms_per_req"] - th[OTEL]
        main_off = runs[OFF]["proxy_cpu_ms_per_req"] - th[OFF]
        lines.append(f"- CPU at {rate} req/s: the event-loop thread needs {main_off:.3f} (off) vs "
                     f"{main_on:.3f} ms/req (otel), {main_on - main_off:+.3f} ms; the export "
                     f"threads add {th[OTEL]:.3f} ms/req; the sink "
                     f"{r.rates[rate]['sink_cpu_ms_per_otel_req']:.3f} ms/req.")
    key = r.open_loop.get(TELEMETRY_KEY_RATE)
    if key is not None:
        head_on = key[OTEL].get("overhead_header_ms")
        head_off = key[OFF].get("overhead_header_ms")
        if head_on and head_off:
            lines.append(
                f"- The sidecars' own `x-sidecar-overhead-ms` at {TELEMETRY_KEY_RATE} req/s: "
                f"p50 {head_off['p50']:.3f} (off) vs {head_on['p50']:.3f} ms (otel). It is "
                "stamped before the answer is written, so it contains the request-path part "
                "(traceparent parsing, sampling, the upstream traceparent) but not the span and "
                "metric work done after the answer, which delays only the *next* requests "
                "queued behind it on the event loop.")
    cl = r.closed_loop
    on, off = cl[OTEL]["proxy_cpu_ms_per_req"], cl[OFF]["proxy_cpu_ms_per_req"]
    lines.append(f"- Closed loop: sidecar-otel {on:.3f} vs sidecar-off {off:.3f} CPU ms per "
                 f"request ({on / off:.2f}x); throughput ratio "
                 f"{telemetry_throughput_ratio(r):.2f}.")
    if r.breakdown and r.profile is not None and r.profile.samples:
        n = r.profile.samples
        parts = ", ".join(f"{label.strip()} {c / n:.0%}" for label, c in r.breakdown if c)
        lines.append(f"- Profile (share of sidecar-otel's non-idle samples): {parts}.")
    la0, la1 = r.machine["loadavg_start"], r.machine.get("loadavg_end", (math.nan,) * 3)
    lines.append(f"- Noise: load average {la0[0]:.2f} at start, {la1[0]:.2f} at the end "
                 f"(on {r.machine['nproc']} CPUs); interleaving spreads it over all targets.")
    return lines


def render_telemetry_report(r: TelemetryResults, json_path: Path) -> str:
    """The whole telemetry markdown report."""
    m = r.machine
    rates = "/".join(str(x) for x in r.plan.rates)
    counts = ", ".join(f"{telemetry_requests(r.plan, x)} at {x}" for x in r.plan.rates)
    out = ["# llm-sidecar telemetry cost: OTLP export at 100 % sampling vs telemetry off", "",
           f"- Date: {r.started} ({r.plan.name} run, {r.duration_s:.0f} s)",
           f"- Command: `{r.command}`",
           f"- Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; "
           f"Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, "
           f"opentelemetry-sdk {m.get('opentelemetry_sdk', 'n/a')}",
           f"- Code: git {m['git']}",
           f"- Pinning: {r.pinning}",
           f"- Raw results: `{json_path.relative_to(ROOT)}`", "",
           "## Method", "",
           "- Targets: `direct` (client -> mock), `sidecar-off` (llm-sidecar with "
           "`OTEL_SDK_DISABLED=true`: no telemetry stage at all) and `sidecar-otel` (the same "
           f"sidecar with `OTEL_EXPORTER_OTLP_ENDPOINT` = the sink, `OTEL_TRACES_SAMPLER="
           f"always_on`, `OTEL_BSP_SCHEDULE_DELAY={BSP_SCHEDULE_DELAY_MS}`, "
           f"`OTEL_METRIC_EXPORT_INTERVAL={METRIC_EXPORT_INTERVAL_MS}`: traces and metrics over "
           "OTLP http/protobuf, the SDK's BatchSpanProcessor and PeriodicExportingMetricReader "
           "with their other defaults). Both sidecars: `llm-sidecar serve`, "
           "`SIDECAR_LOGGING__LEVEL=warning`, `SIDECAR_CACHE__ENABLED=false` (the requests "
           "repeat: with the cache on they would be hits), no other config.",
           f"- Request: the same pre-serialised {m['request_body_bytes']}-byte chat completion "
           f"as the main benchmark plus `traceparent: {TRACEPARENT}` (sampled), so the sidecar "
           "continues the agent's trace: per request a SERVER span and an "
           "`llm_sidecar.upstream` CLIENT child, whose id the upstream receives.",
           "- OTLP sink: `loadtest/otlp_sink.py` (aiohttp + uvloop; decodes each export to count "
           "spans, answers an empty `Export*ServiceResponse`), pinned to the server core with the "
           "mock and both sidecars, so its CPU competes with sidecar-otel's (pessimistic "
           "compared with a collector on another node); its CPU is reported separately.",
           f"- Interleaving: blocks rotate direct -> sidecar-off -> sidecar-otel (each round "
           f"starts one target later). After every sidecar-otel block the meter keeps running "
           f"for {OTEL_SETTLE_S:.2f} s with no requests, so the batch export of the block's last "
           "spans is charged to sidecar-otel and does not land in the next target's block. So "
           "each sidecar-otel block starts with an empty span queue and its last partial batch "
           "is exported in the pause: slightly fewer exports overlap requests than in steady "
           "state, so the tail figures are, if anything, a little optimistic.",
           f"- Open loop at {rates} req/s ({counts} requests per target); latency from the "
           "*intended* send time (no coordinated omission). Telemetry added = "
           "percentile(sidecar-otel) - percentile(sidecar-off), same run, interleaved.",
           "- CPU per request: `/proc/PID/task/*/schedstat` before and after each block "
           "(settle time included), divided by the requests completed; the main thread's own "
           "schedstat separates the event loop from the exporter threads.",
           "- Closed loop: max throughput of each target with the same interleaving.",
           *([f"- **Diagnostic run**: sidecar-otel runs under `sys.setswitchinterval("
              f"{r.switch_interval_ms / 1000:g})` ({r.switch_interval_ms:g} ms; Python's default "
              "is 5 ms), started through `python -c` instead of the `llm-sidecar` script. "
              "This is not the shipped configuration; it shows how much of the tail is the "
              "GIL hand-off between the event loop and the export thread."]
             if r.switch_interval_ms is not None else []),
           ""]
    out += ["## Results against target", ""]
    out += [f"- **{'PASS' if c.ok else 'FAIL'}** {c.name}: {c.measured} (target {c.limit})"
            for c in telemetry_checks(r)]
    out += ["", *report_telemetry_latency(r), *report_telemetry_cpu(r),
            *report_telemetry_exports(r), *report_telemetry_closed_loop(r),
            *report_telemetry_profile(r), "## Reading the numbers", "", *telemetry_reading(r),
            ""]
    return "\n".join(out)


def write_telemetry_outputs(r: TelemetryResults, out: Path) -> Path:
    """Write the JSON results and the markdown report; returns the JSON path."""
    json_path = RESULTS_DIR / f"telemetry-{r.raw['stamp']}.json"
    doc = {"plan": asdict(r.plan), "command": r.command, "started": r.started,
           "duration_s": r.duration_s, "machine": r.machine, "pinning": r.pinning,
           "switch_interval_ms": r.switch_interval_ms,
           "open_loop": r.open_loop, "closed_loop": r.closed_loop, "rates": r.rates,
           "exports": r.exports, "sink_total": r.sink_total,
           "dropped_warnings": r.dropped_warnings,
           "profile": asdict(r.profile) if r.profile else None, "breakdown": r.breakdown,
           "checks": [asdict(c) for c in telemetry_checks(r)], "samples": r.raw}
    json_path.write_bytes(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))
    out.write_text(render_telemetry_report(r, json_path))
    return json_path


def raise_interrupt(signum: int, frame: object) -> None:
    """A SIGTERM handler that unwinds like Ctrl-C, so finally blocks stop the servers."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the report."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~1 minute)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the sidecar with py-spy under load")
    parser.add_argument("--telemetry", action="store_true",
                        help="instead: telemetry cost, sidecar with OTLP export at 100 %% "
                             "sampling vs telemetry off (report loadtest/REPORT-telemetry.md)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report path (default loadtest/REPORT.md, or "
                             "loadtest/REPORT-telemetry.md with --telemetry)")
    parser.add_argument("--otel-switch-interval-ms", type=float, default=None, metavar="MS",
                        help="with --telemetry, diagnostic: run sidecar-otel under "
                             "sys.setswitchinterval(MS / 1000) (Python's default: 5 ms)")
    args = parser.parse_args(argv)
    if args.otel_switch_interval_ms is not None and not (
            args.telemetry and args.otel_switch_interval_ms > 0):
        parser.error("--otel-switch-interval-ms needs --telemetry and a positive value")
    exe = os.path.relpath(sys.executable, Path.cwd())
    command = shlex.join([exe, "-m", "loadtest.bench", *(sys.argv[1:] if argv is None
                                                          else argv)])
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, raise_interrupt)
    if args.telemetry:
        tplan = TELEMETRY_QUICK if args.quick else TELEMETRY_FULL
        out = args.out or ROOT / "loadtest" / "REPORT-telemetry.md"
        print(f"llm-sidecar telemetry benchmark ({tplan.name})", flush=True)
        tresults = run_telemetry_benchmark(tplan, args.profile, command,
                                           args.otel_switch_interval_ms)
        json_path = write_telemetry_outputs(tresults, out)
        print(f"report: {out}\nraw results: {json_path}")
        for c in telemetry_checks(tresults):
            print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.measured} (target {c.limit})")
        return
    plan = QUICK if args.quick else FULL
    args.out = args.out or ROOT / "loadtest" / "REPORT.md"
    print(f"llm-sidecar benchmark ({plan.name})", flush=True)
    results = run_benchmark(plan, args.profile, command)
    json_path = write_outputs(results, args.out)
    print(f"report: {args.out}\nraw results: {json_path}")
    for c in checks(results):
        print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.measured} (target {c.limit})")


if __name__ == "__main__":
    main()
