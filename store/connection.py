"""Connecting to Redis (one server, a Sentinel-watched primary, or a Cluster), naming a URL
safely in messages, and the backoff used to reconnect.

URL forms (README, "Sentinel and Cluster"):
  redis://[user:password@]host:port/db, rediss://..., unix:///path.sock?db=0
  redis+sentinel://[user:password@]host1:26379,host2:26379/<service>[/db]
      [?sentinel_username=...&sentinel_password=...]
  redis+cluster://[user:password@]host1:7000,host2:7001[/0]
The `user:password@` part is for the Redis servers that hold the data; sentinels get their
own credentials from the query (percent-encoded), and none when it names none.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster, key_slot
from redis.exceptions import ReadOnlyError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from negcase.store.keys import Keys

SOCKET_TIMEOUT_S = 30.0
# A sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUT_S = 1.0
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SENTINEL_QUERY = frozenset({"sentinel_username", "sentinel_password"})
_SENTINEL_PASSWORD = re.compile(r"([?&]sentinel_password=)[^&]*")

Client = redis.Redis | RedisCluster

_OPTIONS = {
    # Replies stay bytes: workers decode each value once, where they know its type.
    "decode_responses": False,
    "socket_keepalive": True,
    # A dead connection (a primary that vanished without a reset) fails within this,
    # instead of after TCP keepalive's hours; blocking reads stay well below it.
    "socket_timeout": SOCKET_TIMEOUT_S,
    "health_check_interval": 30,
    "retry_on_timeout": False,
}


class RedisUrlError(ValueError):
    """A NEGCASE_REDIS_URL that cannot be used, naming the part and why."""


class NamespaceSlotError(ValueError):
    """A Cluster namespace whose keys hash to several slots: multi-key scripts would fail."""


@dataclass(frozen=True, slots=True)
class _Spread:
    """The parts of a sentinel or cluster URL: data-node credentials, the nodes to ask first,
    the path after them, and the query."""

    username: str | None
    password: str | None
    nodes: list[tuple[str, int]]
    path: list[str]
    query: dict[str, str]


def connect(url: str) -> Client:
    """A client for any URL form above. A Sentinel client finds the current primary through
    the sentinels and finds it again after a failover; a Cluster client routes each command
    to the node that owns its slot."""
    scheme = url.partition("://")[0].lower()
    if scheme == SENTINEL_SCHEME:
        return _sentinel_primary(url)
    if scheme == CLUSTER_SCHEME:
        return _cluster(url)
    if scheme.endswith(("+sentinel", "+cluster")):
        raise RedisUrlError(
            f"{scheme}://: not supported; use {SENTINEL_SCHEME}:// or {CLUSTER_SCHEME}:// "
            "(TLS to sentinels or to a cluster is not built in)"
        )
    options = dict(_OPTIONS)
    if urlsplit(url).scheme == "unix":
        # redis-py's unix socket connection takes no keepalive option.
        del options["socket_keepalive"]
    return redis.Redis.from_url(url, **options)


class PrimaryFollowingConnection(SentinelManagedConnection):
    """A connection to the primary that asks the sentinels where it is on every reconnect.

    redis-py 8.1 reconnects a dropped connection in send_packed_command() through
    connect_check_health() with the address it had, skipping the sentinel lookup in
    connect(): after a failover it keeps dialing the old primary's address, and once that
    server is back (restarted, still a primary until the sentinels turn it into a replica,
    about 8 s later) it writes there, to data the new primary will never see.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
        """Look the primary up, then connect as redis-py would."""
        if not self._sock and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super().connect_check_health(
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


def failover_retry() -> Retry:
    """Retry a command that met a lost connection or a demoted primary (READONLY) for a few
    seconds, rediscovering the primary on each try: a Sentinel failover of a few seconds is
    invisible to callers; a longer one reaches the worker's own reconnect loop."""
    backoff = ExponentialWithJitterBackoff(base=0.05, cap=1.0)
    return Retry(backoff, retries=8, supported_errors=(redis.ConnectionError, ReadOnlyError))


def _sentinel_primary(url: str) -> redis.Redis:
    spread = _spread(url, "sentinel")
    unknown = set(spread.query) - SENTINEL_QUERY
    if unknown:
        raise RedisUrlError(
            f"{redacted(url)}: unknown option(s) {sorted(unknown)}; a sentinel URL takes "
            f"{sorted(SENTINEL_QUERY)}"
        )
    if not spread.path or not spread.path[0] or len(spread.path) > 2:
        raise RedisUrlError(
            f"{redacted(url)}: the path must be /<service>[/db], "
            "e.g. redis+sentinel://h1:26379,h2:26379/mymaster/0"
        )
    service = spread.path[0]
    db = _db(url, spread.path[1] if len(spread.path) == 2 else "0")
    sentinel = Sentinel(
        spread.nodes,
        sentinel_kwargs={
            "username": spread.query.get("sentinel_username"),
            "password": spread.query.get("sentinel_password"),
            "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        },
    )
    options = {**_OPTIONS, "retry": failover_retry()}
    return sentinel.master_for(
        service,
        db=db,
        username=spread.username,
        password=spread.password,
        connection_class=PrimaryFollowingConnection,
        **options,
    )


def _cluster(url: str) -> RedisCluster:
    spread = _spread(url, "cluster")
    if spread.query:
        raise RedisUrlError(f"{redacted(url)}: a cluster URL takes no options")
    if len(spread.path) > 1 or (spread.path and _db(url, spread.path[0]) != 0):
        raise RedisUrlError(f"{redacted(url)}: a Redis Cluster has database 0 only")
    try:
        # It asks a startup node for the slot map here, so an unreachable cluster fails now.
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in spread.nodes],
            username=spread.username,
            password=spread.password,
            # Its nodes' clients would warn that retry_on_timeout is deprecated.
            **{name: value for name, value in _OPTIONS.items() if name != "retry_on_timeout"},
        )
    except RedisClusterException as error:
        raise redis.ConnectionError(
            f"no node of the Redis Cluster at {redacted(url)} gave its slot map: {error}"
        ) from None


def _spread(url: str, kind: str) -> _Spread:
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    nodes = [_node(url, kind, part) for part in hosts.split(",")]
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    return _Spread(
        unquote(username) or None,
        unquote(password) or None,
        nodes,
        [unquote(part) for part in parts.path.strip("/").split("/") if part],
        query,
    )


def _node(url: str, kind: str, text: str) -> tuple[str, int]:
    """`host:port` or `[ipv6]:port`; the port is required, since a sentinel's (26379) and a
    cluster node's differ from the default."""
    host, colon, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError(f"{redacted(url)}: {kind} node {text!r} is not host:port")
    return host, int(port)


def _db(url: str, text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"{redacted(url)}: database {text!r} is not a number")
    return int(text)


def redacted(url: str) -> str:
    """The URL without its passwords (the data nodes', and a sentinel URL's
    sentinel_password), for messages and logs."""
    url = _SENTINEL_PASSWORD.sub(r"\1***", url)
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, location = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user + ':' if user else ''}***@{location}"


def require_bytes_replies(client: redis.Redis, who: str) -> None:
    """TypeError unless `client` returns bytes: checkpoints are binary safetensors blobs, and
    a client built with decode_responses=True would mangle them before anyone could check."""
    pool = getattr(client, "connection_pool", None)
    if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
        raise TypeError(
            f"{who} needs a Redis client that returns bytes: build it with "
            "decode_responses=False (the default), or use negcase.store.connection.connect(url)"
        )


def server_of(client: Client, key: str | bytes) -> redis.Redis:
    """A client whose connections reach the server holding `key`: `client` itself, except in a
    Cluster, where it is the client of the primary that owns the key's slot. What needs one
    connection to that server (WAIT after a write, TIME beside reads in one pipeline) uses it."""
    if not isinstance(client, RedisCluster):
        return client
    node = client.get_node_from_key(key)
    return node.redis_connection or client.get_redis_connection(node)


def check_namespace_slot(client: object, keys: Keys) -> None:
    """In a Cluster, NamespaceSlotError unless every key of the namespace hashes to one slot:
    negcase's Lua scripts and MULTI blocks touch many keys at once, which a Cluster allows
    only within one slot. A plain or Sentinel client passes."""
    if not isinstance(client, RedisCluster):
        return
    slots: dict[int, str] = {}
    for key in keys.representatives():
        slots.setdefault(key_slot(key.encode()), key)
    if len(slots) > 1:
        shown = ", ".join(f"{key} -> slot {slot}" for slot, key in list(slots.items())[:3])
        raise NamespaceSlotError(
            f"namespace {keys.namespace!r} spreads negcase's keys over {len(slots)} slots of "
            f"the Redis Cluster ({shown}, ...), but its scripts need every key in one slot: "
            f"give it a hash tag, e.g. NEGCASE_NAMESPACE={{{keys.namespace.strip('{}')}}}"
        )


def backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 5.0, jitter: float = 0.5) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0-based): capped exponential,
    with up to `jitter` of it randomized so that many workers do not reconnect in step."""
    delay = min(cap_s, base_s * (2**attempt))
    return delay * (1 - jitter * random.random())
