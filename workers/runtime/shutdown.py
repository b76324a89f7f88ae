"""Graceful shutdown: the first SIGTERM/SIGINT asks the worker to stop after the work in
hand; a second one exits at once (the rq convention)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger("negcase.shutdown")


class StopFlag:
    """Set when the worker should stop taking new work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        """Ask the worker to stop."""
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`, waking early when a stop is asked for."""
        return self._event.wait(timeout_s)


def install_signal_handlers(stop: StopFlag, name: str) -> None:
    """Route SIGTERM and SIGINT to `stop`; the second signal exits the process now."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning("%s: second %s, exiting now", name, signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info(
            "%s: %s, finishing the work in hand (send it again to exit now)",
            name,
            signal.Signals(signum).name,
        )
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, for commands that clean up on Ctrl-C (without
    it, Python's default SIGTERM exits without running `finally` blocks)."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
