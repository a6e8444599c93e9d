"""Redis clients from one URL: a server, a unix socket, a Sentinel-watched master or a Cluster.

The URLs a ``*.redis_url`` setting takes::

    redis://[[user]:password@]host[:6379][/db][?option=value&...]
    rediss://...                       the same over TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N&...]
    redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/<master-name>[/<db>][?...]
    rediss+sentinel://...              TLS to the sentinels and to the master

and, with the section's ``redis_cluster: true``, a ``redis://`` or ``rediss://``
URL naming any node of a Redis Cluster (the client discovers the others).

Sentinel: the user and password authenticate to the master. Sentinels that
require a password of their own take the options ``sentinel_username`` and
``sentinel_password``. The client asks the sentinels where the master is each
time it opens a connection, and drops its connections when the master moves
or answers READONLY (it was demoted), so after a failover it reaches the new
master: commands caught in the switch fail (callers' breakers and fallbacks
handle that), later ones go to the new master.

Options (the query) are the connection settings redis-py reads from a URL:
socket_timeout, socket_connect_timeout (seconds), socket_keepalive,
retry_on_timeout, health_check_interval, max_connections, client_name,
protocol, db (not with a db in the path); and with TLS ssl_cert_reqs
(none | optional | required), ssl_ca_certs, ssl_ca_path, ssl_certfile,
ssl_keyfile, ssl_check_hostname. An option in the URL wins over the
caller's default.

Parsing is strict so that a mistake is a configuration error at start rather
than a client failing at the first request: every error names the part that
is wrong and never shows the password (nor any value, which a mis-encoded
password may have spilled into).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload
from urllib.parse import unquote

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
_REDIS_PORT = 6379
_SENTINEL_PORT = 26379
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class RedisURLError(ValueError):
    """A Redis URL that cannot be used; the message names the wrong part, never a secret."""


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _flag(text: str) -> bool:
    return _BOOLS[text.lower()]


def _protocol(text: str) -> int:
    if text not in ("2", "3"):
        raise ValueError
    return int(text)


def _text(text: str) -> str:
    if not text:
        raise ValueError
    return text


def _cert_reqs(text: str) -> str:
    if text not in ("none", "optional", "required"):
        raise ValueError
    return text


# name -> (parser, what a good value is): the message says the latter, never the value.
_Option = tuple[Callable[[str], object], str]
_OPTIONS: dict[str, _Option] = {
    "socket_timeout": (_seconds, "a number of seconds > 0"),
    "socket_connect_timeout": (_seconds, "a number of seconds > 0"),
    "socket_keepalive": (_flag, "true or false"),
    "retry_on_timeout": (_flag, "true or false"),
    "health_check_interval": (_count, "a whole number of seconds >= 0"),
    "max_connections": (_count, "a whole number >= 0"),
    "client_name": (_text, "not empty"),
    "protocol": (_protocol, "2 or 3"),
}
_TLS_OPTIONS: dict[str, _Option] = {
    "ssl_cert_reqs": (_cert_reqs, "none, optional or required"),
    "ssl_ca_certs": (_text, "a file path"),
    "ssl_ca_path": (_text, "a directory path"),
    "ssl_certfile": (_text, "a file path"),
    "ssl_keyfile": (_text, "a file path"),
    "ssl_check_hostname": (_flag, "true or false"),
}
_SENTINEL_OPTIONS: dict[str, _Option] = {
    "sentinel_username": (_text, "not empty"),
    "sentinel_password": (_text, "not empty"),
}


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a Redis URL names, parsed (``kind``: tcp, unix or sentinel)."""

    kind: str
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()  # tcp: one; sentinel: the sentinels
    path: str = ""  # unix socket
    master: str = ""  # sentinel: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, Any] = field(default_factory=dict, repr=False)


def parse(url: str, *, cluster: bool = False) -> RedisTarget:
    """Parse ``url`` strictly (``cluster``: it must name a Cluster node); raises RedisURLError."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        # Echo the scheme only when it plainly is one (a URL without "://" may
        # start with credentials).
        shown = f"{scheme!r} " if sep and scheme.replace("+", "").isalnum() else ""
        raise RedisURLError(f"unsupported scheme {shown}(use redis://, rediss://, unix://, "
                            f"redis+sentinel:// or rediss+sentinel://)")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if "@" in tail:
        raise RedisURLError("'@' after the host part: percent-encode '/', '?', '#' and '@' "
                            "in the user name or password (%2F, %3F, %23, %40)")
    if "#" in tail:
        raise RedisURLError("must not have a fragment ('#'); percent-encode it as %23")
    path, _, query = tail.partition("?")
    userinfo, at, hostpart = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
        if username is not None and password is None:
            raise RedisURLError("a user name needs a password (user:password@)")
    tls = scheme.startswith("rediss")
    options = _options(query, tls=tls, sentinel=scheme.endswith("+sentinel"))
    if scheme == "unix":
        target = _unix(hostpart, path, options, username, password)
    elif scheme.endswith("+sentinel"):
        target = _sentinel(hostpart, path, options, username, password, tls)
    else:
        host, port = _address(hostpart, _REDIS_PORT, "host")
        db = _db(path.removeprefix("/"), options)
        target = RedisTarget("tcp", tls, ((host, port),), db=db, username=username,
                             password=password, options=options)
    if cluster:
        if target.kind != "tcp":
            raise RedisURLError(f"a Redis Cluster is reached through a node's redis:// or "
                                f"rediss:// URL, not {scheme}://")
        if target.db:
            raise RedisURLError("a Redis Cluster has only database 0")
    return target


def validate(url: str, *, cluster: bool = False) -> None:
    """Raise RedisURLError if ``url`` is not a usable Redis URL (see the module docstring)."""
    parse(url, cluster=cluster)


def resp_client_url(url: str, *, cluster: bool = False) -> bool:
    """Whether ``proxy.resp.RespClient`` serves ``url``: one redis(s):// server, no options.

    That client ignores URL options, so a URL carrying any goes to redis-py,
    which applies them.
    """
    if cluster:
        return False
    try:
        target = parse(url)
    except RedisURLError:
        return False
    return target.kind == "tcp" and not target.options


@overload
def connect(url: str, *, cluster: Literal[False] = False, connect_timeout_s: float,
            socket_timeout_s: float | None = None, **kw: Any) -> Redis: ...


@overload
def connect(url: str, *, cluster: Literal[True], connect_timeout_s: float,
            socket_timeout_s: float | None = None, **kw: Any) -> RedisCluster: ...


@overload
def connect(url: str, *, cluster: bool, connect_timeout_s: float,
            socket_timeout_s: float | None = None, **kw: Any) -> Redis | RedisCluster: ...


def connect(url: str, *, cluster: bool = False, connect_timeout_s: float,
            socket_timeout_s: float | None = None, **kw: Any) -> Redis | RedisCluster:
    """A redis.asyncio client for ``url`` (not connected yet: it connects on first use).

    A Sentinel URL gives a client of the current master that follows failovers;
    ``cluster`` a RedisCluster seeded by the node the URL names; anything else
    ``Redis.from_url``. ``kw`` are further redis-py connection settings (e.g.
    ``health_check_interval``); options in the URL win over them and over the
    timeouts. Raises RedisURLError for a bad URL.
    """
    target = parse(url, cluster=cluster)
    timeouts: dict[str, Any] = {"socket_connect_timeout": connect_timeout_s}
    if socket_timeout_s is not None:
        timeouts["socket_timeout"] = socket_timeout_s
    if cluster:
        return RedisCluster.from_url(url, **timeouts, **kw)
    if target.kind != "sentinel":
        return Redis.from_url(url, **timeouts, **kw)
    return _sentinel_master(target, {**timeouts, **kw})


class _SentinelMaster(Redis):
    """The master's client; closing it also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Close the master connections, then the sentinel clients this client asks."""
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        # redis-py leaves the sentinels' connections to whoever made the Sentinel:
        # here that is this client alone.
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def _sentinel_master(target: RedisTarget, defaults: dict[str, Any]) -> Redis:
    options = {k: v for k, v in target.options.items() if k not in _SENTINEL_OPTIONS}
    conn = {**defaults, **options}
    tls = {k: v for k, v in options.items() if k in _TLS_OPTIONS}
    # Sentinel queries are short: bound them even for a client whose own reads
    # may block (a stream reader), or a hung sentinel would stall reconnection.
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": conn["socket_connect_timeout"],
        "socket_timeout": conn.get("socket_timeout") or conn["socket_connect_timeout"],
        **{k: conn[k] for k in ("socket_keepalive",) if k in conn}}
    if target.tls:
        sentinel_kwargs.update(ssl=True, **tls)
    for name in _SENTINEL_OPTIONS:
        if name in target.options:
            sentinel_kwargs[name.removeprefix("sentinel_")] = target.options[name]
    # redis-py leaves Sentinel's constructor unannotated.
    sentinel = Sentinel(list(target.hosts),  # type: ignore[no-untyped-call]
                        sentinel_kwargs=sentinel_kwargs)
    master: Redis = sentinel.master_for(
        target.master, redis_class=_SentinelMaster, db=target.db, username=target.username,
        password=target.password, ssl=target.tls, **conn)
    return master


def _options(query: str, *, tls: bool, sentinel: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in query.split("&"):
        if not item:
            continue
        raw_name, eq, raw_value = item.partition("=")
        name = unquote(raw_name)
        spec = (_OPTIONS.get(name) or _TLS_OPTIONS.get(name)
                or _SENTINEL_OPTIONS.get(name) or (
                    (_count, "a whole number >= 0") if name == "db" else None))
        if spec is None:
            known = ", ".join([*_OPTIONS, *_TLS_OPTIONS, *_SENTINEL_OPTIONS, "db"])
            raise RedisURLError(f"unknown option {name!r} (known: {known})")
        if name in _TLS_OPTIONS and not tls:
            raise RedisURLError(f"option {name} needs TLS (rediss:// or rediss+sentinel://)")
        if name in _SENTINEL_OPTIONS and not sentinel:
            raise RedisURLError(f"option {name} is for redis+sentinel:// URLs only")
        if name == "db" and sentinel:
            raise RedisURLError("option db: a Sentinel URL takes the db in the path "
                                "(/<master-name>/<db>)")
        if name in options:
            raise RedisURLError(f"option {name} is given twice")
        parser, good = spec
        try:
            options[name] = parser(unquote(raw_value)) if eq else parser("")
        except (ValueError, KeyError):
            raise RedisURLError(f"option {name}: must be {good}") from None
    return options


def _address(text: str, default_port: int, what: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port``; ``what`` names it in errors (no value is shown)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise RedisURLError(f"{what}: an IPv6 address is missing its ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise RedisURLError(f"{what}: expected ':port' after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
    if not host or any(c.isspace() for c in host):
        raise RedisURLError(f"{what}: missing or not a host name")
    if port_text is None:
        return unquote(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisURLError(f"{what}: the port must be a number in 1-65535")
    return unquote(host), int(port_text)


def _db(text: str, options: dict[str, Any]) -> int:
    if not text:
        return int(options.get("db", 0))
    if "db" in options:
        raise RedisURLError("the db is given twice (path and option db)")
    if not text.isdigit():
        raise RedisURLError("the path must be a database number (/0, /1, ...)")
    return int(text)


def _unix(hostpart: str, path: str, options: dict[str, Any], username: str | None,
          password: str | None) -> RedisTarget:
    if hostpart:
        raise RedisURLError("unix:// takes a socket path, not a host "
                            "(unix:///path/to/redis.sock)")
    if not path.strip("/"):
        raise RedisURLError("unix:// needs the socket's path (unix:///path/to/redis.sock)")
    db = int(options.get("db", 0))
    return RedisTarget("unix", False, path=unquote(path), db=db, username=username,
                       password=password, options=options)


def _sentinel(hostpart: str, path: str, options: dict[str, Any], username: str | None,
              password: str | None, tls: bool) -> RedisTarget:
    if not hostpart:
        raise RedisURLError("no sentinel address (host1:26379,host2:26379)")
    hosts = []
    entries = hostpart.split(",")
    for i, entry in enumerate(entries, 1):
        what = f"sentinel address {i} of {len(entries)}"
        hosts.append(_address(entry, _SENTINEL_PORT, what))
    parts = path.removeprefix("/").split("/")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise RedisURLError("the path must name the master: /<master-name>[/<db>]")
    if len(parts) > 2:
        raise RedisURLError("the path has too many parts: /<master-name>[/<db>]")
    master = unquote(parts[0])
    if any(c.isspace() for c in master):
        raise RedisURLError("the master name must not contain spaces")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise RedisURLError("the db after the master name must be a number "
                                "(/<master-name>/<db>)")
        db = int(parts[1])
    return RedisTarget("sentinel", tls, tuple(hosts), master=master, db=db, username=username,
                       password=password, options=options)
