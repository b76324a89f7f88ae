"""Lua scripts, each in its own .lua file beside this module, loaded once per client."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import redis
from redis.commands.core import Script

_FOLDER = Path(__file__).parent


@cache
def _source(name: str) -> str:
    return (_FOLDER / f"{name}.lua").read_text()


def script(client: redis.Redis, name: str, prelude: str | None = None) -> Script:
    """The script `<name>.lua` registered on `client`, after `<prelude>.lua` when given (Redis
    scripts cannot import: shared functions travel as source). redis-py's Script runs it by
    SHA and reloads it after a NOSCRIPT (a restarted or failed-over Redis)."""
    source = _source(name) if prelude is None else _source(prelude) + _source(name)
    return client.register_script(source)
