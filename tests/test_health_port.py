"""server.health_port: a second listener answering only the kubelet probes."""

from __future__ import annotations

import urllib.error
import urllib.request

import orjson
import pytest
from yarl import URL

from proxy.app import HEALTH_LISTENER
from proxy.config import ConfigError, ServerConfig, load_config
from tests.conftest import SidecarFactory


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_port_serves_only_the_probes(sidecars: SidecarFactory) -> None:
    # The default health_host (0.0.0.0), as in a pod; reached over loopback here.
    proxy_url = sidecars.start(server=ServerConfig(port=0, health_port=0))
    listener = sidecars.apps[proxy_url][HEALTH_LISTENER]
    assert listener.url is not None and URL(listener.url).host == "0.0.0.0"
    health = f"http://127.0.0.1:{URL(listener.url).port}"
    assert URL(health).port != URL(proxy_url).port

    status, body = _get(f"{health}/healthz")
    assert (status, orjson.loads(body)) == (200, {"status": "alive"})
    status, body = _get(f"{health}/readyz")
    assert status == 200 and orjson.loads(body)["status"] in ("ready", "degraded")
    # Same registry behind both ports: the same readiness verdict.
    assert _get(proxy_url.removesuffix("/v1") + "/readyz")[0] == status

    for path in ("/v1/models", "/status", "/v1/chat/completions"):
        assert _get(f"{health}{path}")[0] == 404, path
    assert _get(f"{proxy_url}/models")[0] == 200  # the proxy port still relays


def test_health_port_from_the_variable_the_injector_sets() -> None:
    cfg = load_config(None, environ={"SIDECAR_SERVER__HEALTH_PORT": "8081"})
    assert cfg.server.health_port == 8081 and cfg.server.health_host == "0.0.0.0"
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={"SIDECAR_SERVER__HEALTH_PORT": "8080"})
    assert err.value.problems == ["server.health_port: 8080 is already the proxy or metrics port"]
