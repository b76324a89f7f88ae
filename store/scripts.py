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


def script(client: redis.Redis, name: str, *preludes: str) -> Script:
    """The script `<name>.lua` registered on `client`, after each `<prelude>.lua` given, in
    order (Redis scripts cannot import: shared functions travel as source). redis-py's
    Script runs it by SHA and reloads it after a NOSCRIPT (a restarted or failed-over Redis)."""
    return client.register_script("".join(_source(part) for part in (*preludes, name)))
