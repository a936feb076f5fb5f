"""Exponential backoff between retries, cut short by the daemon's stop event.

One policy for every retry loop (broker connection, consumer recreation, resending a batch,
failed transactions): the n-th consecutive failure waits ``first_s * 2**(n - 1)``, at most
``max_s``; a success resets it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Consecutive-failure counter and the wait it implies."""

    stop: threading.Event = field(default_factory=threading.Event)
    first_s: float = 1.0
    max_s: float = 15.0
    failures: int = 0

    def fail(self) -> float:
        """Count a failure; returns the delay before the next attempt (seconds)."""
        self.failures += 1
        return min(self.first_s * 2.0 ** (self.failures - 1), self.max_s)

    def wait(self, delay: float) -> bool:
        """Sleep ``delay`` seconds unless a stop is requested; True if stopping."""
        return self.stop.wait(delay)

    def reset(self) -> None:
        self.failures = 0
