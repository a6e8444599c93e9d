"""`llm-sidecar serve` as a real process: starts, serves the SDK, drains on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.conftest import Mock

_LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+/v1)")


@pytest.fixture
def served(mock: Mock) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["SIDECAR_SERVER__SHUTDOWN_TIMEOUT_S"] = "10"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--port", "0", "--upstream", mock.url],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    url = None
    lines = []
    for line in proc.stderr:  # the log line is the readiness signal, no polling
        lines.append(line)
        if m := _LISTENING.search(line):
            url = m.group(1)
            break
    assert url, "".join(lines)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_serve_process_relays_and_drains_on_sigterm(
        served: tuple[subprocess.Popen[str], str], mock: Mock) -> None:
    proc, url = served
    with openai.OpenAI(base_url=url, api_key="sk-secret-agent-key", max_retries=0) as c:
        ok = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].message.content
        # A slow request is in flight when SIGTERM arrives: it must still complete.
        key = "POST /v1/chat/completions"
        seen = mock.server.stats.requests[key]
        result: dict[str, Any] = {}

        def slow() -> None:
            try:
                result["r"] = c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "slow"}],
                    extra_headers={"x-mock-latency-ms": "700"})
            except Exception as exc:
                result["e"] = exc

        t = threading.Thread(target=slow)
        t.start()
        assert mock.server.stats.wait_for_requests(key, seen + 1, 10)
        proc.send_signal(signal.SIGTERM)
        t.join(15)
    assert "e" not in result, result.get("e")
    assert result["r"].choices[0].message.content
    assert proc.wait(15) == 0
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "draining" in log
    assert "sk-secret-agent-key" not in log
