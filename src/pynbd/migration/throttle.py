"""The mirror's speed limit: a token bucket whose rate can change while it runs."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Bytes/s limit; the rate can change at any time; 0 = unlimited."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.tokens = 0.0
        self._clock = clock
        self._sleep = sleep
        self.last = clock()
        self.lifted = False

    def consume(self, n: int, cancelled: Callable[[], bool]) -> float:
        """Take n bytes' worth of tokens, sleeping as needed; returns seconds slept."""
        slept = 0.0
        while True:
            rate = self.rate
            now = self._clock()
            if rate <= 0 or self.lifted:
                self.last = now
                self.tokens = 0.0
                return slept
            burst = max(rate * 0.1, 65536.0)
            self.tokens = min(self.tokens + (now - self.last) * rate, burst)
            self.last = now
            if self.tokens >= 0:
                self.tokens -= n
                return slept
            if cancelled():
                return slept
            d = min(0.05, -self.tokens / rate)
            self._sleep(d)
            slept += d
