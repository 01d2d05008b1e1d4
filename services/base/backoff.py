"""Retry pacing shared by every reconnecting loop: jittered backoff and a token bucket.

The events publisher (NATS reconnects) and the registry backends (Consul and NATS-KV
watches, heartbeats) pace their retries with these, so a mesh that lost its NATS or
Consul does not hammer it when it comes back.
"""

from __future__ import annotations

import asyncio
import random
import time

__all__ = ["Backoff", "TokenBucket"]

_MAX_DOUBLINGS = 30
"""Growth stops here; the bound is long capped by ``maximum`` anyway."""


class Backoff:
    """Exponential backoff with jitter, reset after a success.

    Each delay is drawn from the upper half of a bound that doubles after every failure,
    from ``initial`` up to ``maximum``.

    Args:
        initial: Upper bound of the first delay, in seconds.
        maximum: Cap of the upper bound, in seconds.
    """

    def __init__(self, *, initial: float = 0.5, maximum: float = 30.0) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        """Forget past failures."""
        self._attempt = 0

    def next_delay(self) -> float:
        """Return the next delay and grow the bound."""
        bound = min(self._maximum, self._initial * (2**self._attempt))
        self._attempt = min(self._attempt + 1, _MAX_DOUBLINGS)
        # Jitter spreads the reconnect storm of many services over the window.
        return random.uniform(bound / 2, bound)

    async def wait(self) -> None:
        """Sleep for the next delay (the pause between retries of a failed call)."""
        await asyncio.sleep(self.next_delay())


class TokenBucket:
    """Rate limit for a polling loop: ``burst`` calls at once, then one per ``interval``.

    Args:
        burst: Bucket size (calls allowed back to back after a quiet period).
        interval: Seconds to earn one token back.

    Raises:
        ValueError: ``burst`` below 1 or a negative ``interval``.
    """

    def __init__(self, *, burst: int = 2, interval: float = 15.0) -> None:
        if burst < 1 or interval < 0:
            raise ValueError("burst must be >= 1 and interval >= 0")
        self._burst = float(burst)
        self._interval = interval
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        if self._interval == 0:
            self._tokens = self._burst
        else:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._interval)
        self._stamp = now

    def delay(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill()
        if self._tokens >= 1:
            return 0.0
        return (1 - self._tokens) * self._interval

    async def acquire(self) -> None:
        """Wait for a token and take it."""
        wait = self.delay()
        if wait > 0:
            # Exactly the time the missing fraction of a token takes to accrue.
            await asyncio.sleep(wait)
            self._refill()
        self._tokens = max(0.0, self._tokens - 1)
