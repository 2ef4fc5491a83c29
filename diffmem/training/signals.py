"""Turning SIGINT/SIGTERM into a request to stop at the next safe point (after a training
step, or once the runs of a sweep have checkpointed), instead of dying mid-write."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """While active, the first SIGINT/SIGTERM sets `signum` (and prints `message`, if
    any); a second SIGINT raises KeyboardInterrupt, for a user who does not want to wait.
    Outside the main thread (where Python cannot handle signals) it does nothing."""

    def __init__(self, message: str | None = None):
        self.signum: int | None = None
        self.message = message
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.message:
            print(f"\n{signal.Signals(signum).name} received: {self.message}", file=sys.stderr, flush=True)
