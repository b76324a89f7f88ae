"""TradeClosed, version 1: the trade-close event, its three encodings, and its validation.

An entry on `<ns>:trades` is flat stream fields, or one field `json` holding a JSON object,
or one field `msgpack` holding a msgpack map. `parse_trade` turns any of them into a
`TradeClosed` or raises `TradeError` naming the field and the reason. It runs once per
entry in the detector's hot loop, so it decodes each value once and allocates little.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import orjson

MAX_FIELDS = 256
# HOLD reports a decision not to trade: entry_price is the price when the engine decided,
# exit_price the price at the end of its horizon, so a missed move can be learned from.
SIDES = ("BUY", "SELL", "HOLD")
TRADE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
SYMBOL_PATTERN = r"^[^\x00-\x1f\x7f]{1,64}$"
ISO_8601_PATTERN = (
    r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)?)?$"
)
_TRADE_ID = re.compile(TRADE_ID_PATTERN)
_SYMBOL = re.compile(SYMBOL_PATTERN)
_ISO_8601 = re.compile(ISO_8601_PATTERN)
_DIGITS = re.compile(r"^\d+$")
# Integers travel as int64 (msgpack, Redis counters): anything larger is refused here, with
# a reason, rather than raising OverflowError far from the entry that held it.
MAX_INTEGER = 2**63 - 1
_MAX_INTEGER_DIGITS = len(str(MAX_INTEGER))
# The last millisecond of 9999-12-31, UTC: the latest time ISO 8601 can spell.
MAX_TIMESTAMP_MS = 253_402_300_799_999
# The model trains and serves in float32: a finite float64 beyond this becomes infinity there.
FLOAT32_MAX = 3.4028234663852886e38

# Fields carried as JSON text when the entry uses flat stream fields.
_JSON_TEXT_FIELDS = frozenset(
    {"features", "market_state_before", "market_state_after", "technical_indicators", "tick_data"}
)
_NUMBER_FIELDS = frozenset(
    {"entry_price", "exit_price", "quantity", "leverage", "fee_rate", "confidence"}
)
KNOWN_FIELDS = frozenset(
    {"trade_id", "symbol", "side", "rule_side", "opened_at", "closed_at", "model_version"}
    | _NUMBER_FIELDS
    | _JSON_TEXT_FIELDS
)

_KNOWN_NAMES = {name.encode(): name for name in KNOWN_FIELDS}
# Allowed range of each number field: (minimum, whether the minimum itself is excluded, maximum).
_BOUNDS = {
    "entry_price": (0.0, True, math.inf),
    "exit_price": (0.0, True, math.inf),
    "quantity": (0.0, True, math.inf),
    "leverage": (1.0, False, math.inf),
    "fee_rate": (0.0, False, 1.0),
    "confidence": (0.0, False, 1.0),
}


class TradeError(ValueError):
    """A trade event that cannot be used: `field` names what is wrong, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TradeDefaults:
    """The deployment's values for what a producer may leave out, and its limits."""

    feature_count: int = 8
    leverage: float = 1.0
    fee_rate: float = 0.0
    max_entry_bytes: int = 65536


@dataclass(slots=True)
class TradeClosed:
    """One closed trade, validated."""

    trade_id: str
    symbol: str
    side: str
    entry_price: float
    exit_price: float
    quantity: float
    leverage: float
    fee_rate: float
    opened_at_ms: int | None
    closed_at_ms: int | None
    confidence: float | None
    model_version: int | None
    # What the engine's own rule would have done on this decision, when the engine says:
    # what lets the serving step judge the version in service against that rule.
    rule_side: str | None
    features: list[float] | None
    market_state_before: dict[str, Any] | None
    market_state_after: dict[str, Any] | None
    technical_indicators: dict[str, Any] | None
    tick_data: list[dict[str, Any]] | None
    extra: dict[str, Any]


def parse_trade(fields: Mapping[bytes, bytes], defaults: TradeDefaults) -> TradeClosed:
    """Decode and validate one stream entry in any of the three encodings."""
    return validate_trade(decode_entry(fields, defaults.max_entry_bytes), defaults)


def decode_entry(fields: Mapping[bytes, bytes], max_entry_bytes: int) -> dict[str, Any]:
    """The entry's fields as a plain object, whatever the encoding; types not checked yet."""
    size = sum(map(len, fields)) + sum(map(len, fields.values()))
    if size > max_entry_bytes:
        raise TradeError("entry", f"{size} bytes, over the limit of {max_entry_bytes}")
    if not fields:
        raise TradeError("entry", "no fields (deleted or trimmed before it was read?)")
    if len(fields) > MAX_FIELDS:
        raise TradeError("entry", f"{len(fields)} fields, over the limit of {MAX_FIELDS}")
    if len(fields) == 1:
        ((name, value),) = fields.items()
        if name == b"json":
            return _decode_json(value)
        if name == b"msgpack":
            return _decode_msgpack(value)
        if name.decode("utf-8", "replace") not in KNOWN_FIELDS:
            raise TradeError(
                "entry",
                f"unknown encoding {name.decode('utf-8', 'replace')!r}: "
                "expected flat trade fields, or one field 'json' or 'msgpack'",
            )
    return _decode_flat(fields)


def trade_id_hint(fields: Mapping[bytes, bytes]) -> str | None:
    """The trade_id an entry carries, in any encoding, as text (at most 128 characters), or
    None: for naming a dead letter, even one whose other fields are wrong."""
    raw: object = fields.get(b"trade_id")
    if raw is None and len(fields) == 1:
        ((name, value),) = fields.items()
        try:
            if name == b"json":
                raw = orjson.loads(value).get("trade_id")
            elif name == b"msgpack":
                raw = msgpack.unpackb(value, raw=False, strict_map_key=False).get("trade_id")
        except Exception:  # not a map, not decodable: the entry names no trade
            return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return str(raw)[:128] if raw not in (None, "", b"") else None


def _decode_json(value: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        raise TradeError("json", f"not valid JSON: {error}") from None
    if not isinstance(obj, dict):
        raise TradeError("json", f"expected a JSON object, got {_kind(obj)}")
    return obj


def _decode_msgpack(value: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except UnicodeDecodeError:
        raise TradeError("msgpack", "holds text that is not valid UTF-8") from None
    except Exception as error:  # msgpack raises several unrelated types for bad bytes
        raise TradeError("msgpack", f"not a valid msgpack value: {error}") from None
    if not isinstance(obj, dict):
        raise TradeError("msgpack", f"expected a map, got {_kind(obj)}")
    for key in obj:
        if not isinstance(key, str):
            raise TradeError("msgpack", f"map keys must be text, got {_kind(key)}")
    return obj


def _decode_flat(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for raw_name, raw_value in fields.items():
        name = _KNOWN_NAMES.get(raw_name)
        if name is None:
            try:
                name = raw_name.decode()
            except UnicodeDecodeError:
                raise TradeError(repr(raw_name), "field name is not valid UTF-8") from None
        obj[name] = _flat_value(name, raw_value)
    return obj


def _flat_value(name: str, raw: bytes) -> Any:
    """A flat field's bytes as the JSON value they stand for: numbers and JSON text are
    parsed straight from the bytes (float() and orjson take bytes), the rest is text."""
    if name in _NUMBER_FIELDS:
        try:
            return float(raw)
        except ValueError:
            raise TradeError(name, f"expected a number, got {_text_of(raw)!r}") from None
    if name in _JSON_TEXT_FIELDS:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise TradeError(name, f"not valid JSON text: {error}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        # An empty field name is legal in a stream entry: name it so a person can see it.
        raise TradeError(name or "''", "not valid UTF-8") from None
    if name == "model_version":
        return _integer_text(name, text)
    if name in ("opened_at", "closed_at") and _DIGITS.fullmatch(text):
        return _integer_text(name, text)
    return text


def _integer_text(name: str, text: str) -> int:
    """An integer field's text as an int; more digits than int64 holds is out of range
    (and int() of thousands of digits would raise, or take quadratic time)."""
    digits = text.strip().lstrip("+-").lstrip("0")
    if len(digits) > _MAX_INTEGER_DIGITS:
        raise TradeError(name, f"must be at most {MAX_INTEGER}, got {len(digits)} digits")
    try:
        return int(text)
    except ValueError:
        raise TradeError(name, f"expected an integer, got {text[:40]!r}") from None


def _text_of(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")[:40]


def validate_trade(obj: Mapping[str, Any], defaults: TradeDefaults) -> TradeClosed:
    """Check a decoded trade object against TradeClosed v1 and build the typed value."""
    trade_id = _required(obj, "trade_id")
    if not isinstance(trade_id, str) or not _TRADE_ID.fullmatch(trade_id):
        raise TradeError("trade_id", "expected 1-128 characters of A-Z a-z 0-9 . _ : -")
    symbol = _required(obj, "symbol")
    if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
        raise TradeError("symbol", "expected 1-64 printable characters")
    side = _required(obj, "side")
    if side not in SIDES:
        raise TradeError("side", f"expected 'BUY', 'SELL' or 'HOLD', got {side!r}")
    features = obj.get("features")
    return TradeClosed(
        trade_id=trade_id,
        symbol=symbol,
        side=side,
        entry_price=_number(obj, "entry_price"),
        exit_price=_number(obj, "exit_price"),
        quantity=_number(obj, "quantity", 1.0),
        leverage=_number(obj, "leverage", defaults.leverage),
        fee_rate=_number(obj, "fee_rate", defaults.fee_rate),
        opened_at_ms=_timestamp_ms(obj, "opened_at"),
        closed_at_ms=_timestamp_ms(obj, "closed_at"),
        confidence=_number(obj, "confidence", None),
        model_version=_integer(obj, "model_version", MAX_INTEGER),
        rule_side=_rule_side(obj.get("rule_side")),
        features=None if features is None else _features(features, defaults.feature_count),
        market_state_before=_object(obj, "market_state_before"),
        market_state_after=_object(obj, "market_state_after"),
        technical_indicators=_object(obj, "technical_indicators"),
        tick_data=_tick_data(obj.get("tick_data")),
        extra=_extra(obj),
    )


def _rule_side(value: Any) -> str | None:
    if value is None or value in SIDES:
        return value
    raise TradeError("rule_side", f"expected 'BUY', 'SELL', 'HOLD' or null, got {value!r}")


def _extra(obj: Mapping[str, Any]) -> dict[str, Any]:
    # A set difference in C: most trades carry no unknown field at all.
    unknown = obj.keys() - KNOWN_FIELDS
    return {name: obj[name] for name in unknown} if unknown else {}


def _required(obj: Mapping[str, Any], name: str) -> Any:
    value = obj.get(name)
    if value is None:
        raise TradeError(name, "required")
    return value


def _is_number(value: Any) -> bool:
    # bool is an int in Python but not a number in JSON.
    return isinstance(value, int | float) and not isinstance(value, bool)


_MISSING: Any = object()


def _number(obj: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    value = obj.get(name)
    low, low_excluded, high = _BOUNDS[name]
    # The usual case, a float in range, costs one type check and two comparisons.
    if (
        type(value) is float
        and (value > low if low_excluded else value >= low)
        and (value <= high and value != math.inf)
    ):
        return value
    if value is None:
        if default is _MISSING:
            raise TradeError(name, "required")
        return default
    if not _is_number(value):
        raise TradeError(name, f"expected a number, got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise TradeError(name, f"must be finite, got {value}")
    if low_excluded and not value > low:
        raise TradeError(name, f"must be > {low:g}, got {value:g}")
    if value < low:
        raise TradeError(name, f"must be >= {low:g}, got {value:g}")
    if value > high:
        raise TradeError(name, f"must be <= {high:g}, got {value:g}")
    return value


def _integer(obj: Mapping[str, Any], name: str, maximum: int) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if not _is_number(value) or (isinstance(value, float) and not value.is_integer()):
        raise TradeError(name, f"expected an integer, got {_kind(value)}")
    if value < 0:
        raise TradeError(name, f"must be >= 0, got {value}")
    # Compared before int(): int(1e308) is exact, and far too large to store.
    if value > maximum:
        got = f"{value:.6g}" if isinstance(value, float) else f"{value.bit_length()} bits"
        raise TradeError(name, f"must be at most {maximum}, got {got}")
    return int(value)


def _timestamp_ms(obj: Mapping[str, Any], name: str) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        if not _ISO_8601.fullmatch(value):
            raise TradeError(name, f"expected ms since epoch or ISO 8601, got {value!r}")
        try:
            moment = datetime.fromisoformat(value.replace(" ", "T"))
        except ValueError as error:
            raise TradeError(name, f"not a valid ISO 8601 time: {error}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    return _integer(obj, name, MAX_TIMESTAMP_MS)


def _features(value: Any, feature_count: int) -> list[float]:
    if not isinstance(value, list):
        raise TradeError("features", f"expected an array of numbers, got {_kind(value)}")
    if len(value) != feature_count:
        raise TradeError("features", f"expected {feature_count} numbers, got {len(value)}")
    # Fast path for the usual case, all floats: a NaN or infinity makes the sum non-finite
    # (min and max alone can step over a NaN), then the float32 range.
    if (
        all(type(item) is float for item in value)
        and math.isfinite(sum(value))
        and min(value) >= -FLOAT32_MAX
        and max(value) <= FLOAT32_MAX
    ):
        return value
    for index, item in enumerate(value):
        # False for NaN and both infinities too; ints compare without float overflow.
        if not _is_number(item) or not -FLOAT32_MAX <= item <= FLOAT32_MAX:
            raise TradeError(
                f"features[{index}]", f"expected a finite number in float32's range, got {item!r}"
            )
    return [float(item) for item in value]


def _object(obj: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, dict):
        raise TradeError(name, f"expected an object, got {_kind(value)}")
    return value


def _tick_data(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise TradeError("tick_data", f"expected an array of objects, got {_kind(value)}")
    for index, tick in enumerate(value):
        if not isinstance(tick, dict):
            raise TradeError(f"tick_data[{index}]", f"expected an object, got {_kind(tick)}")
    return value


def _kind(value: Any) -> str:
    """A JSON-ish name for a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
