"""Where cache entries live: a bytes-bounded local LRU, in front of Redis when configured.

An entry is the stored answer's JSON bytes under one or more keys (its exact
and normalized keys), with a TTL. A lookup asks the local LRU first, then
Redis with one MGET for all the request's keys, so both tiers cost one round
trip. Redis calls have a tight budget behind a circuit breaker: a slow or
dead Redis turns into misses and local-only storing, never into an error or
a stalled request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.breaker import Breaker
from proxy.config import CacheConfig
from proxy.health import Health, State
from proxy.redis_connect import connect, resp_client_url
from proxy.resp import RespClient

log = logging.getLogger("proxy.cache")

_ENTRY_OVERHEAD = 200  # bytes of bookkeeping per local entry, roughly (key, node, tuple)


@dataclass(frozen=True, slots=True)
class Found:
    """A hit: which of the looked-up keys matched, and the stored bytes."""

    index: int
    value: bytes
    where: str  # local | redis


class LocalLRU:
    """Entries by key, least recently used evicted first, bounded in bytes, with TTLs."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: collections.OrderedDict[str, tuple[bytes, float]] = (
            collections.OrderedDict())
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> bytes | None:
        """The value under ``key`` if present and not expired (marks it recently used)."""
        item = self._entries.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes, ttl_s: float, now: float) -> None:
        """Store ``value`` for ``ttl_s`` seconds, evicting the oldest entries to fit."""
        size = len(value) + len(key) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (value, now + ttl_s)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions += 1

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        if key in self._entries:
            self._drop(key)

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.bytes -= len(value) + len(key) + _ENTRY_OVERHEAD


class CacheStore:
    """The local LRU, plus Redis shared by all replicas when ``redis_url`` is set."""

    def __init__(self, cfg: CacheConfig) -> None:
        self.local = LocalLRU(cfg.local_max_bytes)
        self.redis: RespClient | Redis | None = None
        if cfg.redis_url:
            connect_s = cfg.timeout_ms / 1000 * 20
            self.redis = (RespClient(cfg.redis_url, connect_s)
                          if resp_client_url(cfg.redis_url)
                          else connect(cfg.redis_url, connect_timeout_s=connect_s))
        self.timeout_s = cfg.timeout_ms / 1000
        self.local_ttl_s = cfg.ttl_s
        self.breaker = Breaker(cfg.breaker_failures, cfg.breaker_reset_s,
                               trial_s=2 * cfg.timeout_ms / 1000, name="cache",
                               fallback="local entries only")
        self.redis_errors = 0

    async def close(self) -> None:
        """Close the Redis connection."""
        if self.redis is not None:
            await self.redis.aclose()

    async def get(self, keys: list[str]) -> Found | None:
        """The first of ``keys`` that holds an entry, locally or in Redis."""
        now = time.monotonic()
        for i, key in enumerate(keys):
            value = self.local.get(key, now)
            if value is not None:
                return Found(i, value, "local")
        redis = self.redis
        if redis is None or not self.breaker.allow():
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                values = await redis.execute_command("MGET", *keys)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        self.breaker.success()
        for i, value in enumerate(values or ()):
            if isinstance(value, bytes):
                return Found(i, value, "redis")
        return None

    async def get_each(self, keys: list[str]) -> list[bytes | None]:
        """The entry under each of ``keys`` (None where absent): local first, then one MGET.

        Entries found only in Redis are kept locally for the default lifetime
        of a local copy (``ttl_s``), since Redis does not say how long they have left.
        """
        now = time.monotonic()
        found = [self.local.get(key, now) for key in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        redis = self.redis
        if not missing or redis is None or not self.breaker.allow():
            return found
        try:
            async with asyncio.timeout(self.timeout_s):
                values = await redis.execute_command("MGET", *(keys[i] for i in missing))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return found
        self.breaker.success()
        for i, value in zip(missing, values or (), strict=False):
            if isinstance(value, bytes):
                found[i] = value
                self.local.put(keys[i], value, self.local_ttl_s, now)
        return found

    def remember(self, key: str, value: bytes, ttl_s: float) -> None:
        """Keep an entry found in Redis locally too (for the rest of its life, at most)."""
        self.local.put(key, value, ttl_s, time.monotonic())

    async def put(self, keys: list[str], value: bytes, ttl_s: int) -> None:
        """Store ``value`` under every key, locally and (best effort) in Redis."""
        await self.put_each([(key, value) for key in keys], ttl_s)

    async def put_each(self, entries: list[tuple[str, bytes]], ttl_s: int) -> None:
        """Store each (key, value), locally and (best effort) in Redis."""
        now = time.monotonic()
        for key, value in entries:
            self.local.put(key, value, ttl_s, now)
        redis = self.redis
        if not entries or redis is None or not self.breaker.allow():
            return
        try:
            async with asyncio.timeout(self.timeout_s * 5):  # off the response path
                await asyncio.gather(*(redis.execute_command("SET", key, value, "PX",
                                                             ttl_s * 1000)
                                       for key, value in entries))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        self.breaker.success()

    def _failed(self, exc: BaseException) -> None:
        self.redis_errors += 1
        self.breaker.failure()
        log.debug("cache: Redis call failed (%s)", type(exc).__name__)

    async def health(self) -> Health:
        """Local size; Redis as the breaker sees it."""
        details: dict[str, object] = {
            "backend": "redis" if self.redis is not None else "local",
            "local_entries": len(self.local), "local_bytes": self.local.bytes,
            "local_evictions": self.local.evictions, "breaker": self.breaker.state,
            "breaker_opened": self.breaker.opened, "redis_errors": self.redis_errors}
        if self.redis is not None and self.breaker.state != "closed":
            return Health(State.DEGRADED, "Redis unavailable: cache runs on local entries "
                          "only", details)
        return Health(State.OK, "", details)
