"""The per-principal token bucket and active-task cap, with an explicit clock."""

from __future__ import annotations

import pytest

from hivewire.services.coordinator.quotas import Quotas
from hivewire.services.coordinator.settings import QuotaLimits, QuotaSettings
from hivewire.services.runtime.errors import ResourceExhausted

ALICE = "spiffe://hivewire.local/client/alice"
BOB = "spiffe://hivewire.local/client/bob"
OPS = "spiffe://hivewire.local/admin/ops"


def refused(quotas: Quotas, identity: str, active: int = 0, now: float = 0.0) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as err:
        quotas.admit(identity, lambda: active, now=now)
    return err.value


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    quotas = Quotas(QuotaSettings(submit_rate=2, submit_burst=3))
    for _ in range(3):
        quotas.admit(ALICE, lambda: 0, now=10.0)
    err = refused(quotas, ALICE, now=10.0)
    assert err.reason == "RATE_LIMITED" and err.retry_after == pytest.approx(0.5)
    assert err.quota_violations[0].subject == f"principal:{ALICE}"
    quotas.admit(ALICE, lambda: 0, now=10.5)  # one token back after 1/rate seconds
    assert refused(quotas, ALICE, now=10.5).reason == "RATE_LIMITED"
    # Another principal has its own full bucket.
    for _ in range(3):
        quotas.admit(BOB, lambda: 0, now=10.5)


def test_the_active_cap_and_overrides_by_principal_and_role() -> None:
    settings = QuotaSettings(
        max_active=5,
        principals={ALICE: QuotaLimits(max_active=1)},
        roles={"admin": QuotaLimits()},
    )
    quotas = Quotas(settings)
    quotas.admit(ALICE, lambda: 0)
    err = refused(quotas, ALICE, active=1)
    assert err.reason == "TOO_MANY_ACTIVE_TASKS" and err.retry_after
    quotas.admit(BOB, lambda: 4)
    assert refused(quotas, BOB, active=5).reason == "TOO_MANY_ACTIVE_TASKS"
    quotas.admit(OPS, lambda: 1000)  # the admin role has no limits


def test_no_limits_by_default_and_buckets_are_bounded() -> None:
    quotas = Quotas(QuotaSettings())
    for i in range(100):
        quotas.admit(ALICE, lambda i=i: i)
    bounded = Quotas(QuotaSettings(submit_rate=1, max_tracked=2))
    for name in ("a", "b", "c"):
        bounded.admit(f"spiffe://hivewire.local/client/{name}", lambda: 0, now=0.0)
    assert len(bounded._buckets) == 2
