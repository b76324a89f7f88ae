"""Start worker processes and stop every one of them, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from negcase.runtime.settings import Settings
from negcase.store.local_redis import die_with_parent


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment a child worker needs to run with exactly these settings: the same
    Redis, namespace and archive, and every flag the parent was given (a seed, a feature
    count) as its NEGCASE_* variable. The parent's own NEGCASE_* variables are left out:
    `settings` already holds what they said, unless a flag overrode it."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("NEGCASE_")}
    return {**inherited, **settings.to_env(), "PYTHONUNBUFFERED": "1"}


@dataclass
class Supervisor:
    """The worker processes one command started; `stop_all` ends them (SIGTERM, then kill)."""

    settings: Settings
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Run `negcase <args>` as a child named `name`, its output in `<log_dir>/<name>.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "negcase", *args],
                env=worker_environment(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C at the terminal reaches the supervisor only, which
                # then stops each child once, gracefully.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.processes[name] = process
        return process

    def exited(self) -> dict[str, int]:
        """Children that exited on their own, with their exit codes."""
        return {name: code for name, p in self.processes.items() if (code := p.poll()) is not None}

    def stop_all(self, timeout_s: float = 15.0) -> dict[str, int]:
        """Ask every child to finish its work in hand, wait, kill stragglers; exit codes.
        A second Ctrl-C or SIGTERM while this runs is ignored: stopping is what it asked for."""
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            return self._stop_all(timeout_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_all(self, timeout_s: float) -> dict[str, int]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        return codes
