"""NEGCASE_REDIS_URL forms: what each one connects to, and the errors that name a bad part.
(Following a real failover and a real Cluster: test_sentinel_failover.py, test_cluster.py.)"""

from __future__ import annotations

import pytest
import redis

from negcase.store.connection import (
    RedisUrlError,
    check_namespace_slot,
    connect,
    redacted,
)
from negcase.store.keys import Keys


def test_a_sentinel_url_gives_a_primary_client_with_credentials_for_each_side() -> None:
    # given a URL with data-node credentials, two sentinels (one IPv6), a service and a db,
    # and sentinel credentials in the query, percent-encoded
    url = (
        "redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/orders/2"
        "?sentinel_username=watch&sentinel_password=s%26cret"
    )
    # when it is connected (nothing is asked of the servers until a command runs)
    client = connect(url)

    # then the client follows the primary of `orders`, authenticates there as app, and asks
    # each sentinel as watch
    pool = client.connection_pool
    assert pool.service_name == "orders" and pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("app", "p@ss", 2)
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [("10.0.0.1", 26379), ("::1", 26380)]
    assert {(s["username"], s["password"]) for s in sentinels} == {("watch", "s&cret")}


def test_sentinels_get_no_credentials_unless_the_query_names_them() -> None:
    client = connect("redis+sentinel://app:pw@127.0.0.1:26379/mymaster")
    sentinel = client.connection_pool.sentinel_manager.sentinels[0].connection_pool
    assert sentinel.connection_kwargs["password"] is None
    assert client.connection_pool.connection_kwargs["db"] == 0


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis+sentinel://127.0.0.1:26379", "/<service>[/db]"),
        ("redis+sentinel://127.0.0.1:26379/m/0/1", "/<service>[/db]"),
        ("redis+sentinel://127.0.0.1/mymaster", "sentinel node '127.0.0.1' is not host:port"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "database 'x' is not a number"),
        ("redis+sentinel://127.0.0.1:26379/mymaster?password=x", "unknown option(s) ['password']"),
        ("redis+cluster://127.0.0.1:7000/3", "database 0 only"),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:x", "cluster node '127.0.0.1:x'"),
        ("rediss+sentinel://127.0.0.1:26379/m", "not supported"),
    ],
)
def test_a_bad_url_is_an_error_naming_the_part(url: str, names: str) -> None:
    with pytest.raises(RedisUrlError) as raised:
        connect(url)
    assert names in str(raised.value)


def test_an_unreachable_cluster_is_a_connection_error() -> None:
    with pytest.raises(redis.ConnectionError, match="Redis Cluster"):
        connect("redis+cluster://127.0.0.1:1")


def test_messages_never_show_a_password() -> None:
    assert redacted("redis://u:secret@h:6379/0") == "redis://u:***@h:6379/0"
    shown = redacted("redis+sentinel://h:1/m?sentinel_password=secret")
    assert "secret" not in shown


def test_a_plain_client_takes_any_namespace(client) -> None:
    # the slot rule only binds a Cluster client; one server holds every key
    check_namespace_slot(client, Keys("negcase"))
