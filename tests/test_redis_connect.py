"""Redis URLs (proxy.redis_connect): a real Sentinel-watched master and replica, failover.

Every Redis here is a real process on a free loopback port: a master, a
replica (``--replicaof``) and a ``redis-server --sentinel`` watching them,
all password-protected, the sentinel with a password of its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from loadtest.bench import free_port
from proxy.cache.store import CacheStore
from proxy.config import ConfigError, QuotaConfig, RateLimitConfig, RuleConfig, load_config
from proxy.ratelimit.limiter import Limiter
from proxy.ratelimit.policy import Policy
from proxy.redis_connect import RedisURLError, connect, parse, resp_client_url
from proxy.resp import RespClient
from tests.redis_server import RedisServer

PASSWORD = "m4ster-s3cret"
SENTINEL_PASSWORD = "s3ntinel-s3cret"
T = TypeVar("T")


def _until(what: str, probe: Callable[[], T | None], timeout_s: float = 20.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelProcess:
    """``redis-server sentinel.conf --sentinel``; a thread drains its log for its whole life."""

    def __init__(self, workdir: Path, master_port: int) -> None:
        self.port = free_port()
        conf = workdir / f"sentinel-{self.port}.conf"  # rewritten by the sentinel itself
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
            f"sentinel auth-pass mymaster {PASSWORD}\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            # A failed attempt is retried after twice this: keep it short.
            "sentinel failover-timeout mymaster 2000\n")
        self.log: list[str] = []
        self.monitoring = threading.Event()
        self.proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Logged once it listens and watches the master.
        if not self.monitoring.wait(10) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("sentinel did not start:\n" + "".join(self.log))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if "+monitor master mymaster" in line:
                self.monitoring.set()
        self.monitoring.set()  # exited: wake the waiter, which sees the process is gone

    def admin(self) -> redis.Redis:
        """A synchronous client of this sentinel."""
        return redis.Redis(port=self.port, password=SENTINEL_PASSWORD, socket_timeout=5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(10)


@dataclass
class Setup:
    master: RedisServer
    replica: RedisServer
    sentinel: SentinelProcess

    def url(self, db: int = 0, scheme: str = "redis+sentinel") -> str:
        return (f"{scheme}://:{PASSWORD}@127.0.0.1:{self.sentinel.port}/mymaster/{db}"
                f"?sentinel_password={SENTINEL_PASSWORD}")

    def direct(self, port: int, db: int = 0) -> redis.Redis:
        """A synchronous client of one server (bypassing the sentinel)."""
        return redis.Redis(port=port, db=db, password=PASSWORD, socket_timeout=5)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """Master, replica in sync, and a sentinel that knows both (per test: failover changes it)."""
    # No diskless-sync delay: the replica syncs at once instead of after 5 s.
    auth = ("--requirepass", PASSWORD, "--masterauth", PASSWORD,
            "--repl-diskless-sync-delay", "0")
    master = RedisServer(tmp_path / "master", extra_args=auth)
    master.workdir.mkdir()
    master.start()
    replica = RedisServer(tmp_path / "replica", extra_args=(
        *auth, "--replicaof", "127.0.0.1", str(master.port)))
    replica.workdir.mkdir()
    sentinel: SentinelProcess | None = None
    try:
        replica.start()
        with redis.Redis(port=replica.port, password=PASSWORD) as r:
            _until("the replica's link to the master",
                   lambda: r.info("replication")["master_link_status"] == "up")
        sentinel = SentinelProcess(tmp_path, master.port)
        with sentinel.admin() as s:
            # Sentinel's timers default to seconds (INFO every 10 s, an old master
            # demoted 8 s after it shows up as a replica): shorten them (Redis >= 7.0).
            s.execute_command("SENTINEL", "DEBUG", "info-period", 100, "ping-period", 100,
                              "publish-period", 100)
            # Failover needs a replica the sentinel has connected to and found in sync
            # (it learns of it from the master's INFO, then asks the replica itself).
            _until("the sentinel to see the replica in sync",
                   lambda: [x for x in s.sentinel_slaves("mymaster")
                            if x["port"] == replica.port and not x["is_disconnected"]
                            and x["master-link-status"] == "ok"])
        yield Setup(master, replica, sentinel)
    finally:
        if sentinel is not None:
            sentinel.stop()
        replica.stop()
        master.stop()


def test_a_sentinel_url_writes_and_reads_through_the_master(setup: Setup) -> None:
    async def go() -> tuple[bytes | None, bytes | None, int, int]:
        client = connect(setup.url(db=2), connect_timeout_s=2)
        try:
            await client.set("k", "v1")
            read = await client.get("k")
            on_master = setup.direct(setup.master.port, db=2).get("k")
            pool = client.connection_pool
            assert isinstance(pool, SentinelConnectionPool)
            assert pool.master_address is not None
            return read, on_master, int(pool.master_address[1]), await client.dbsize()
        finally:
            await client.aclose()

    read, on_master, port, size = asyncio.run(go())
    assert read == b"v1"
    assert on_master == b"v1"  # the write went to the master, in db 2
    assert setup.direct(setup.master.port, db=0).get("k") is None
    assert port == setup.master.port
    assert size == 1


def test_closing_the_client_closes_its_sentinel_connections(setup: Setup) -> None:
    def clients(s: redis.Redis) -> int:
        return int(s.info("clients")["connected_clients"])

    with setup.sentinel.admin() as s:
        before = clients(s)

        async def go() -> int:
            client = connect(setup.url(), connect_timeout_s=2)
            await client.ping()
            during = clients(s)
            await client.aclose()
            # Still on the loop: its end would drop the sockets whether closed or not.
            _until("the sentinel connections to close", lambda: clients(s) == before, 5)
            return during

        assert asyncio.run(go()) > before


def test_a_wrong_master_name_fails_on_use_without_the_password(setup: Setup) -> None:
    url = setup.url().replace("/mymaster/", "/nosuchmaster/")

    async def go() -> str:
        client = connect(url, connect_timeout_s=2)
        try:
            with pytest.raises(redis.exceptions.ConnectionError) as err:
                await client.ping()
            return str(err.value)
        finally:
            await client.aclose()

    message = asyncio.run(go())
    assert "nosuchmaster" in message
    assert PASSWORD not in message and SENTINEL_PASSWORD not in message


def test_after_a_failover_the_same_client_reaches_the_new_master(setup: Setup) -> None:
    async def go() -> None:
        client = connect(setup.url(), connect_timeout_s=2, socket_timeout_s=2)
        try:
            await client.set("before", "1")
            # Replication is asynchronous: a write the replica lacks dies with the switch.
            assert await client.execute_command("WAIT", 1, 5000) == 1
            with setup.sentinel.admin() as s:
                assert s.execute_command("SENTINEL", "FAILOVER", "mymaster")
                _until("the sentinel to name the replica as master", lambda: int(
                    s.sentinel_get_master_addr_by_name("mymaster")[1]) == setup.replica.port)
            with setup.direct(setup.master.port) as old:
                _until("the old master to be demoted", lambda: old.role()[0] == b"slave")

            async def write() -> bool:
                try:
                    await client.set("after", "2")
                except redis.exceptions.ConnectionError:
                    return False  # a connection to the demoted master, now dropped
                return True

            deadline = time.monotonic() + 20
            while not await write():
                assert time.monotonic() < deadline, "the client never reached the new master"
                await asyncio.sleep(0.05)
            assert await client.get("before") == b"1"
            pool = client.connection_pool
            assert isinstance(pool, SentinelConnectionPool)
            assert pool.master_address is not None
            assert int(pool.master_address[1]) == setup.replica.port
        finally:
            await client.aclose()

    asyncio.run(go())
    with setup.direct(setup.replica.port) as new:
        assert new.role()[0] == b"master"
        assert new.get("after") == b"2"  # written on the new master


def test_after_the_master_dies_the_same_client_reaches_the_promoted_replica(
        setup: Setup) -> None:
    async def go() -> None:
        client = connect(setup.url(), connect_timeout_s=1, socket_timeout_s=1)
        try:
            await client.set("before", "1")
            assert await client.execute_command("WAIT", 1, 5000) == 1  # the replica has it
            setup.master.stop()

            async def write() -> bool:
                try:
                    await client.set("after", "2")
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    return False  # master gone, replica not promoted yet
                return True

            deadline = time.monotonic() + 20
            while not await write():
                assert time.monotonic() < deadline, (
                    "the client never reached the new master; sentinel log:\n"
                    + "".join(setup.sentinel.log))
                await asyncio.sleep(0.05)
            assert await client.get("before") == b"1"
        finally:
            await client.aclose()

    asyncio.run(go())
    with setup.direct(setup.replica.port) as new:
        assert new.role()[0] == b"master"
        assert new.get("after") == b"2"


def _env_config(**env: str) -> Any:
    return load_config(environ={f"SIDECAR_{k}": v for k, v in env.items()})


def test_a_cache_store_from_config_with_a_sentinel_url_stores_in_the_master(
        setup: Setup) -> None:
    cfg = _env_config(CACHE__REDIS_URL=setup.url(db=1), CACHE__TIMEOUT_MS="1000")

    async def go() -> tuple[Any, Any, Any]:
        writer, reader = CacheStore(cfg.cache), CacheStore(cfg.cache)
        try:
            await writer.put(["llm-sidecar:cache:x:k1"], b'{"answer": 1}', 60)
            # A fresh store has nothing locally: this hit can only come from Redis.
            found = await reader.get(["llm-sidecar:cache:x:nope", "llm-sidecar:cache:x:k1"])
            return found, await reader.health(), await writer.health()
        finally:
            await writer.close()
            await reader.close()

    found, health, _ = asyncio.run(go())
    assert found is not None
    assert (found.index, found.value, found.where) == (1, b'{"answer": 1}', "redis")
    assert health.details["redis_errors"] == 0
    assert setup.direct(setup.master.port, db=1).get("llm-sidecar:cache:x:k1") == (
        b'{"answer": 1}')


def test_a_rate_limiter_with_a_sentinel_url_decides_in_redis(setup: Setup) -> None:
    rule = RuleConfig(name="r", requests=QuotaConfig(2, "1h"))
    cfg = RateLimitConfig(rules=(rule,), redis_url=setup.url(), timeout_ms=1000,
                          reserve_share=0)
    [charge] = Policy(cfg).charges({}, tokens=0)

    async def go() -> list[tuple[bool, str]]:
        limiter = Limiter(cfg)
        assert not isinstance(limiter.redis, RespClient)
        await limiter.start()
        try:
            return [((d := await limiter.decide([charge])).admitted, d.backend)
                    for _ in range(3)]
        finally:
            await limiter.close()

    assert asyncio.run(go()) == [(True, "redis"), (True, "redis"), (False, "redis")]
    # The bucket lives on the master.
    assert setup.direct(setup.master.port).dbsize() >= 1


def test_a_unix_socket_url_reaches_the_server(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, extra_args=("--unixsocket", str(sock),
                                               "--unixsocketperm", "700"))
    server.start()
    try:
        async def go() -> tuple[bytes | None, int]:
            client = connect(f"unix://{sock}?db=3", connect_timeout_s=2)
            try:
                await client.set("u", "x")
                return await client.get("u"), int(client.connection_pool.connection_kwargs["db"])
            finally:
                await client.aclose()

        assert asyncio.run(go()) == (b"x", 3)
        with redis.Redis(port=server.port, db=3) as r:
            assert r.get("u") == b"x"
    finally:
        server.stop()


# ---------------------------------------------------------------- parsing, no server


def test_tls_urls_parse_to_ssl_clients() -> None:
    target = parse("rediss://:pw@cache.internal:6380/1?ssl_cert_reqs=none"
                   "&ssl_ca_certs=/etc/ca.pem&socket_timeout=0.5")
    assert (target.kind, target.tls, target.hosts, target.db) == (
        "tcp", True, (("cache.internal", 6380),), 1)
    assert target.options == {"ssl_cert_reqs": "none", "ssl_ca_certs": "/etc/ca.pem",
                              "socket_timeout": 0.5}
    assert "pw" not in repr(target)
    # Options go to redis-py, which applies them; RespClient would ignore them.
    assert not resp_client_url("rediss://cache.internal:6380/1?ssl_cert_reqs=none")
    assert resp_client_url("rediss://:pw@cache.internal:6380/1")

    async def go() -> None:
        plain = connect("rediss://:pw@cache.internal:6380/1?ssl_cert_reqs=none",
                        connect_timeout_s=1)
        assert plain.connection_pool.connection_class is SSLConnection
        kw = plain.connection_pool.connection_kwargs
        assert (kw["ssl_cert_reqs"], kw["db"], kw["password"]) == ("none", 1, "pw")
        await plain.aclose()
        sentinel = connect("rediss+sentinel://:pw@s1:26379,[::1]/main/2?ssl_cert_reqs=none"
                           "&sentinel_password=sp", connect_timeout_s=1)
        pool = sentinel.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.connection_class is SentinelManagedSSLConnection
        assert (pool.service_name, pool.connection_kwargs["db"]) == ("main", 2)
        assert pool.connection_kwargs["password"] == "pw"
        assert "sentinel_password" not in pool.connection_kwargs
        sentinels = pool.sentinel_manager.sentinels
        addresses = [(s.connection_pool.connection_kwargs["host"],
                      s.connection_pool.connection_kwargs["port"]) for s in sentinels]
        assert addresses == [("s1", 26379), ("::1", 26379)]
        for s in sentinels:
            assert s.connection_pool.connection_class is SSLConnection
            assert s.connection_pool.connection_kwargs["password"] == "sp"
        await sentinel.aclose()

    asyncio.run(go())


def test_unix_urls_parse() -> None:
    target = parse("unix://:pw@/run/redis/redis.sock?db=4")
    assert (target.kind, target.path, target.db, target.password) == (
        "unix", "/run/redis/redis.sock", 4, "pw")
    assert not resp_client_url("unix:///run/redis/redis.sock")
    client = connect("unix:///run/redis/redis.sock", connect_timeout_s=1)
    assert client.connection_pool.connection_class is UnixDomainSocketConnection
    asyncio.run(client.aclose())


def test_plain_urls_keep_the_pipelined_client() -> None:
    assert resp_client_url("redis://127.0.0.1:6390/0")
    assert not resp_client_url("redis://127.0.0.1:6390/0", cluster=True)
    assert not resp_client_url("redis+sentinel://127.0.0.1/m")
    limiter = Limiter(RateLimitConfig(rules=(RuleConfig(name="r", concurrent=1),),
                                      redis_url="redis://127.0.0.1:6390/0"))
    assert isinstance(limiter.redis, RespClient)


SECRET = "hunter2-Pa55"


@pytest.mark.parametrize(("env", "problem"), [
    ({"RATELIMIT__REDIS_URL": f"redis://:{SECRET}@host:port/0"},
     "ratelimit.redis_url: host: the port must be a number in 1-65535"),
    ({"CACHE__REDIS_URL": f"redis://:{SECRET}@host:6379/zero"},
     "cache.redis_url: the path must be a database number"),
    ({"ROUTING__REDIS_URL": f"http://:{SECRET}@host:6379"},
     "routing.redis_url: unsupported scheme 'http'"),
    ({"CACHE__REDIS_URL": f"{SECRET}@host:6379"},
     "cache.redis_url: unsupported scheme (use redis://"),
    ({"CACHE__REDIS_URL": f"redis://:{SECRET[:4]}/{SECRET[4:]}@host:6379"},
     "cache.redis_url: '@' after the host part: percent-encode"),
    ({"CACHE__REDIS_URL": f"redis+sentinel://:{SECRET}@s1:26379,s2:263x/mymaster"},
     "cache.redis_url: sentinel address 2 of 2: the port must be a number"),
    ({"CACHE__REDIS_URL": f"redis+sentinel://:{SECRET}@s1:26379"},
     "cache.redis_url: the path must name the master"),
    ({"CACHE__REDIS_URL": f"redis+sentinel://:{SECRET}@s1/mymaster/one"},
     "cache.redis_url: the db after the master name must be a number"),
    ({"CACHE__REDIS_URL": f"redis://:{SECRET}@h?ssl_cert_reqs=none"},
     "cache.redis_url: option ssl_cert_reqs needs TLS"),
    ({"CACHE__REDIS_URL": f"redis://h?password={SECRET}"},
     "cache.redis_url: unknown option 'password'"),
    ({"CACHE__REDIS_URL": f"redis+sentinel://h/m?sentinel_password={SECRET}&socket_timeout=x"},
     "cache.redis_url: option socket_timeout: must be a number of seconds > 0"),
    ({"CACHE__REDIS_URL": f"unix://{SECRET}/tmp/redis.sock"},
     "cache.redis_url: unix:// takes a socket path, not a host"),
    ({"RATELIMIT__REDIS_URL": f"redis+sentinel://:{SECRET}@s1/m",
      "RATELIMIT__REDIS_CLUSTER": "true"},
     "ratelimit.redis_url: a Redis Cluster is reached through a node's redis:// or rediss:// "
     "URL, not redis+sentinel://"),
    ({"RATELIMIT__REDIS_URL": f"redis://:{SECRET}@node:7000/3",
      "RATELIMIT__REDIS_CLUSTER": "true"},
     "ratelimit.redis_url: a Redis Cluster has only database 0"),
    ({"CACHE__REDIS_URL": f"redis://:{SECRET}@node:7000/0", "CACHE__REDIS_CLUSTER": "true"},
     "cache.redis_cluster: Redis Cluster is not supported for cache"),
    ({"ROUTING__REDIS_URL": f"redis://:{SECRET}@node:7000/0",
      "ROUTING__REDIS_CLUSTER": "true"},
     "routing.redis_cluster: Redis Cluster is not supported for routing"),
])
def test_bad_redis_urls_are_config_errors_without_the_password(
        env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _env_config(**env)
    text = str(err.value)
    assert problem in text, text
    assert SECRET not in text and SECRET[:4] not in text and SECRET[4:] not in text


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "rediss://user:pw@cache:6380/2?ssl_cert_reqs=required&ssl_check_hostname=false",
    "unix:///var/run/redis.sock?db=1",
    "redis+sentinel://:pw@s1:26379,s2:26379,s3/mymaster",
    "rediss+sentinel://s1/mymaster/3?sentinel_username=u&sentinel_password=p",
])
def test_good_redis_urls_pass_config_validation(url: str) -> None:
    cfg = _env_config(RATELIMIT__REDIS_URL=url, CACHE__REDIS_URL=url, ROUTING__REDIS_URL=url)
    assert (cfg.ratelimit.redis_url, cfg.cache.redis_url, cfg.routing.redis_url) == (url,) * 3


def test_a_cluster_node_url_passes_for_the_limiter() -> None:
    cfg = _env_config(RATELIMIT__REDIS_URL="redis://node-0:7000/0",
                      RATELIMIT__REDIS_CLUSTER="true")
    assert cfg.ratelimit.redis_cluster
    with pytest.raises(RedisURLError, match="only database 0"):
        connect("redis://node-0:7000/1", cluster=True, connect_timeout_s=1)
