"""SignalClient: ask the inference workers for a signal over Redis, for trading engines."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence

import numpy as np

from negcase.runtime.settings import DEFAULT_REDIS_URL, Settings
from negcase.schemas.signal import (
    REQUEST_ID_PATTERN,
    Signal,
    check_features,
    parse_reply,
    request_fields,
)
from negcase.store.connection import Client, check_namespace_slot, connect
from negcase.store.keys import Keys

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
# Requests are deleted once answered; this cap only matters while no worker is running.
REQUESTS_MAXLEN = 100_000
# A blocking command that outlasts the client's socket timeout fails with TimeoutError
# (and redis-py 8 retries it, pipeline and XADD included). That timeout is None by default
# before redis-py 8.0 and 5 s since (redis/redis-py, DEFAULT_SOCKET_TIMEOUT), store.connection
# sets 30 s, and a client made by from_url shows it in connection_kwargs only when it was
# given. So one BLPOP waits at most this long, and at most half a socket timeout that was set:
# a longer wait is several BLPOPs, each costing one round trip after the first second.
MAX_WAIT_SLICE_S = 1.0
# Redis turns a BLPOP timeout into whole milliseconds, rounding down, and 0 means "forever":
# Redis 6.2 reads 0.001 as 0. No BLPOP asks for less than this.
MIN_BLPOP_S = 0.002


class SignalTimeout(TimeoutError):
    """No reply within the timeout: no worker running, or all of them far behind."""


class SignalClient:
    """Sends one request to `<ns>:signals:requests` and waits for its reply with BLPOP."""

    def __init__(
        self, client: Client, namespace: str = "negcase", feature_count: int | None = None
    ) -> None:
        self.client = client
        self.keys = Keys(namespace)
        check_namespace_slot(client, self.keys)
        self.feature_count = feature_count
        # The prefix is random per client, so ids never collide across engines or restarts.
        self._prefix = os.urandom(6).hex()
        self._sequence = 0
        pool = getattr(client, "connection_pool", None)
        socket_timeout_s = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
        self._wait_slice_s = MAX_WAIT_SLICE_S
        if socket_timeout_s:
            self._wait_slice_s = min(MAX_WAIT_SLICE_S, socket_timeout_s / 2)

    @classmethod
    def from_settings(cls, settings: Settings) -> SignalClient:
        """A client for `settings.redis_url` (any form `store.connection` takes: one server,
        Sentinel, Cluster), namespace and feature count: it follows a failover by itself."""
        client = connect(settings.redis_url or DEFAULT_REDIS_URL)
        return cls(client, settings.namespace, settings.feature_count)

    def request(
        self,
        features: Sequence[float] | np.ndarray,
        timeout_s: float = 1.0,
        request_id: str | None = None,
    ) -> Signal:
        """The signal for `features`, or SignalRequestError (the worker's error reply naming
        the field and reason), or SignalTimeout. `timeout_s` must be positive. When the
        signal's `opinion` is false (confidence under NEGCASE_MIN_CONFIDENCE, or a version
        that defers to your rule), keep your own rule: the model does not know better here.
        `request_id` (1-128 characters of A-Z a-z 0-9 . _ : -) names the decision instead of
        a fresh id: whether a canary answers depends on it, so asking again for one decision
        keeps it with the same version."""
        if not timeout_s > 0:  # NaN too; BLPOP 0 would wait forever
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if request_id is not None and not _REQUEST_ID.match(request_id):
            raise ValueError(f"request_id {request_id!r}: expected 1-128 of A-Z a-z 0-9 . _ : -")
        if self.feature_count is not None:
            values = features.tolist() if isinstance(features, np.ndarray) else features
            check_features(values, self.feature_count)
        request_id = request_id or self.next_request_id()
        reply_key = self.keys.reply(request_id)
        # XADD and BLPOP in one pipeline: one network round trip per request. BLPOP
        # blocks only this connection, after the XADD has run.
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(
            self.keys.requests,
            request_fields(request_id, features),
            maxlen=REQUESTS_MAXLEN,
            approximate=True,
        )
        deadline_s = time.monotonic() + timeout_s
        pipe.blpop([reply_key], timeout=self._blpop_s(timeout_s))
        _, popped = pipe.execute()
        while popped is None and (left_s := deadline_s - time.monotonic()) > 0:
            popped = self.client.blpop([reply_key], timeout=self._blpop_s(left_s))
        if popped is None:
            raise SignalTimeout(f"no reply to request {request_id} within {timeout_s}s")
        return parse_reply(popped[1])

    def _blpop_s(self, left_s: float) -> float:
        return max(MIN_BLPOP_S, min(left_s, self._wait_slice_s))

    def next_request_id(self) -> str:
        """A request id unique to this client: `<random prefix>-<sequence>`."""
        self._sequence += 1
        return f"{self._prefix}-{self._sequence}"
