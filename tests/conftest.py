"""Shared harness: real aiohttp servers (mock upstream, sidecar) on loopback ports.

The servers run on an event loop in a background thread, so tests can drive
them with the synchronous openai SDK, or with the async SDK on their own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import openai
import orjson
import pytest
from aiohttp import web

from loadtest.loop_thread import LoopThread
from loadtest.mock_upstream import MockConfig, MockUpstream
from proxy.app import PIPELINE, build_app
from proxy.config import ServerConfig, SidecarConfig, UpstreamConfig
from proxy.server import running
from tests.redis_server import RedisServer

CHAT_ROUTE = "POST /v1/chat/completions"

T = TypeVar("T")


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@dataclasses.dataclass
class Mock:
    server: MockUpstream
    url: str  # base URL, ends in /v1


@pytest.fixture(scope="session")
def mock(loop_thread: LoopThread) -> Iterator[Mock]:
    server = MockUpstream(MockConfig())
    url = loop_thread.call(server.start())
    yield Mock(server, url)
    loop_thread.call(server.stop())


class SidecarFactory:
    """Starts sidecars with a given config on the loop thread; stops them all at the end."""

    def __init__(self, loop_thread: LoopThread, mock: Mock) -> None:
        self.lt = loop_thread
        self.mock = mock
        self.stack = AsyncExitStack()
        self.apps: dict[str, web.Application] = {}

    def start(self, *, upstream: UpstreamConfig | None = None,
              server: ServerConfig | None = None, env: dict[str, str] | None = None,
              **sections: Any) -> str:
        """Start a sidecar and return its OpenAI base URL (``http://127.0.0.1:PORT/v1``).

        ``env`` stands in for the process environment (OTEL_* settings); by
        default telemetry is off, as on a machine without a collector.
        """
        cfg = SidecarConfig(
            server=server or ServerConfig(port=0),
            upstream=upstream or UpstreamConfig(base_url=self.mock.url),
            **sections)
        app = build_app(cfg, env=env or {})

        async def go() -> str:
            url: str = await self.stack.enter_async_context(running(app, cfg, port=0))
            return url + "/v1"

        url = self.lt.call(go())
        self.apps[url] = app
        return url

    def close(self) -> None:
        self.lt.call(self.stack.aclose())


@pytest.fixture(scope="module")
def sidecars(loop_thread: LoopThread, mock: Mock) -> Iterator[SidecarFactory]:
    """Per module, so a module's sidecars stop before its private Redis does."""
    factory = SidecarFactory(loop_thread, mock)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def sidecar(sidecars: SidecarFactory) -> str:
    """The default sidecar (embedded defaults, upstream = mock)."""
    return sidecars.start()


@pytest.fixture(scope="module")
def local(sidecar: str) -> str:
    """The default sidecar under the name the cache modules use: its cache is local only."""
    return sidecar


def sdk(url: str, key: str = "sk-test-client") -> openai.OpenAI:
    """The official client for ``url``: no retries (a test sees every answer), 20 s timeout."""
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=20)


@pytest.fixture
def client(sidecar: str) -> Iterator[openai.OpenAI]:
    with sdk(sidecar) as c:
        yield c


@pytest.fixture
def direct(mock: Mock) -> Iterator[openai.OpenAI]:
    """A client talking to the mock directly: what the agent would see without the sidecar."""
    with openai.OpenAI(base_url=mock.url, api_key="sk-test-client", max_retries=0,
                       timeout=20) as c:
        yield c


@pytest.fixture
def redis_server(tmp_path: Any) -> Iterator[RedisServer]:
    """A private redis-server for one test (stoppable: fault injection)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server shared by one test module's tests."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def run_async() -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine on a fresh loop in the test thread (for AsyncOpenAI tests)."""
    return asyncio.run


class UpstreamCalls:
    """Counts the requests one route of the mock upstream received since creation."""

    def __init__(self, mock: Mock, route: str = CHAT_ROUTE) -> None:
        self.stats = mock.server.stats
        self.route = route
        self.start = self.stats.requests[route]

    @property
    def calls(self) -> int:
        """Requests that reached the upstream on this route since this counter was made."""
        return self.stats.requests[self.route] - self.start

    def last_body(self) -> Any:
        """The JSON body of the latest request on this route."""
        path = self.route.split(" ", 1)[1]
        return orjson.loads([r for r in self.stats.last_requests if r.path == path][-1].body)


def settled(sidecars: SidecarFactory, url: str) -> None:
    """Wait until every finished request of that sidecar settled (so answers are stored)."""
    sidecars.lt.call(sidecars.apps[url][PIPELINE].settler.join())


class Scripted:
    """An upstream whose every POST under /v1 answers with ``doc`` (a test sets it)."""

    def __init__(self) -> None:
        self.doc: Any = {}
        self.calls = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        doc = self.doc(await request.json()) if callable(self.doc) else self.doc
        return web.json_response(doc)


@contextlib.contextmanager
def serving(loop_thread: LoopThread, app: web.Application) -> Iterator[str]:
    """Serve ``app`` on a free loopback port while open; yields its ``/v1`` base URL."""
    runner = web.AppRunner(app)

    async def start() -> str:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    try:
        yield loop_thread.call(start())
    finally:
        loop_thread.call(runner.cleanup())


@pytest.fixture(scope="module")
def scripted(loop_thread: LoopThread) -> Iterator[Scripted]:
    """A scripted upstream on a loopback port (``doc`` may be a function of the request)."""
    upstream = Scripted()
    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", upstream.handle)
    with serving(loop_thread, app) as url:
        upstream.url = url
        yield upstream
