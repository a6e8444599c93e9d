"""Keeps every replica's semantic index in step through one Redis stream.

A replica that stores an answer indexes it locally at once and appends it
to the stream ``llm-sidecar:cache:sem:stream`` (context, answer key, vector
as float16, guard features, expiry, the verifier's vector if any; trimmed
to about ``max_entries``). Each replica reads the stream in the background:
from the start when it boots (catch-up, skipping expired entries), then
blocking for new ones. Adding is idempotent by key, so a replica reading
its own entries back changes nothing.

Redis down: reads and appends fail, the index keeps what it has and grows
with local entries only, and health says so; reading resumes where it
stopped once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np
import orjson
from redis.exceptions import RedisError

from proxy.cache.guard import Features
from proxy.cache.keys import PREFIX
from proxy.cache.semantic_index import IndexEntry, SemanticIndex
from proxy.health import Health, State
from proxy.redis_connect import connect

log = logging.getLogger("proxy.cache")

STREAM = PREFIX + "sem:stream"
_BATCH = 500


class SemanticFeed:
    """Publishes local entries and applies everyone's (see the module docstring)."""

    def __init__(self, redis_url: str, index: SemanticIndex, *, timeout_s: float,
                 block_ms: int = 1000, retry_s: float = 1.0) -> None:
        self.index = index
        self.timeout_s = timeout_s
        self.block_ms = block_ms
        self.retry_s = retry_s
        # Two clients: the reader blocks on XREAD, and appends must not wait for it.
        self._reader = connect(redis_url, connect_timeout_s=timeout_s * 20)
        self._writer = connect(redis_url, connect_timeout_s=timeout_s * 20,
                               socket_timeout_s=timeout_s * 20)
        self._task: asyncio.Task[None] | None = None
        self.last_id = b"0-0"
        self.caught_up = False
        self.applied = 0
        self.malformed = 0
        self.published = 0
        self.publish_errors = 0
        self.read_errors = 0
        self.last_error = ""
        self.lag_ms = 0.0
        self._progress = asyncio.Event()  # set (and replaced) whenever a read completes

    async def start(self) -> None:
        """Start reading the stream in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="semantic-feed")

    async def close(self) -> None:
        """Stop reading and close both connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._reader.aclose()
        await self._writer.aclose()

    async def publish(self, entry: IndexEntry, vector: np.ndarray[Any, Any]) -> None:
        """Append ``entry`` for the other replicas (best effort, bounded in time)."""
        fields = {b"c": entry.context, b"k": entry.key,
                  b"v": vector.astype(np.float16).tobytes(),
                  b"f": orjson.dumps(entry.features.to_wire()),
                  b"e": str(int(entry.expires_at * 1000))}
        if entry.check is not None:
            fields[b"x"] = entry.check
        try:
            async with asyncio.timeout(self.timeout_s * 5):
                await self._writer.xadd(STREAM, fields,  # type: ignore[arg-type]
                                        maxlen=self.index.max_entries, approximate=True)
        except (RedisError, OSError, TimeoutError) as exc:
            self.publish_errors += 1
            self.last_error = f"append: {type(exc).__name__}"
            return
        self.published += 1

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self._read_once()
                if failing:
                    log.info("cache: semantic stream readable again")
                failing = False
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                self.read_errors += 1
                self.last_error = f"read: {type(exc).__name__}"
                if not failing:
                    log.warning("cache: semantic stream unreadable (%s); the index grows "
                                "with local entries only until Redis is back",
                                type(exc).__name__)
                failing = True
                await asyncio.sleep(self.retry_s)  # back off before reconnecting

    async def _read_once(self) -> None:
        block = None if not self.caught_up else self.block_ms
        reply: Any = await self._reader.xread({STREAM: self.last_id}, count=_BATCH, block=block)
        items = reply[0][1] if reply else []
        now = time.time()
        for stream_id, fields in items:
            self.last_id = stream_id
            self._apply(stream_id, fields, now)
        if len(items) < _BATCH:
            self.caught_up = True
        self.last_error = ""
        self._progress.set()
        self._progress = asyncio.Event()

    async def wait_until(self, indexed: str | None = None, timeout_s: float = 10.0) -> bool:
        """Wait until the stream is caught up (and ``indexed`` is in the index); False on timeout.

        For tools and tests that must know another replica's entry arrived.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while not (self.caught_up and (indexed is None or indexed in self.index)):
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    def _apply(self, stream_id: bytes, fields: dict[bytes, bytes], now: float) -> None:
        try:
            expires_at = int(fields[b"e"]) / 1000
            vector = np.frombuffer(fields[b"v"], dtype=np.float16).astype(np.float32)
            if vector.shape != (self.index.dims,):
                raise ValueError("vector of another size")
            entry = IndexEntry(fields[b"k"].decode(), fields[b"c"].decode(),
                               Features.from_wire(orjson.loads(fields[b"f"])), expires_at,
                               fields.get(b"x"))
        except (KeyError, ValueError, UnicodeDecodeError, orjson.JSONDecodeError):
            self.malformed += 1
            return
        self.lag_ms = max(0.0, now * 1000 - int(stream_id.split(b"-")[0]))
        if expires_at > now and self.index.add(entry, vector):
            self.applied += 1

    def health(self) -> Health:
        """Index size and how far behind the stream this replica is."""
        details: dict[str, object] = {
            "entries": len(self.index), "contexts": self.index.contexts,
            "caught_up": self.caught_up, "applied_from_stream": self.applied,
            "published": self.published, "publish_errors": self.publish_errors,
            "read_errors": self.read_errors, "malformed": self.malformed,
            "sync_lag_ms": round(self.lag_ms, 1)}
        if self.last_error:
            return Health(State.DEGRADED, f"semantic stream {self.last_error}: this replica "
                          "sees only its own new entries", details)
        return Health(State.OK, "", details)
