"""SIGTERM and SIGINT for a node process (`rayinfer head`, `rayinfer worker`).

While the node starts (waiting for the head, loading models, waiting for the coordinator), the
first signal aborts the start: `StartInterrupted` unwinds it, and the `finally` blocks on the
way out stop the Ray node that was started. Before, a worker ignored both signals until its
start ended (a Ctrl-C while it waited for a coordinator did nothing, ever), and a signal that
came before Ray was up ended the process without stopping what it had started. Once the node
runs, a signal only sets `stopping`: the worker drains, the head's gateway shuts down.
"""

from __future__ import annotations

import signal
import threading


class StartInterrupted(Exception):
    """A stop signal arrived before the node was ready."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name} while starting")
        self.signal_name = signal_name


class StopSignals:
    def __init__(self):
        self.stopping = threading.Event()
        self.running = False  # set once the node is ready: signals stop asking to abort

    def install(self) -> None:
        """Handle both signals here. Call it again after `ray.init`, which installs a SIGTERM
        handler of its own in every driver."""
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number: int, _frame) -> None:
        first = not self.stopping.is_set()
        self.stopping.set()
        if first and not self.running:  # a second signal must not cut the clean-up short
            raise StartInterrupted(signal.Signals(number).name)
