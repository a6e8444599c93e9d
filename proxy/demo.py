"""``llm-sidecar demo``: mock upstream + sidecar on free ports, and a small agent fleet.

Each simulated agent runs tool-using turns with the official ``openai`` SDK
through the sidecar: a chat call that asks for a tool, a streamed answer after
the tool result, embeddings, the Responses API, and now and then models and
files. The summary shows what the sidecar added to each request.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter, defaultdict
from typing import Any

from proxy.app import build_app
from proxy.config import ServerConfig, SidecarConfig, UpstreamConfig
from proxy.server import running

_TOOLS: list[Any] = [{
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the internal documentation.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]},
    },
}]
_TASKS = ["summarize the incident report", "find the owner of service billing",
          "draft a reply to the customer", "list open pull requests",
          "explain the failing test", "plan the database migration"]


class _Recorder:
    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.overhead_ms: list[float] = []
        self.latency_ms: dict[str, list[float]] = defaultdict(list)
        self.cache: Counter[str] = Counter()

    def ok(self, kind: str, started: float, headers: Any) -> None:
        self.count[kind] += 1
        self.latency_ms[kind].append((time.perf_counter() - started) * 1000)
        cache = headers.get("x-sidecar-cache")
        if cache is not None:
            self.cache[cache] += 1
        value = headers.get("x-sidecar-overhead-ms")
        if value is not None:
            self.overhead_ms.append(float(value))


async def _agent_turn(client: Any, rec: _Recorder, turn: int) -> None:
    import openai

    task = _TASKS[turn % len(_TASKS)]
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful platform agent."},
        # Tickets repeat across the fleet, as agents re-ask: temperature 0 makes
        # the first call cacheable, so repeats are answered by the sidecar.
        {"role": "user", "content": f"Please {task} (ticket {turn % 24})."},
    ]
    try:
        t = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, tools=_TOOLS, temperature=0)
        first = raw.parse()
        rec.ok("chat+tools", t, raw.headers)
        call = first.choices[0].message.tool_calls[0]
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "3 documents found"})

        t = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages, stream=True)
        answer = "".join([c.choices[0].delta.content or "" async for c in raw.parse()
                          if c.choices])
        rec.ok("chat stream", t, raw.headers)

        if turn % 3 == 0:
            t = time.perf_counter()
            raw = await client.embeddings.with_raw_response.create(
                model="text-embedding-3-small", input=[task, answer])
            raw.parse()
            rec.ok("embeddings", t, raw.headers)
        if turn % 5 == 0:
            t = time.perf_counter()
            raw = await client.responses.with_raw_response.create(
                model="gpt-4o-mini", input=f"Title for: {task}")
            raw.parse()
            rec.ok("responses", t, raw.headers)
        if turn % 20 == 0:
            t = time.perf_counter()
            raw = await client.models.with_raw_response.list()
            raw.parse()
            rec.ok("models", t, raw.headers)
            t = time.perf_counter()
            data = (answer * 50).encode()
            uploaded = await client.files.create(file=("notes.txt", data), purpose="assistants")
            content = await client.files.content(uploaded.id)
            if content.read() != data:
                rec.errors["files: content mismatch"] += 1
            else:
                rec.ok("files", t, {})
    except openai.APIError as exc:
        rec.errors[f"{type(exc).__name__}"] += 1


async def _ab_latency(via: Any, direct: Any, rounds: int) -> tuple[list[float], list[float]]:
    """Same chat call direct and through the sidecar, alternating, with no upstream delay."""
    times: tuple[list[float], list[float]] = ([], [])
    messages: list[Any] = [{"role": "user", "content": "ping"}]
    for _ in range(rounds):
        for client, out in ((direct, times[0]), (via, times[1])):
            t = time.perf_counter()
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                 extra_headers={"x-mock-latency-ms": "0"})
            out.append((time.perf_counter() - t) * 1000)
    return times


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_demo(requests: int = 120, concurrency: int = 8) -> int:
    """Run the demo workload; returns the process exit code (0: no errors)."""
    try:
        import openai

        from loadtest.mock_upstream import MockConfig, MockUpstream
    except ImportError as exc:
        print(f"the demo needs the 'demo' extra (pip install 'llm-sidecar[demo]'): {exc}")
        return 1

    mock = MockUpstream(MockConfig(latency_ms=25, ttft_ms=15, tokens_per_second=800,
                                   completion_tokens=24))
    upstream_url = await mock.start()
    cfg = SidecarConfig(server=ServerConfig(port=0),
                        upstream=UpstreamConfig(base_url=upstream_url))
    rec = _Recorder()
    try:
        async with running(build_app(cfg), cfg, port=0) as url:
            print(f"mock upstream : {upstream_url}\nllm-sidecar   : {url}/v1\n"
                  f"running {requests} agent turns, {concurrency} agents at a time ...")
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-demo-key",
                                        max_retries=0, timeout=30)
            started = time.perf_counter()
            queue = iter(range(requests))

            async def agent() -> None:
                for turn in queue:
                    await _agent_turn(client, rec, turn)

            await asyncio.gather(*(agent() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            direct = openai.AsyncOpenAI(base_url=upstream_url, api_key="sk-demo-key",
                                        max_retries=0, timeout=30)
            ab_direct, ab_via = await _ab_latency(client, direct, rounds=100)
            await client.close()
            await direct.close()
    finally:
        await mock.stop()

    total = sum(rec.count.values())
    print(f"\n{'request kind':<14}{'count':>7}{'p50 ms':>10}{'p99 ms':>10}")
    for kind, n in rec.count.most_common():
        lat = rec.latency_ms[kind]
        print(f"{kind:<14}{n:>7}{_pct(lat, 0.5):>10.1f}{_pct(lat, 0.99):>10.1f}")
    over = rec.overhead_ms
    print(f"\nrequests      : {total} in {elapsed:.2f}s ({total / elapsed:.0f} req/s)")
    if over:
        print(f"in-sidecar    : p50 {_pct(over, 0.5):.3f} ms, p99 {_pct(over, 0.99):.3f} ms, "
              f"mean {statistics.fmean(over):.3f} ms (x-sidecar-overhead-ms)")
    added = _pct(ab_via, 0.5) - _pct(ab_direct, 0.5)
    print(f"A/B latency   : same chat call x100, alternating: direct p50 "
          f"{_pct(ab_direct, 0.5):.2f} ms, through sidecar p50 {_pct(ab_via, 0.5):.2f} ms "
          f"(+{added:.2f} ms, SDK client in the same process)")
    lookups = sum(rec.cache.values())
    if lookups:
        hits = ", ".join(f"{n} {k.split('=', 1)[1]}" for k, n in sorted(rec.cache.items())
                         if k.startswith("hit"))
        print(f"cache         : {lookups - rec.cache['miss']} hits of {lookups} cacheable "
              f"requests ({hits or 'none'}); hits never reach the upstream")
    errors = sum(rec.errors.values())
    print(f"errors        : {errors}" + (f" {dict(rec.errors)}" if errors else ""))
    return 0 if errors == 0 and total > 0 else 1
