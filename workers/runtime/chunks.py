"""Cutting a long iteration (a SCAN, an archive) into lists, one round trip each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of up to `size` items (Python 3.12's itertools.batched, as lists)."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
