"""Rate limits on a real Redis Cluster of three local primaries.

The Lua script touches every bucket of a request in one call, which Redis
Cluster only allows when all its keys live in one hash slot. The policy's
``{llm-sidecar:rl}`` hash tag is what puts them there; these tests show the
script, its NOSCRIPT reload and two sidecars sharing a limit all work
through ``redis.asyncio.RedisCluster``, and that without the tag they could not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import orjson
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from proxy.config import QuotaConfig, RateLimitConfig, RuleConfig
from proxy.ratelimit.policy import KEY_TAG, Charge, Policy
from proxy.ratelimit.scripts import LuaScript
from tests.conftest import LoopThread, Mock, SidecarFactory
from tests.redis_cluster import LocalRedisCluster
from tests.test_lua_ratelimit import bucket, head, parse, slots

T = TypeVar("T")

# Four buckets of different rules and scopes, as one request to the sidecar would take.
RULES = (
    RuleConfig(name="agent-rpm", per=("agent",), requests=QuotaConfig(amount=5, period="1m")),
    RuleConfig(name="model-tpm", per=("model",), tokens=QuotaConfig(amount=100, period="1m")),
    RuleConfig(name="fleet", requests=QuotaConfig(amount=1000, period="1h")),
    RuleConfig(name="inflight", per=("agent",), concurrent=3),
)
TAG_SLOT = key_slot(KEY_TAG.strip("{}").encode())  # only the text inside {} is hashed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """One cluster for the whole module: forming it costs about two seconds."""
    nodes = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def sidecars(loop_thread: LoopThread, mock: Mock,
             cluster: LocalRedisCluster) -> Iterator[SidecarFactory]:
    """Sidecars of this module; depending on ``cluster`` makes them stop before it does."""
    factory = SidecarFactory(loop_thread, mock)
    yield factory
    factory.close()


def run(cluster: LocalRedisCluster,
        steps: Callable[[RedisCluster, Callable[[int], Redis]], Awaitable[T]]) -> T:
    """Run ``steps`` with a cluster client (on empty nodes) and a factory of node clients.

    A node client talks to one node only and follows no redirection: what it
    sees is what that node itself holds.
    """
    async def go() -> T:
        client = RedisCluster.from_url(cluster.url)
        direct: list[Redis] = []

        def node(port: int) -> Redis:
            direct.append(Redis(host="127.0.0.1", port=port))
            return direct[-1]

        try:
            await client.flushall()  # every primary
            return await steps(client, node)
        finally:
            for r in direct:
                await r.aclose()
            await client.aclose()
    return asyncio.run(go())


def untagged(key: str) -> str:
    """The same key with the hash tag's braces removed: the whole key is hashed."""
    return key.replace(KEY_TAG, KEY_TAG.strip("{}"), 1)


def argv(charges: list[Charge], mode: str = "check", lease: str = "l") -> list[Any]:
    """Script arguments for ``charges``, bucket shapes as the policy compiled them."""
    out = head(mode, lease=lease)
    for c in charges:
        q = c.quota
        out += (slots(q.capacity, c.cost) if q.kind == "concurrent"
                else bucket(q.period_s, q.amount, c.cost, q.capacity))
    return out


def owner_port(client: RedisCluster, key: str) -> int:
    """The port of the primary that serves ``key``'s slot."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def test_tag_puts_buckets_of_different_rules_in_one_slot(cluster: LocalRedisCluster) -> None:
    policy = Policy(RateLimitConfig(rules=RULES))
    charges = policy.charges({"agent": "planner", "model": "gpt-4o"}, tokens=40)
    keys = [c.key for c in charges]
    assert len({c.rule.name for c in charges}) == 4 and len(set(keys)) == 4

    # Without the tag these keys scatter over slots served by different nodes...
    bare = [untagged(k) for k in keys]
    assert len({key_slot(k.encode()) for k in bare}) == 4
    # ...with it they all hash to the tag's slot.
    assert {key_slot(k.encode()) for k in keys} == {TAG_SLOT}

    async def steps(r: RedisCluster, node: Callable[[int], Redis]) -> dict[str, Any]:
        script = LuaScript("ratelimit")
        out: dict[str, Any] = {
            "bare_owners": {owner_port(r, k) for k in bare},
            "owner": owner_port(r, KEY_TAG)}
        owner = node(out["owner"])
        out["first"] = parse(await script(r, keys, argv(charges, lease="l1")))
        out["keys_on_owner"] = int(await owner.exists(*keys))
        out["elsewhere"] = [int(await node(p).dbsize())
                            for p in cluster.ports if p != out["owner"]]

        async def stored() -> list[Any]:
            return [await owner.get(k) if c.quota.kind != "concurrent"
                    else await owner.zrange(k, 0, -1) for c, k in zip(charges, keys,
                                                                        strict=True)]

        before = await stored()
        # 40 + 70 tokens exceed model-tpm's 100: the whole request must be refused,
        # and the three buckets that had room must not be charged either.
        bigger = policy.charges({"agent": "planner", "model": "gpt-4o"}, tokens=70)
        out["denied"] = parse(await script(r, keys, argv(bigger, lease="l2")))
        out["unchanged"] = before == await stored()

        # The same call on untagged keys: redis-py refuses to send it, and a node
        # asked directly refuses it too (the check is the server's, not the client's).
        with pytest.raises(RedisClusterException, match="same key slot"):
            await script(r, bare, argv(charges))
        with pytest.raises(ClusterCrossSlotError):  # the server's CROSSSLOT reply
            await script(owner, bare, argv(charges))
        return out

    out = run(cluster, steps)
    assert len(out["bare_owners"]) > 1
    ok, _, states = out["first"]
    assert ok
    assert [s[0] for s in states] == [4, 60, 999, 2]  # every bucket charged at once
    assert out["keys_on_owner"] == 4 and out["elsewhere"] == [0, 0]
    ok, _, states = out["denied"]
    assert not ok
    assert [s[2] > 0 for s in states] == [False, True, False, False]  # model-tpm refused
    assert out["unchanged"]


def test_noscript_reload_on_the_node_owning_the_tag(cluster: LocalRedisCluster) -> None:
    key = f"{KEY_TAG}:noscript:requests:all"

    async def steps(r: RedisCluster, node: Callable[[int], Redis]) -> dict[str, Any]:
        script = LuaScript("ratelimit")
        sha = await script.load(r)
        owner = node(owner_port(r, key))
        out: dict[str, Any] = {"loaded": (await owner.script_exists(sha))[0]}
        for port in cluster.ports:  # as after every node restarted
            await node(port).script_flush()
        out["flushed"] = [(await node(p).script_exists(sha))[0] for p in cluster.ports]
        # The cached sha is stale now: the call meets NOSCRIPT, reloads, retries.
        out["reply"] = parse(await script(r, [key], [*head("check"), *bucket(60, 5, 1)]))
        out["same_sha"] = script.sha == sha
        out["reloaded"] = (await owner.script_exists(sha))[0]
        return out

    out = run(cluster, steps)
    assert out["loaded"]
    assert out["flushed"] == [False, False, False]
    assert out["reply"][0] and out["reply"][2][0][0] == 4
    assert out["same_sha"] and out["reloaded"]


def _status(url: str) -> dict[str, Any]:
    import urllib.request
    with urllib.request.urlopen(url.removesuffix("/v1") + "/status", timeout=5) as r:
        doc: dict[str, Any] = orjson.loads(r.read())
    return doc


def test_two_sidecars_share_a_limit_through_the_cluster(
        sidecars: SidecarFactory, cluster: LocalRedisCluster) -> None:
    limits = RateLimitConfig(
        rules=(RuleConfig(name="cluster-shared", requests=QuotaConfig(amount=5, period="1h")),),
        redis_url=cluster.url, redis_cluster=True, timeout_ms=200)
    urls = [sidecars.start(ratelimit=limits), sidecars.start(ratelimit=limits)]
    remaining: list[str] = []
    denied = 0
    for i in range(8):
        with openai.OpenAI(base_url=urls[i % 2], api_key="k", max_retries=0) as c:
            try:
                reply = c.chat.completions.with_raw_response.create(
                    model="m", messages=[{"role": "user", "content": "hi"}])
                remaining.append(reply.headers["x-ratelimit-remaining-requests"])
            except openai.RateLimitError:
                denied += 1
    # One bucket for both: each sidecar sees the other's requests counted.
    assert remaining == ["4", "3", "2", "1", "0"] and denied == 3

    for url in urls:
        comp = _status(url)["components"]["ratelimit"]
        assert comp["state"] == "ok"
        details = comp["details"]
        assert details["backend"] == "redis" and details["breaker"] == "closed"
        assert details["decisions"] == {"redis": 4}  # none by the local fallback

    # The shared bucket is stored once, on the primary that owns the tag's slot (a
    # node counts only the keys of a slot it holds).
    holding = [p for p in cluster.ports
               if cluster.cli(p, "CLUSTER", "COUNTKEYSINSLOT", str(TAG_SLOT)).strip() != "0"]
    assert len(holding) == 1

def test_cluster_helper_reports_a_formed_cluster(cluster: LocalRedisCluster) -> None:
    for port in cluster.ports:
        info = cluster.cli(port, "CLUSTER", "INFO")
        assert "cluster_state:ok" in info
        assert "cluster_known_nodes:3" in info and "cluster_slots_assigned:16384" in info
    assert Path(cluster.workdir, f"nodes-{cluster.ports[0]}.conf").exists()
