"""Per-principal quotas on submissions: a token bucket and a cap on tasks in flight.

One noisy client must not starve the others. Every principal (a certificate identity, or
the principal of an API key or token) has its own token bucket of submissions and its
own cap on tasks queued or running at once; the limits come from
``coordinator.quotas`` (defaults for everyone, overrides per principal or per role).
Over a limit the submission is refused before anything is stored:
``RESOURCE_EXHAUSTED`` with reason ``RATE_LIMITED`` or ``TOO_MANY_ACTIVE_TASKS``, a
``RetryInfo`` (when the bucket has a token again; for the cap, a short fixed delay) and
a ``QuotaFailure`` naming the principal.

Buckets live in memory (a restart refills them) and are kept for at most
``max_tracked`` principals, least recently used dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from hivewire.services.coordinator.settings import QuotaSettings
from hivewire.services.runtime.errors import ResourceExhausted

_ACTIVE_RETRY = 1.0
"""Seconds a client over its active-task cap is told to wait (tasks end at their pace)."""


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Quotas:
    """Admits or refuses submissions per principal."""

    def __init__(self, settings: QuotaSettings) -> None:
        """Start with full buckets for everyone."""
        self.settings = settings
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def admit(self, identity: str, active: Callable[[], int], *, now: float | None = None) -> None:
        """Take a submission token for ``identity``, or refuse.

        Args:
            identity: The submitting principal.
            active: Counts its tasks queued or running now (called only under a cap).
            now: Monotonic time (tests); defaults to ``time.monotonic()``.

        Raises:
            ResourceExhausted: ``TOO_MANY_ACTIVE_TASKS`` or ``RATE_LIMITED``.
        """
        limits = self.settings.limits_for(identity)
        count = active() if limits.max_active else 0
        if limits.max_active and count >= limits.max_active:
            raise ResourceExhausted(
                f"{identity} has {count} tasks queued or running (limit {limits.max_active})",
                [(f"principal:{identity}", f"at most {limits.max_active} active tasks")],
                retry_after=_ACTIVE_RETRY,
                reason="TOO_MANY_ACTIVE_TASKS",
            )
        if not limits.submit_rate:
            return
        moment = time.monotonic() if now is None else now
        burst = float(limits.submit_burst or max(1.0, limits.submit_rate))
        bucket = self._buckets.pop(identity, None) or _Bucket(burst, moment)
        bucket.tokens = min(burst, bucket.tokens + (moment - bucket.stamp) * limits.submit_rate)
        bucket.stamp = moment
        self._buckets[identity] = bucket
        while len(self._buckets) > self.settings.max_tracked:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / limits.submit_rate
            raise ResourceExhausted(
                f"{identity} submits faster than {limits.submit_rate:g}/s",
                [
                    (
                        f"principal:{identity}",
                        f"{limits.submit_rate:g} submissions/s, burst {burst:g}",
                    )
                ],
                retry_after=wait,
                reason="RATE_LIMITED",
            )
        bucket.tokens -= 1.0
