"""SIGTERM and SIGINT for a node process (`rayinfer head`, `rayinfer worker`).

The handler only notes the signal. While the node starts, every long wait (for the head's
port, for `ray start`, for the models to load, for a coordinator) calls `check()` at least
once a second, which ends the start with `StartInterrupted`; the `finally` blocks on the way
out stop the Ray node that was started. (Raising from the handler itself broke a `ray.get`
it landed in with a SystemError.) Before, a worker ignored both signals until its start
ended, which it never did while it waited for a coordinator, and a SIGTERM before Ray was
up killed the process outright. Once the node runs, a signal only sets `stopping`: the worker
drains, the head's gateway shuts down.
"""

from __future__ import annotations

import signal
import threading


class StartInterrupted(Exception):
    """A stop signal arrived before the node was ready."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name} while starting")


class StopSignals:
    def __init__(self):
        self.stopping = threading.Event()
        self._received = ""  # the first signal's name

    def install(self) -> None:
        """Handle both signals here. Call it again after `ray.init`, which installs a SIGTERM
        handler of its own in every driver."""
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number: int, _frame) -> None:
        self._received = self._received or signal.Signals(number).name
        self.stopping.set()

    def check(self) -> None:
        """Raise StartInterrupted once a stop signal has arrived."""
        if self._received:
            raise StartInterrupted(self._received)


def never_stopped() -> None:
    """The `check` of a caller that has no signals to watch."""
