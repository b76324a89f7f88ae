"""Signal requests and replies: the wire format between trading engines and inference.

A request is one entry on `<ns>:signals:requests` with the fields `request_id` and
`features` (a JSON array of the deployment's feature count of finite numbers). The reply
is one JSON object pushed to the list `<ns>:signals:reply:<request_id>`, where the engine
waits with BLPOP. A request over NEGCASE_MAX_REQUEST_BYTES (field names and values
together) gets an error reply naming `request`. `signal_request.schema.json` and
`signal_reply.schema.json` describe both for producers in other languages.

The worker decodes a batch of requests straight into one float32 array, so the request
parsers here write into a row of that array instead of building Python lists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from negcase.schemas.case import ACTIONS

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
# float32 is what the model reads: a finite float64 above this becomes infinity there.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = frozenset((float, int))


class SignalRequestError(ValueError):
    """A request that cannot be answered with a signal: `field` names what, `reason` why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Signal:
    """What the model advises for one set of features, and which model version said so."""

    action: str
    confidence: float
    probabilities: dict[str, float]
    model_version: int
    request_id: str | None = None
    worker: str | None = None
    batch: int | None = None
    # False when the confidence is under NEGCASE_MIN_CONFIDENCE, or while the version in
    # service defers to the engine's own rule: the model has no opinion here, and the engine
    # should keep its own rule rather than follow `action`.
    opinion: bool = True
    # True when a canary answered: a new version on trial for a share of the requests.
    canary: bool = False

    def to_json(self) -> bytes:
        """The reply as it travels: one JSON object."""
        return orjson.dumps(
            {
                "request_id": self.request_id,
                "action": self.action,
                "confidence": self.confidence,
                "opinion": self.opinion,
                "probabilities": self.probabilities,
                "model_version": self.model_version,
                "canary": self.canary,
                "worker": self.worker,
                "batch": self.batch,
            }
        )


def signal_from_probabilities(
    probabilities: Sequence[float],
    model_version: int,
    request_id: str | None = None,
    worker: str | None = None,
    batch: int | None = None,
    min_confidence: float = 0.0,
    canary: bool = False,
) -> Signal:
    """The signal for one row of softmax output, in ACTIONS order (BUY, SELL, HOLD); it has
    an opinion when its confidence reaches `min_confidence`."""
    buy, sell, hold = probabilities
    best = max(range(3), key=probabilities.__getitem__)
    return Signal(
        action=ACTIONS[best],
        confidence=probabilities[best],
        probabilities={"BUY": buy, "SELL": sell, "HOLD": hold},
        model_version=model_version,
        request_id=request_id,
        worker=worker,
        batch=batch,
        opinion=probabilities[best] >= min_confidence,
        canary=canary,
    )


def error_reply(
    request_id: str,
    field: str,
    reason: str,
    model_version: int | None,
    worker: str | None = None,
    batch: int | None = None,
) -> bytes:
    """The reply to a request that got no signal, naming the field and the reason."""
    return orjson.dumps(
        {
            "request_id": request_id,
            "error": {"field": field, "reason": reason},
            "model_version": model_version,
            "worker": worker,
            "batch": batch,
        }
    )


def parse_reply(raw: bytes) -> Signal:
    """A reply as the engine reads it: a Signal, or SignalRequestError for an error reply."""
    reply = orjson.loads(raw)
    error = reply.get("error")
    if error is not None:
        raise SignalRequestError(error["field"], error["reason"])
    return Signal(
        action=reply["action"],
        confidence=reply["confidence"],
        probabilities=reply["probabilities"],
        model_version=reply["model_version"],
        request_id=reply["request_id"],
        worker=reply.get("worker"),
        batch=reply.get("batch"),
        opinion=reply.get("opinion", True),
        canary=reply.get("canary", False),
    )


def request_fields(request_id: str, features: Sequence[float] | np.ndarray) -> dict[bytes, bytes]:
    """The stream fields of a request, as XADD takes them and XREADGROUP returns them."""
    values = features.tolist() if isinstance(features, np.ndarray) else list(features)
    return {b"request_id": request_id.encode(), b"features": orjson.dumps(values)}


def check_request_size(fields: Mapping[bytes, bytes], max_bytes: int) -> None:
    """SignalRequestError naming `request` when its field names and values together take
    more than `max_bytes` (NEGCASE_MAX_REQUEST_BYTES): nothing that large is parsed."""
    size = sum(map(len, fields)) + sum(map(len, fields.values()))
    if size > max_bytes:
        raise SignalRequestError("request", f"{size} bytes, over the limit of {max_bytes}")


def request_id_of(fields: Mapping[bytes, bytes]) -> str:
    """The request's id, checked: the reply key is built from it."""
    raw = fields.get(b"request_id")
    if raw is None:
        raise SignalRequestError("request_id", "required")
    text = raw.decode("utf-8", "replace")
    if not _REQUEST_ID.match(text):
        raise SignalRequestError("request_id", "expected 1-128 characters of A-Z a-z 0-9 . _ : -")
    return text


def features_into(raw: bytes | None, row: np.ndarray) -> None:
    """Decode the `features` field (JSON array text) into `row`, checking every value."""
    if raw is None:
        raise SignalRequestError("features", "required")
    try:
        values = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise SignalRequestError("features", f"not a JSON array of numbers: {error}") from None
    # The common case at C speed: JSON holds no NaN or infinity, so exact types and the
    # float32 range are all there is to check. Anything else takes the slow path, which
    # names the bad value.
    if (
        type(values) is list
        and len(values) == len(row)
        and _NUMBER_TYPES.issuperset(map(type, values))
        and min(values) >= -_FLOAT32_MAX
        and max(values) <= _FLOAT32_MAX
    ):
        row[:] = values
        return
    check_features(values, len(row))
    row[:] = values


def check_features(values: Any, feature_count: int) -> None:
    """Raise SignalRequestError unless `values` is `feature_count` finite float32 numbers."""
    if not isinstance(values, list | tuple):
        raise SignalRequestError("features", "expected a JSON array of numbers")
    if len(values) != feature_count:
        raise SignalRequestError("features", f"expected {feature_count} numbers, got {len(values)}")
    for index, value in enumerate(values):
        # bool is an int in Python but not a number in JSON; numpy would also parse "1.5".
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise SignalRequestError(f"features[{index}]", f"expected a number, got {value!r}")
        # False for NaN and both infinities too; ints compare without float overflow.
        if not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
            raise SignalRequestError(
                f"features[{index}]", f"must be a finite float32 number, got {value!r}"
            )
