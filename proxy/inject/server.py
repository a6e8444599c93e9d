"""The injector's HTTPS server: ``POST /mutate``, ``GET /healthz``, ``GET /readyz``.

Certificate rotation: the certificate and key files are checked at every new
TLS handshake (one ``stat`` of each, from the handshake's SNI callback, which
OpenSSL calls whether or not the client sent a server name). When the mtime,
size or inode of either changed since the last load, a new SSLContext is built
from them and that handshake, and every later one, uses it. A rewrite seen
half-way (certificate and key not matching yet) keeps the previous pair in
service and is retried when the files change again; an open connection keeps
the certificate it was opened with. Checking per connection rather than on a
timer means no background task and no window where a rotated certificate
waits to be noticed.

Requests that are not AdmissionReview v1 documents get a 400 naming the
problem, a body over the size limit a 413. A failure inside the injector
itself answers ``allowed: true`` without a patch, with a warning, and is
logged: the webhook never blocks a pod.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.inject.admission import BadReview, Decision, decide, parse_review, respond
from proxy.inject.config import InjectorConfig
from proxy.server import wait_for_stop_signal

log = logging.getLogger("proxy.inject")

# An AdmissionReview carries one object (the API server stores at most
# 1.5 MiB) and, on UPDATE, the old one too.
MAX_BODY_BYTES = 8 * 1024 * 1024
SHUTDOWN_TIMEOUT_S = 10.0

_Signature = tuple[tuple[int, int, int], ...]


class TlsFiles:
    """A server certificate and key on disk, reloaded when the files change.

    Construction loads them and raises OSError or ssl.SSLError if it cannot:
    a webhook that starts must be able to serve. ``listening`` is the context
    to give the listener.
    """

    def __init__(self, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.reloads = 0
        self.last_error: str | None = None
        self._loaded_signature = self._signature()
        self._failed_signature: _Signature | None = None
        self._current = self._build()
        self.loaded_at = time.time()
        self.listening = self._build()
        self.listening.sni_callback = self._on_client_hello

    def _signature(self) -> _Signature:
        stats = (os.stat(self.cert), os.stat(self.key))
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # The API server offers h2 too; this server speaks HTTP/1.1 only.
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    @property
    def context(self) -> ssl.SSLContext:
        """The context new handshakes use (the latest pair that loaded)."""
        return self._current

    def refresh(self) -> bool:
        """Reload the pair if the files changed since the last attempt; True if reloaded."""
        try:
            signature = self._signature()
        except OSError as exc:
            # Mid-rotation a file can be briefly missing; serve the current pair.
            self._note_failure(None, f"cannot stat: {exc.strerror or exc}")
            return False
        if signature in (self._loaded_signature, self._failed_signature):
            return False
        try:
            # Stat first, read second: a change during the load shows as a new
            # signature next time, so no update can be missed.
            ctx = self._build()
        except (OSError, ssl.SSLError) as exc:
            self._note_failure(signature, f"cannot load: {exc}")
            return False
        self._current = ctx
        self._loaded_signature = signature
        self._failed_signature = None
        self.last_error = None
        self.loaded_at = time.time()
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    def _note_failure(self, signature: _Signature | None, error: str) -> None:
        if error != self.last_error:
            log.warning("TLS certificate %s: %s; still serving the previous one",
                        self.cert, error)
        self._failed_signature = signature
        self.last_error = error

    def _on_client_hello(self, conn: ssl.SSLObject, server_name: str | None,
                         ctx: ssl.SSLContext) -> None:
        try:
            self.refresh()
        except Exception:  # an exception here would only fail the handshake
            log.exception("TLS certificate reload failed")
        conn.context = self._current

    def status(self) -> dict[str, Any]:
        """For /readyz: what is served, since when, and the last reload problem."""
        return {"cert": str(self.cert), "loaded_at": round(self.loaded_at, 3),
                "reloads": self.reloads, "last_error": self.last_error}


class _Handlers:
    def __init__(self, cfg: InjectorConfig, tls: TlsFiles | None) -> None:
        self.cfg = cfg
        self.tls = tls
        self.stopping = False

    async def mutate(self, request: web.Request) -> web.Response:
        body = await request.read()  # over client_max_size: aiohttp answers 413
        if not body:
            return _bad_request("empty body: expected an AdmissionReview v1 JSON document")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _bad_request(f"body is not valid JSON: {exc}")
        try:
            review = parse_review(doc)
        except BadReview as exc:
            return _bad_request(f"not an AdmissionReview v1 request: {exc}")
        try:
            decision = decide(review, self.cfg)
            answer = respond(review.uid, decision)
        except Exception:
            log.exception("injector failed on %s %s %s (uid %s); allowing it unchanged",
                          review.operation, review.kind, review.describe(), review.uid)
            decision = Decision.failed()
            answer = respond(review.uid, decision)
        level = logging.DEBUG if decision.outcome.startswith("ignored") else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s: %s%s%s", review.kind.lower(), review.describe(),
                    decision.outcome, " (dry run)" if review.dry_run else "",
                    "".join(f"; {w}" for w in decision.warnings))
        return _json(answer)

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        doc: dict[str, Any] = {"status": "not ready" if self.stopping else "ready"}
        if self.tls is not None:
            doc["tls"] = self.tls.status()
        return _json(doc, status=503 if self.stopping else 200)

    async def on_shutdown(self, app: web.Application) -> None:
        self.stopping = True


def build_app(cfg: InjectorConfig, tls: TlsFiles | None = None, *,
              max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    """The webhook application (not started); ``tls`` only feeds /readyz here."""
    app = web.Application(client_max_size=max_body_bytes)
    handlers = _Handlers(cfg, tls)
    app.router.add_post("/mutate", handlers.mutate)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.on_shutdown.append(handlers.on_shutdown)
    return app


@contextlib.asynccontextmanager
async def running(app: web.Application, host: str, port: int,
                  tls: TlsFiles | None = None) -> AsyncIterator[str]:
    """Serve ``app`` (HTTPS when ``tls`` is given) while open; yields the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=256,
                           ssl_context=tls.listening if tls is not None else None)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"{'https' if tls is not None else 'http'}://{shown}:{bound_port}"
    finally:
        await runner.cleanup()


async def serve(cfg: InjectorConfig, host: str, port: int, tls: TlsFiles | None) -> None:
    """Serve until SIGINT or SIGTERM."""
    async with running(build_app(cfg, tls), host, port, tls) as url:
        log.info("llm-sidecar injector listening on %s (config %s, %s sidecar %s)", url,
                 cfg.source, "native" if cfg.sidecar.native else "classic", cfg.sidecar.image)
        if tls is None:
            log.warning("serving plain HTTP: the Kubernetes API server only calls HTTPS "
                        "webhooks (pass --tls-cert and --tls-key)")
        await wait_for_stop_signal()
        log.info("stopping")


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def _bad_request(message: str) -> web.Response:
    return _json({"error": message}, status=400)
