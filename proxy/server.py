"""Runs an Application on a TCP port with the sidecar's server settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable

from aiohttp import web
from aiohttp.log import access_logger

from proxy.config import SidecarConfig


@contextlib.asynccontextmanager
async def running(app: web.Application, cfg: SidecarConfig,
                  port: int | None = None) -> AsyncIterator[str]:
    """Serve ``app`` while the context is open; yields its base URL (``http://host:port``).

    Handlers are cancelled when their client disconnects, which is how an
    abandoned stream stops the upstream request at once.
    """
    runner = web.AppRunner(app, handler_cancellation=True,
                           # Pass-through bodies are relayed still encoded; the
                           # pipeline decodes the JSON bodies it must read.
                           auto_decompress=False,
                           access_log=access_logger if cfg.server.access_log else None,
                           shutdown_timeout=cfg.server.shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.server.host,
                           cfg.server.port if port is None else port, backlog=1024)
        await site.start()
        bound_port = runner.addresses[0][1]
        host = cfg.server.host
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound_port}"
    finally:
        await runner.cleanup()


log = logging.getLogger("proxy.server")


class SideListener:
    """A second listener serving only the routes it is given, on its own port.

    The proxy port stays on loopback while kubelet probes and Prometheus
    reach the pod IP, so no /v1 route is reachable from outside the pod
    through such a port.
    """

    def __init__(self, routes: Iterable[web.RouteDef], host: str, port: int) -> None:
        self.app = web.Application()
        self.app.add_routes(routes)
        self.host = host
        self.port = port
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen; returns the base URL (``http://host:port``)."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        host, port = self._runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class HealthListener(SideListener):
    """The probe routes on ``server.health_port``."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when it is installed (the stdlib loop works, only slower)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def wait_for_stop_signal() -> None:
    """Return on SIGINT or SIGTERM (where the loop cannot trap them, Ctrl-C still raises)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_forever(app: web.Application, cfg: SidecarConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain in-flight requests and stop."""
    async with running(app, cfg) as url:
        log.info("llm-sidecar listening on %s/v1 (upstream %s)", url, cfg.upstream.base_url)
        await wait_for_stop_signal()
        log.info("stopping: draining in-flight requests (up to %.0fs)",
                 cfg.server.shutdown_timeout_s)
