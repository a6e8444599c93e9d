"""Command line: ``llm-sidecar serve | demo | warm | check-config | inject-webhook | wait-ready
| version``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from proxy import __version__
from proxy.config import ConfigError, SidecarConfig, describe_defaults, load_config
from proxy.server import loop_factory

EXIT_BAD_CONFIG = 2
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


def _load(path: str | None) -> SidecarConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        _report(exc)
        raise SystemExit(EXIT_BAD_CONFIG) from None


def _report(exc: ConfigError, what: str = "configuration") -> None:
    print(f"llm-sidecar: invalid {what} ({len(exc.problems)} problem"
          f"{'s' if len(exc.problems) != 1 else ''}):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from proxy import logs
    from proxy.app import build_app
    from proxy.server import serve_forever
    from proxy.telemetry.providers import TelemetryConfigError

    cfg = _load(args.config)
    server = cfg.server
    if args.host is not None:
        server = dataclasses.replace(server, host=args.host)
    if args.port is not None:
        server = dataclasses.replace(server, port=args.port)
    cfg = dataclasses.replace(cfg, server=server)
    if args.upstream is not None:
        cfg = dataclasses.replace(cfg, upstream=dataclasses.replace(
            cfg.upstream, base_url=args.upstream))
    logs.configure(cfg.logging.level, cfg.logging.format)
    try:
        app = build_app(cfg)
    except TelemetryConfigError as exc:
        print(f"llm-sidecar: invalid telemetry environment: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    run(serve_forever(app, cfg))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    print(f"{cfg.source}: OK (upstream {cfg.upstream.base_url}, "
          f"listen {cfg.server.host}:{cfg.server.port})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run(run_demo(requests=args.requests, concurrency=args.concurrency)) or 0


def _warm(args: argparse.Namespace) -> int:
    import os

    from proxy.warm import WarmError, count_lines, warm

    cfg = _load(args.config)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    try:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        print(f"llm-sidecar warm: {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    total = None if args.file == "-" else count_lines(args.file)
    try:
        with stream:
            tally = run(warm(cfg, stream, total=total, via=args.via,
                             concurrency=args.concurrency, api_key=api_key,
                             progress_out=sys.stderr))
    except WarmError as exc:
        print(f"llm-sidecar warm: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(tally.summary())
    return 1 if tally.outcomes["failed"] or tally.outcomes["invalid"] else 0


def _inject_webhook(args: argparse.Namespace) -> int:
    import ssl

    from proxy import logs
    from proxy.inject.config import load_injector_config
    from proxy.inject.server import TlsFiles, serve

    try:
        cfg = load_injector_config(args.config)
    except ConfigError as exc:
        _report(exc, "injector configuration")
        return EXIT_BAD_CONFIG
    tls = None
    if args.tls_cert is not None:
        try:
            tls = TlsFiles(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            print(f"llm-sidecar inject-webhook: cannot load the TLS certificate and key: {exc}",
                  file=sys.stderr)
            return EXIT_BAD_CONFIG
    logs.configure(args.log_level, args.log_format)
    run(serve(cfg, args.host, args.port, tls))
    return 0


def _wait_ready(args: argparse.Namespace) -> int:
    import time
    import urllib.error
    import urllib.request

    # No proxy: the URL is the pod's own loopback, whatever HTTP_PROXY says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with opener.open(args.url, timeout=max(0.2, min(2.0, remaining))) as resp:
                if resp.status == 200:
                    return 0
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() + args.interval >= deadline:
            break
        time.sleep(args.interval)
    print(f"llm-sidecar wait-ready: {args.url} not ready after {args.timeout:g}s ({last})",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``llm-sidecar`` console script."""
    parser = argparse.ArgumentParser(
        prog="llm-sidecar",
        description="Transparent OpenAI-compatible sidecar proxy.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the sidecar")
    p.add_argument("--config", "-c", help="YAML config file (default $SIDECAR_CONFIG)")
    p.add_argument("--host", help="listen address (overrides server.host)")
    p.add_argument("--port", type=int, help="listen port (overrides server.port)")
    p.add_argument("--upstream", help="upstream base URL (overrides upstream.base_url)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("check-config", help="validate a config file and exit",
                       epilog="Settings and defaults:\n\n" + describe_defaults(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("demo", help="run mock upstream + sidecar and an agent workload")
    p.add_argument("--requests", type=int, default=120, help="agent turns to run")
    p.add_argument("--concurrency", type=int, default=8, help="agents running at once")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "warm", help="pre-populate the shared cache from a JSONL file of requests",
        description="Each line: a request body, or {url, body, response?, headers?} (the "
        "OpenAI Batch API's input and output lines work as they are). Lines with a "
        "response are stored as given; the others are looked up and their misses sent "
        "upstream. Run with the agents' API key so entries land in their tenant's scope "
        "(or set cache.share_tenants). Exit status 1 if any line failed or was invalid.")
    p.add_argument("file", help="JSONL file of requests ('-': standard input)")
    p.add_argument("--config", "-c", help="YAML config file (default $SIDECAR_CONFIG); its "
                   "cache must use Redis unless --via is given")
    p.add_argument("--via", metavar="URL", help="send through this running sidecar instead "
                   "of an in-process one (responses in the file are then not used)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                   help="environment variable holding the API key to send (default "
                   "OPENAI_API_KEY; never pass a key on the command line)")
    p.set_defaults(func=_warm)

    p = sub.add_parser(
        "inject-webhook", help="serve the Kubernetes admission webhook that injects the sidecar",
        description="Mutating admission webhook: POST /mutate (AdmissionReview v1), GET /healthz, "
        "GET /readyz. The certificate and key are re-read when the files change.")
    p.add_argument("--config", "-c", required=True, help="injector YAML (injector.yaml)")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain); without it "
                   "the webhook serves plain HTTP, which only tests can use")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8443, help="listen port (default 8443)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    p.set_defaults(func=_inject_webhook)

    p = sub.add_parser(
        "wait-ready", help="wait until a URL answers 200 (the classic sidecar's postStart hook)")
    p.add_argument("--url", required=True, help="URL to poll, e.g. http://127.0.0.1:8081/readyz")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many "
                   "seconds (exit status 1)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between attempts")
    p.set_defaults(func=_wait_ready)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda _a: print(__version__) or 0)

    args = parser.parse_args(argv)
    if args.command == "inject-webhook" and (args.tls_cert is None) != (args.tls_key is None):
        parser.error("inject-webhook: --tls-cert and --tls-key go together")
    raise SystemExit(args.func(args))
