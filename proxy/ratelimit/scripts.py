"""Redis Lua scripts from ``lua/``: loaded once, called by SHA, reloaded on NOSCRIPT."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from proxy.resp import RespClient

Client = Redis | RedisCluster | RespClient


def _lua_dir() -> Path:
    # A source checkout (or editable install) has lua/ beside proxy/; an
    # installed wheel puts the scripts under <prefix>/share (pyproject data-files).
    source = Path(__file__).resolve().parents[2] / "lua"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "llm-sidecar" / "lua"


LUA_DIR = _lua_dir()


class LuaScript:
    """One script file; ``sha`` is set once it has been loaded into a server."""

    def __init__(self, name: str, lua_dir: Path = LUA_DIR) -> None:
        self.name = name
        self.source = (lua_dir / f"{name}.lua").read_text(encoding="utf-8")
        self.sha: str | None = None

    async def load(self, client: Client) -> str:
        """SCRIPT LOAD (at start, and again after a server restart)."""
        self.sha = str(await client.script_load(self.source))
        return self.sha

    async def __call__(self, client: Client, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script first if this server does not know it."""
        if self.sha is None:
            await self.load(client)
        assert self.sha is not None
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha, len(keys), *keys, *args)
