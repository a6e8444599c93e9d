"""``llm-sidecar warm FILE.jsonl``: fill the shared cache before the agents ask.

Each line is one request, as a bare request body or as a record::

    {"url": "/v1/chat/completions", "body": {...}, "response": {...}, "headers": {...}}

which is also the shape of OpenAI Batch API input lines (``custom_id`` and
``method`` are ignored) and, with ``response``, of its output lines
(``{"status_code": 200, "body": {...}}`` is accepted as the response). Without
``url`` the endpoint is inferred from the body (``messages``: chat,
``input``: embeddings, ``prompt``: completions).

The requests run through the sidecar's own pipeline, so they get exactly the
keys, tiers, tenant scope and storing rules that live traffic gets: by
default an in-process sidecar built from the config, whose cache must be in
Redis (a local cache would vanish with this process); or, with ``--via``, a
running sidecar. A line that carries its response is stored from the file
(in-process only) through a second in-process sidecar whose upstream replays
the file; the others are looked up, and misses go upstream, at most
``--concurrency`` at a time, retried on 429 and 5xx.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
import orjson
from aiohttp import web

from proxy.app import PIPELINE, build_app
from proxy.config import SidecarConfig
from proxy.server import running

_LINE_HEADER = "x-warm-line"  # not x-sidecar-*: those never reach the upstream
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_ENDPOINTS = ("/chat/completions", "/embeddings", "/completions", "/responses")


class WarmError(Exception):
    """The warm run cannot start (bad arguments or configuration)."""


@dataclass(frozen=True, slots=True)
class Item:
    """One request of the file."""

    line: int
    path: str  # under /v1
    body: bytes
    headers: dict[str, str]
    response: bytes | None


def parse_line(number: int, text: str) -> Item | str:
    """The line's request, or why it cannot be used."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(doc, dict):
        return "not a JSON object"
    body = doc.get("body", doc.get("request"))
    record = isinstance(body, dict)
    if not record:
        body = doc
    assert isinstance(body, dict)
    path = _path(doc.get("url") if record else None, body)
    if path is None:
        return "no endpoint: give url, or a body with messages, input or prompt"
    # Delivery is not part of any key: warm with plain JSON answers.
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    headers = doc.get("headers") if record else None
    if headers is not None and not (isinstance(headers, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        return "headers must map names to strings"
    response = _response(doc.get("response")) if record else None
    if isinstance(response, str):
        return response
    return Item(number, path, orjson.dumps(body), dict(headers or {}), response)


def _path(url: object, body: dict[str, Any]) -> str | None:
    if isinstance(url, str):
        path = url.split("?", 1)[0].removeprefix("/v1")
        return path if path in _ENDPOINTS else None
    for name, path in (("messages", "/chat/completions"), ("input", "/embeddings"),
                       ("prompt", "/completions")):
        if name in body:
            return path
    return None


def _response(raw: object) -> bytes | str | None:
    if raw is None:
        return None
    if isinstance(raw, dict) and "status_code" in raw:  # a Batch API output line
        if raw.get("status_code") != 200:
            return None  # a failed answer: fetch it again
        raw = raw.get("body")
    if not isinstance(raw, dict):
        return "response must be a JSON object"
    return orjson.dumps(raw)


@dataclass(slots=True)
class Tally:
    """How the run went, line by line."""

    total: int | None
    done: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    invalid: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, outcome: str, failure: str | None = None) -> None:
        """Count one finished line."""
        self.done += 1
        self.outcomes[outcome] += 1
        if failure is not None:
            self.failures[failure] += 1

    def summary(self) -> str:
        """One paragraph for the end of the run."""
        elapsed_s = time.monotonic() - self.started
        parts = [f"{self.outcomes[k]} {label}" for k, label in (
            ("stored", "fetched and stored"), ("given", "stored from the file"),
            ("cached", "already cached"), ("uncacheable", "not cacheable"),
            ("failed", "failed"), ("invalid", "invalid")) if self.outcomes[k]]
        text = (f"warm: {self.done} requests in {elapsed_s:.1f} s: "
                f"{', '.join(parts) or 'nothing to do'}")
        if self.failures:
            text += " (" + ", ".join(f"{k}: {n}" for k, n in self.failures.most_common()) + ")"
        for problem in self.invalid[:10]:
            text += f"\n  {problem}"
        if len(self.invalid) > 10:
            text += f"\n  ... and {len(self.invalid) - 10} more invalid lines"
        return text


class Progress:
    """A progress bar on a terminal, a line per tenth otherwise (logs, CI)."""

    def __init__(self, out: IO[str], tally: Tally) -> None:
        self.out = out
        self.tally = tally
        self.tty = out.isatty()
        self._next_draw = 0.0
        self._next_tenth = 1

    def update(self, final: bool = False) -> None:
        """Redraw if it is time to."""
        t = self.tally
        if self.tty:
            now = time.monotonic()
            if not final and now < self._next_draw:
                return
            self._next_draw = now + 0.1
            width = 30
            frac = t.done / t.total if t.total else 0.0
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            of = f"/{t.total}" if t.total is not None else ""
            self.out.write(f"\r[{bar}] {t.done}{of}  stored {t.outcomes['stored']}"
                           f"  given {t.outcomes['given']}  cached {t.outcomes['cached']}"
                           f"  failed {t.outcomes['failed']}" + ("\n" if final else ""))
            self.out.flush()
        elif t.total and t.done * 10 >= self._next_tenth * t.total:
            while t.done * 10 >= self._next_tenth * t.total:
                self._next_tenth += 1
            self.out.write(f"warm: {t.done}/{t.total} ({100 * t.done // t.total}%)\n")
            self.out.flush()


class Warmer:
    """Sends the file's requests through sidecars and counts what happened."""

    def __init__(self, session: aiohttp.ClientSession, fetch_url: str, replay_url: str | None,
                 api_key: str | None, concurrency: int, retries: int = 3,
                 retry_delay_s: float = 0.5) -> None:
        self.session = session
        self.fetch_url = fetch_url.rstrip("/")
        self.replay_url = replay_url.rstrip("/") if replay_url else None
        self.api_key = api_key
        self.concurrency = concurrency
        self.retries = retries
        self.retry_delay_s = retry_delay_s

    async def run(self, lines: Iterator[tuple[int, str]], tally: Tally,
                  progress: Progress | None, replay: dict[int, bytes]) -> None:
        """Warm from ``lines`` (number, text), ``concurrency`` requests at a time."""
        queue: asyncio.Queue[Item | None] = asyncio.Queue(self.concurrency * 2)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                outcome, failure = await self._one(item)
                replay.pop(item.line, None)
                tally.add(outcome, failure)
                if progress is not None:
                    progress.update()

        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            for number, text in lines:
                if not text.strip():
                    continue
                item = parse_line(number, text)
                if isinstance(item, str):
                    tally.invalid.append(f"line {number}: {item}")
                    tally.add("invalid")
                    continue
                if item.response is not None and self.replay_url is not None:
                    replay[item.line] = item.response
                await queue.put(item)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()

    async def _one(self, item: Item) -> tuple[str, str | None]:
        replay_url = self.replay_url if item.response is not None else None
        given = replay_url is not None
        url = (replay_url or self.fetch_url) + "/v1" + item.path
        headers = {"Content-Type": "application/json", **item.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if given:
            headers[_LINE_HEADER] = str(item.line)
        delay, error = self.retry_delay_s, ""
        for attempt in range(self.retries + 1):
            try:
                async with self.session.post(url, data=item.body, headers=headers) as resp:
                    await resp.read()
                    status, cache = resp.status, resp.headers.get("x-sidecar-cache", "")
                    retry_after = resp.headers.get("retry-after")
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, cache, retry_after = 0, "", None
                error = type(exc).__name__
            if status == 200:
                if cache.startswith("hit"):
                    return "cached", None
                if not cache:
                    return "uncacheable", None
                return ("given" if given else "stored"), None
            if (status not in _RETRY_STATUSES and status != 0) or attempt == self.retries:
                break
            await asyncio.sleep(_retry_delay(retry_after, delay))
            delay *= 2
        return "failed", (f"HTTP {status}" if status else error)


def _retry_delay(retry_after: str | None, fallback: float) -> float:
    try:
        return min(30.0, max(0.0, float(retry_after))) if retry_after else fallback
    except ValueError:
        return fallback


@asynccontextmanager
async def _replay_upstream(answers: dict[int, bytes]) -> AsyncIterator[str]:
    """An upstream that answers each request with the response its line carried."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        line = request.headers.get(_LINE_HEADER, "")
        body = answers.get(int(line)) if line.isdigit() else None
        if body is None:
            return web.json_response({"error": {"message": "no response for this line",
                                                "type": "server_error"}}, status=500)
        return web.Response(body=body, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


def _local_cfg(cfg: SidecarConfig, upstream: str | None = None) -> SidecarConfig:
    """``cfg`` for an in-process sidecar: loopback, free port, quiet.

    Its retries are off: warm retries each line itself (honouring Retry-After),
    and a fallback model's answer must not be warmed under the requested one.
    """
    changed = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, host="127.0.0.1", port=0,
                                        access_log=False),
        telemetry=dataclasses.replace(cfg.telemetry, enabled=False),
        routing=dataclasses.replace(cfg.routing, retry=dataclasses.replace(
            cfg.routing.retry, max_retries=0, fallbacks={})))
    if upstream is not None:
        changed = dataclasses.replace(changed, upstream=dataclasses.replace(
            cfg.upstream, base_url=upstream, api_key=None, api_key_env=None))
    return changed


def count_lines(path: str) -> int:
    """Non-blank lines of a file (the progress bar's 100%)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


async def warm(cfg: SidecarConfig, stream: IO[str], *, total: int | None, via: str | None,
               concurrency: int, api_key: str | None,
               progress_out: IO[str] | None = None, retries: int = 3,
               retry_delay_s: float = 0.5) -> Tally:
    """Warm the cache from the JSONL ``stream`` (``total`` lines, if known)."""
    if concurrency < 1:
        raise WarmError("--concurrency must be at least 1")
    if via is None:
        if not cfg.cache.enabled:
            raise WarmError("the cache is off in this configuration (cache.enabled)")
        if not cfg.cache.redis_url:
            raise WarmError("cache.redis_url is not set: entries warmed into this process's "
                            "local cache would vanish with it; give the fleet's Redis, or "
                            "--via URL to warm a running sidecar")
    tally = Tally(total)
    progress = Progress(progress_out, tally) if progress_out is not None else None
    replay: dict[int, bytes] = {}
    async with AsyncExitStack() as stack:
        apps: list[web.Application] = []
        replay_url: str | None = None
        if via is not None:
            fetch_url = via.removesuffix("/").removesuffix("/v1")
        else:
            app = build_app(_local_cfg(cfg), env={"OTEL_SDK_DISABLED": "true"})
            apps.append(app)
            fetch_url = await stack.enter_async_context(running(app, _local_cfg(cfg)))
            upstream = await stack.enter_async_context(_replay_upstream(replay))
            replay_cfg = _local_cfg(cfg, upstream)
            app = build_app(replay_cfg, env={"OTEL_SDK_DISABLED": "true"})
            apps.append(app)
            replay_url = await stack.enter_async_context(running(app, replay_cfg))
        timeout = aiohttp.ClientTimeout(total=cfg.upstream.read_timeout_s * 2)
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        warmer = Warmer(session, fetch_url, replay_url, api_key, concurrency, retries,
                        retry_delay_s)
        await warmer.run(enumerate(stream, 1), tally, progress, replay)
        # Entries are stored after each answer is sent: wait for them to land.
        for app in apps:
            await app[PIPELINE].settler.join()
    if progress is not None:
        progress.update(final=True)
    return tally

