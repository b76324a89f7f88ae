"""TradeClosed: the three encodings, clear errors, and agreement with the JSON Schema."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import orjson
import pytest

from negcase.client.trades import encode_trade
from negcase.schemas.trade import TradeDefaults, TradeError, parse_trade, validate_trade

DEFAULTS = TradeDefaults()
SCHEMA = json.loads(
    (Path(__file__).parent.parent / "schemas" / "trade_closed.schema.json").read_text()
)
FEATURES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
BASE: dict[str, Any] = {
    "trade_id": "t1",
    "symbol": "ETH/USDT",
    "side": "BUY",
    "entry_price": 3000,
    "exit_price": 2970,
}


def with_(**changes: Any) -> dict[str, Any]:
    trade = {**BASE, **changes}
    return {k: v for k, v in trade.items() if v is not _DROP}


_DROP = object()


def fields_of(trade: dict[str, Any], encoding: str) -> dict[bytes, bytes]:
    return {
        (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
        for k, v in encode_trade(trade, encoding).items()
    }


FULL = with_(
    quantity=0.5,
    leverage=20,
    fee_rate=0.0004,
    opened_at="2026-11-24T09:00:00Z",
    closed_at=1795513508000,
    confidence=0.7,
    model_version=3,
    features=FEATURES,
    market_state_before={"rsi": 71},
    market_state_after={"rsi": 40},
    technical_indicators={"macd": -1.2},
    tick_data=[{"p": 3000}, {"p": 2990}],
    strategy="momentum",
)


@pytest.mark.parametrize("encoding", ["flat", "json", "msgpack"])
def test_the_three_encodings_give_the_same_trade(encoding):
    # given one trade with every field, sent in each encoding
    trade = parse_trade(fields_of(FULL, encoding), DEFAULTS)
    # then each decodes to the same values
    assert trade.trade_id == "t1" and trade.side == "BUY"
    assert trade.entry_price == 3000.0 and trade.leverage == 20.0 and trade.quantity == 0.5
    assert trade.features == FEATURES
    assert trade.opened_at_ms == 1795510800000
    assert trade.closed_at_ms == 1795513508000
    assert trade.model_version == 3 and trade.confidence == 0.7
    assert trade.tick_data == [{"p": 3000}, {"p": 2990}]
    assert trade.technical_indicators == {"macd": -1.2}
    # and an unknown field is kept under extra, not an error
    assert trade.extra == {"strategy": "momentum"}


def test_defaults_fill_what_a_producer_leaves_out():
    trade = parse_trade(fields_of(BASE, "flat"), TradeDefaults(leverage=5, fee_rate=0.001))
    assert (trade.quantity, trade.leverage, trade.fee_rate) == (1.0, 5.0, 0.001)
    assert trade.features is None


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        (
            {b"symbol": b"X", b"side": b"BUY", b"entry_price": b"1", b"exit_price": b"1"},
            "trade_id",
            "required",
        ),
        ({**fields_of(BASE, "flat"), b"entry_price": b"abc"}, "entry_price", "expected a number"),
        ({**fields_of(BASE, "flat"), b"entry_price": b"nan"}, "entry_price", "finite"),
        ({**fields_of(BASE, "flat"), b"exit_price": b"inf"}, "exit_price", "finite"),
        ({**fields_of(BASE, "flat"), b"entry_price": b"-3"}, "entry_price", "> 0"),
        ({**fields_of(BASE, "flat"), b"symbol": b"\xff\xfe"}, "symbol", "UTF-8"),
        ({**fields_of(BASE, "flat"), b"side": b"LONG"}, "side", "'BUY', 'SELL' or 'HOLD'"),
        ({**fields_of(BASE, "flat"), b"features": b"[1,2]"}, "features", "expected 8 numbers"),
        ({**fields_of(BASE, "flat"), b"features": b"[1,2"}, "features", "not valid JSON"),
        ({**fields_of(BASE, "flat"), b"leverage": b"0.5"}, "leverage", ">= 1"),
        ({**fields_of(BASE, "flat"), b"opened_at": b"yesterday"}, "opened_at", "ISO 8601"),
        ({b"json": b"{not json"}, "json", "not valid JSON"),
        ({b"json": b"[1, 2]"}, "json", "expected a JSON object"),
        ({b"msgpack": b"\xc1"}, "msgpack", "not a valid msgpack"),
        (
            {b"msgpack": msgpack.packb({"trade_id": b"\xff"}, use_bin_type=False)},
            "msgpack",
            "UTF-8",
        ),
        ({b"protobuf": b"\x08\x01"}, "entry", "unknown encoding 'protobuf'"),
        ({b"json": b"x" * 70000}, "entry", "over the limit"),
        ({}, "entry", "no fields"),
        (
            {b"json": orjson.dumps({**BASE, "features": [*FEATURES[:7], True]})},
            "features[7]",
            "finite number",
        ),
        ({b"msgpack": msgpack.packb({**BASE, "exit_price": math.nan})}, "exit_price", "finite"),
        # whole numbers among the features take the slow path, which must refuse NaN too
        (
            {b"msgpack": msgpack.packb({**BASE, "features": [1, 2, math.nan, *FEATURES[3:]]})},
            "features[2]",
            "finite number",
        ),
        (
            {b"msgpack": msgpack.packb({**BASE, "features": [*FEATURES[:7], -math.inf]})},
            "features[7]",
            "finite number",
        ),
    ],
)
def test_bad_input_is_an_error_naming_the_field_and_the_reason(fields, field, reason):
    with pytest.raises(TradeError) as caught:
        parse_trade(fields, DEFAULTS)
    assert caught.value.field == field
    assert reason in caught.value.reason


# Examples for the JSON Schema agreement test: (trade object, valid?).
EXAMPLES: list[tuple[dict[str, Any], bool]] = [
    (BASE, True),
    (FULL, True),
    (with_(side="SELL", leverage=500, fee_rate=0), True),
    (with_(quantity=None, leverage=None, confidence=None), True),
    (with_(opened_at="2026-11-24", closed_at="2026-11-24 10:00:00.123+01:00"), True),
    (with_(opened_at=0), True),
    (with_(model_version=0, confidence=1), True),
    (with_(trade_id="a" * 128), True),
    (with_(trade_id="ord:42.x_y-z"), True),
    (with_(features=FEATURES, tick_data=[]), True),
    (with_(extra_field={"anything": [1, 2]}), True),
    (with_(fee_rate=1), True),
    (with_(rule_side="HOLD"), True),
    (with_(rule_side=None), True),
    (with_(trade_id=_DROP), False),
    (with_(symbol=_DROP), False),
    (with_(side=_DROP), False),
    (with_(entry_price=_DROP), False),
    (with_(exit_price=_DROP), False),
    (with_(trade_id=""), False),
    (with_(trade_id="a" * 129), False),
    (with_(trade_id="has space"), False),
    (with_(trade_id=7), False),
    (with_(symbol=""), False),
    (with_(symbol="x" * 65), False),
    (with_(symbol="BAD\nSYMBOL"), False),
    (with_(side="buy"), False),
    (with_(rule_side="sell"), False),
    (with_(rule_side=1), False),
    (with_(entry_price=0), False),
    (with_(entry_price="3000"), False),
    (with_(exit_price=-1), False),
    (with_(exit_price=True), False),
    (with_(quantity=0), False),
    (with_(leverage=0.99), False),
    (with_(fee_rate=-0.1), False),
    (with_(fee_rate=1.5), False),
    (with_(confidence=1.01), False),
    (with_(model_version=1.5), False),
    (with_(model_version=-1), False),
    (with_(opened_at=-5), False),
    (with_(opened_at="24/11/2026"), False),
    (with_(closed_at=1.5), False),
    (with_(features=FEATURES[:7]), False),
    (with_(features=[*FEATURES, 0.9]), False),
    (with_(features=[*FEATURES[:7], "x"]), False),
    (with_(features="[1,2,3]"), False),
    (with_(market_state_before=[1]), False),
    (with_(market_state_after="calm"), False),
    (with_(technical_indicators="rsi"), False),
    (with_(tick_data={"p": 1}), False),
    (with_(tick_data=[1, 2]), False),
]


def python_accepts(trade: dict[str, Any]) -> bool:
    try:
        validate_trade(trade, DEFAULTS)
    except TradeError:
        return False
    return True


@pytest.mark.parametrize(("trade", "valid"), EXAMPLES)
def test_python_validator_and_json_schema_agree(trade, valid):
    schema_accepts = jsonschema.Draft202012Validator(SCHEMA).is_valid(trade)
    assert schema_accepts is valid
    assert python_accepts(trade) is valid
    # and the json encoding on the stream agrees with validating the object directly
    assert python_accepts_encoded(trade) is valid


def python_accepts_encoded(trade: dict[str, Any]) -> bool:
    try:
        parse_trade({b"json": orjson.dumps(trade)}, DEFAULTS)
    except TradeError:
        return False
    return True


def test_every_field_the_schema_constrains_has_an_example_that_breaks_it():
    # (so the agreement test covers a field the schema gains, or it fails here)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    broken = set()
    for trade, valid in EXAMPLES:
        if not valid:
            broken |= {k for k in BASE.keys() | trade.keys() if trade.get(k, _DROP) != BASE.get(k)}
    assert set(SCHEMA["properties"]) <= broken, set(SCHEMA["properties"]) - broken
    assert set(SCHEMA["required"]) <= {k for t, _ in EXAMPLES for k in BASE if k not in t}
