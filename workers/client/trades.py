"""Publishing trade-close events on `<ns>:trades` (or, with partitions, on the trades stream
of the partition the trade's symbol picks), for trading engines and tools."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
import orjson
import redis

from negcase.store.keys import Keys, partition_of

ENCODINGS = ("flat", "json", "msgpack")
PIPELINE_SIZE = 500


def encode_trade(trade: Mapping[str, Any], encoding: str) -> dict[str, bytes | str]:
    """Stream fields for a trade in one of the three encodings of DESIGN.md."""
    if encoding == "json":
        return {"json": orjson.dumps(trade)}
    if encoding == "msgpack":
        return {"msgpack": msgpack.packb(trade, use_bin_type=True)}
    return {name: _flat_text(value) for name, value in trade.items() if value is not None}


def _flat_text(value: Any) -> bytes | str:
    if isinstance(value, str | bytes):
        return value
    if isinstance(value, list | dict | bool):
        return orjson.dumps(value)
    return repr(value)


def trades_stream(keys: Keys, trade: Mapping[str, Any], partitions: int = 1) -> str:
    """The stream a trade goes to: its symbol's partition's (keys.partition_of). A trade
    without a usable symbol goes to partition 0, where the detector dead-letters it."""
    symbol = trade.get("symbol")
    partition = partition_of(symbol, partitions) if isinstance(symbol, str) else 0
    return keys.partition(partition, partitions).trades


def publish_trades(
    client: redis.Redis,
    keys: Keys,
    trades: Iterable[Mapping[str, Any]],
    encoding: str = "flat",
    partitions: int = 1,
) -> int:
    """XADD every trade to its partition's stream, PIPELINE_SIZE per round trip. Returns how
    many were published."""
    published = 0
    pipe = client.pipeline(transaction=False)
    for trade in trades:
        pipe.xadd(trades_stream(keys, trade, partitions), encode_trade(trade, encoding))
        published += 1
        if published % PIPELINE_SIZE == 0:
            pipe.execute()
    pipe.execute()
    return published
