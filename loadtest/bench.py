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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import gc
import importlib.metadata
import math
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import orjson

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


def start_servers(log_dir: Path, cpu: int | None) -> dict[str, Server]:
    """Start mock, relay and sidecar; returns them by name (stops them on failure)."""
    py = sys.executable
    servers: dict[str, Server] = {}
    try:
        port = free_port()
        servers["mock"] = start_server(
            "mock", [py, "-m", "loadtest.mock_upstream", "--host", HOST, "--port", str(port)],
            port, "/v1/models", log_dir, cpu)
        upstream = f"http://{HOST}:{port}/v1"
        port = free_port()
        servers["relay"] = start_server(
            "relay", [py, "-m", "loadtest.relay_baseline", "--host", HOST, "--port", str(port),
                      "--upstream", upstream], port, "/v1/models", log_dir, cpu)
        port = free_port()
        env = dict(os.environ, SIDECAR_LOGGING__LEVEL="warning")
        # The relay forwards the client's key; so must the sidecar for a fair comparison.
        env.pop("OPENAI_API_KEY", None)
        sidecar_bin = Path(py).parent / "llm-sidecar"
        cmd = [str(sidecar_bin)] if sidecar_bin.exists() else [py, "-m", "proxy"]
        servers["sidecar"] = start_server(
            "sidecar", [*cmd, "serve", "--host", HOST, "--port", str(port),
                        "--upstream", upstream], port, "/readyz", log_dir, cpu, env)
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
        "server_core_util": (sum(v for k, v in run.cpu_s.items() if k != "generator")
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

    def __init__(self, pool: Pool, payload: bytes, run: TargetRun, stream: bool) -> None:
        self.pool = pool
        self.payload = payload
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
        conn.send(self.payload,
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
            if reply.overhead_ms is not None:
                run.overhead_ms.append(reply.overhead_ms)
        if conn is not None:
            self.pool.give(conn)
        if self.inflight == 0 and self.scheduled_all:
            self.drained.set()


class ClosedBlock:
    """Every connection sends back to back until the deadline (one worker per connection)."""

    def __init__(self, conns: list[HttpConnection], payload: bytes, run: TargetRun) -> None:
        self.conns = conns
        self.payload = payload
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
            conn.send(self.payload, self._done)
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
            conn.send(self.payload, self._done)
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


async def open_loop(targets: Sequence[Target], payloads: dict[str, bytes], meter: CpuMeter,
                    plan: Plan, rate: int, requests: int, stream: bool,
                    label: str) -> dict[str, TargetRun]:
    """Interleaved open-loop blocks at ``rate`` req/s per active target."""
    block_s, per_block, rounds = open_loop_shape(plan, rate, requests)
    pools = {t.name: Pool(t.port, t.name == "sidecar") for t in targets}
    runs = {t.name: TargetRun() for t in targets}
    try:
        for t in targets:
            await pools[t.name].fill(plan.open_pool)
        for t in targets:  # warm-up, not recorded
            await OpenBlock(pools[t.name], payloads[t.name], TargetRun(), stream).execute(
                rate, max(1, round(rate * plan.warmup_s)))
        for _, t in rotation(targets, rounds):
            with metered(meter, runs[t.name]):
                await OpenBlock(pools[t.name], payloads[t.name], runs[t.name], stream).execute(
                    rate, per_block)
    finally:
        for pool in pools.values():
            pool.close()
    done = {name: run.completed for name, run in runs.items()}
    print(f"  {label}: {rounds} rounds x {block_s:.2f}s blocks, completed {done}", flush=True)
    return runs


async def closed_loop(targets: Sequence[Target], payloads: dict[str, bytes], meter: CpuMeter,
                      plan: Plan) -> dict[str, TargetRun]:
    """Interleaved closed-loop blocks: ``plan.workers`` connections sending back to back."""
    pools = {t.name: Pool(t.port, False) for t in targets}
    runs = {t.name: TargetRun() for t in targets}
    try:
        conns = {t.name: await pools[t.name].fill(plan.workers) for t in targets}
        for t in targets:  # warm-up: lets the proxies open their upstream pools
            await ClosedBlock(conns[t.name], payloads[t.name], TargetRun()).execute(0.5)
        for _, t in rotation(targets, plan.closed_rounds):
            with metered(meter, runs[t.name]):
                await ClosedBlock(conns[t.name], payloads[t.name], runs[t.name]).execute(
                    plan.closed_block_s)
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
                          out_dir: Path) -> Profile:
    """Record the sidecar with py-spy while a closed loop keeps it busy."""
    spy = Path(sys.executable).parent / "py-spy"
    raw_path = out_dir / "sidecar-profile.txt"
    log_path = out_dir / "py-spy.log"
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


def git_revision() -> str:
    """The measured commit, plus the files of proxy/ and loadtest/ changed since."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy", "loadtest"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10,
                               check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # The report and raw results themselves do not make the code dirty.
    changed = [line for line in dirty.splitlines()
               if not line.endswith(("REPORT.md", "results/"))]
    if not changed:
        return rev
    return f"{rev} + local changes in " + ", ".join(line[3:] for line in changed)


def choose_cpus() -> tuple[int | None, int | None, str]:
    """(generator CPU, server CPU, description); no pinning with fewer than two CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None, (f"only {len(allowed)} CPU available: NOT pinned; generator and "
                            "servers share the CPU, so latencies include their contention")
    gen, srv = allowed[0], allowed[1]
    return gen, srv, (f"load generator pinned to CPU {gen} (sched_setaffinity); mock, relay "
                      f"and sidecar pinned together to CPU {srv} (taskset -c {srv})")


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


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_benchmark(plan: Plan, with_profile: bool, command: str) -> Results:
    """Start the servers, run the scenarios, stop the servers (always)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS_DIR / f"run-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    gen_cpu, srv_cpu, pinning = choose_cpus()
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})
    results = Results(plan, command, dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                      machine_info(), pinning)
    results.raw["stamp"] = stamp
    t0 = time.perf_counter()
    servers = start_servers(out_dir, srv_cpu)
    try:
        print(f"servers up (logs in {out_dir.relative_to(ROOT)}); {pinning}", flush=True)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
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
    n = prof.samples or 1
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
           "### Top functions by self time (own frame)", ""]
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
    return [*out, ""]


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
           " mock). The mock answers with zero latency in the latency runs, so differences are "
           "pure proxy cost. All servers run on uvloop.",
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the report."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (~1 minute)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the sidecar with py-spy under load")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "REPORT.md",
                        help="markdown report path (default loadtest/REPORT.md)")
    args = parser.parse_args(argv)
    exe = os.path.relpath(sys.executable, Path.cwd())
    command = shlex.join([exe, "-m", "loadtest.bench", *(sys.argv[1:] if argv is None
                                                          else argv)])
    plan = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"llm-sidecar benchmark ({plan.name})", flush=True)
    results = run_benchmark(plan, args.profile, command)
    json_path = write_outputs(results, args.out)
    print(f"report: {args.out}\nraw results: {json_path}")
    for c in checks(results):
        print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.measured} (target {c.limit})")


if __name__ == "__main__":
    main()
