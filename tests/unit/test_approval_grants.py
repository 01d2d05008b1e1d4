"""Signed tool approvals: what the coordinator signs and every way the tool service refuses one."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.services.coordinator.approvals import endorse
from hivewire.services.runtime.errors import PermissionDenied, Unavailable
from hivewire.services.runtime.grants import ApprovalSigner, ApprovalVerifier, NatsGrantLedger
from tests.conftest import Pki
from tests.helpers import NatsServer, reserved_port

CLIENT = "spiffe://hivewire.local/client/client"
CALL = {
    "task_id": "task-1",
    "tool_name": "delete_file",
    "arguments_digest": "ab" * 32,
    "request_id": "task-1-1-input-1",
}


def sign(pki: Pki, stem: str = "coordinator", **changes: object) -> common_pb2.SignedApproval:
    fields: dict[str, object] = {**CALL, "approved_by": CLIENT, **changes}
    return ApprovalSigner(pki.files(stem)).sign(**fields)  # type: ignore[arg-type]


def refused(
    verifier: ApprovalVerifier, signed: common_pb2.SignedApproval | None, **call: object
) -> str:
    with pytest.raises(PermissionDenied) as err:
        verifier.verify(signed, **{**CALL, **call})  # type: ignore[arg-type]
    return err.value.reason


@pytest.fixture
def verifier(pki: Pki) -> ApprovalVerifier:
    return ApprovalVerifier(pki.files("coordinator").ca)


def test_a_coordinator_grant_is_accepted_once(pki: Pki, verifier: ApprovalVerifier) -> None:
    signed = sign(pki)
    claims = verifier.verify(signed, **CALL)  # type: ignore[arg-type]
    assert claims.approved_by == CLIENT and claims.task_id == "task-1"
    assert refused(verifier, signed) == "APPROVAL_REPLAYED"


def test_no_grant_is_unsigned(verifier: ApprovalVerifier) -> None:
    assert refused(verifier, None) == "APPROVAL_UNSIGNED"
    assert refused(verifier, common_pb2.SignedApproval()) == "APPROVAL_UNSIGNED"


def test_altered_claims_break_the_signature(pki: Pki, verifier: ApprovalVerifier) -> None:
    signed = sign(pki, task_id="other-task")
    claims = common_pb2.ApprovalClaims.FromString(signed.claims)
    claims.task_id = "task-1"
    signed.claims = claims.SerializeToString()
    assert refused(verifier, signed) == "APPROVAL_SIGNATURE_INVALID"
    garbage = sign(pki)
    garbage.signature = b"\x00" * 8
    assert refused(verifier, garbage) == "APPROVAL_SIGNATURE_INVALID"


def test_an_agent_cannot_sign_for_the_coordinator(pki: Pki, verifier: ApprovalVerifier) -> None:
    # Signed with the agent's own key and certificate: a mesh identity, but no issuer.
    assert refused(verifier, sign(pki, "agent")) == "APPROVAL_UNTRUSTED"
    # The coordinator's certificate with the agent's signature over forged claims.
    forged = sign(pki, "agent")
    forged.certificate = sign(pki).certificate
    assert refused(verifier, forged) == "APPROVAL_SIGNATURE_INVALID"


def test_a_foreign_coordinator_is_untrusted(foreign_pki: Pki, verifier: ApprovalVerifier) -> None:
    assert refused(verifier, sign(foreign_pki)) == "APPROVAL_UNTRUSTED"


def test_an_expired_coordinator_certificate_is_untrusted(
    pki: Pki, verifier: ApprovalVerifier
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    files = pki.issue(
        role="coordinator",
        name="retired",
        stem="coordinator-retired",
        not_before=past,
        not_after=past + dt.timedelta(days=1),
    )
    signed = ApprovalSigner(files).sign(**CALL, approved_by=CLIENT)
    assert refused(verifier, signed) == "APPROVAL_UNTRUSTED"


def test_a_grant_binds_task_tool_arguments_request_and_time(
    pki: Pki, verifier: ApprovalVerifier
) -> None:
    assert refused(verifier, sign(pki), task_id="task-2") == "APPROVAL_TASK_MISMATCH"
    assert refused(verifier, sign(pki), tool_name="shell") == "APPROVAL_TOOL_MISMATCH"
    assert refused(verifier, sign(pki), arguments_digest="cd" * 32) == "APPROVAL_DIGEST_MISMATCH"
    assert refused(verifier, sign(pki), request_id="other") == "APPROVAL_REQUEST_MISMATCH"
    old = ApprovalSigner(pki.files("coordinator"), ttl=60).sign(
        **CALL, approved_by=CLIENT, now=time.time() - 61
    )
    assert refused(verifier, old) == "APPROVAL_EXPIRED"


def test_the_coordinator_signs_only_a_yes_to_a_tool_approval(pki: Pki) -> None:
    signer = ApprovalSigner(pki.files("coordinator"))
    asked = common_pb2.InputRequest(
        request_id=CALL["request_id"],
        kind=common_pb2.INPUT_KIND_APPROVAL,
        tool_name=CALL["tool_name"],
        arguments_digest=CALL["arguments_digest"],
    )
    # A client-supplied grant (here: one signed by an agent) never passes through.
    smuggled = common_pb2.InputResponse(request_id=asked.request_id, approved=True)
    smuggled.signed_approval.CopyFrom(sign(pki, "agent"))
    yes = endorse(signer, "task-1", asked, smuggled, CLIENT)
    claims = ApprovalVerifier(pki.files("tool").ca).verify(yes.signed_approval, **CALL)  # type: ignore[arg-type]
    assert claims.approved_by == CLIENT
    no = endorse(signer, "task-1", asked, common_pb2.InputResponse(request_id="r"), CLIENT)
    assert not no.HasField("signed_approval")
    text = common_pb2.InputRequest(request_id="r", kind=common_pb2.INPUT_KIND_TEXT)
    answer = common_pb2.InputResponse(request_id="r", approved=True)
    answer.signed_approval.CopyFrom(sign(pki, "agent"))
    assert not endorse(signer, "task-1", text, answer, CLIENT).HasField("signed_approval")


# -- the mesh-wide ledger of used grants (a real nats-server) ----------------------------


async def test_the_ledger_uses_a_grant_once_for_every_verifier(
    pki: Pki, nats_server: NatsServer
) -> None:
    first, second = (NatsGrantLedger(nats_server.url, horizon=3600) for _ in range(2))
    try:
        ca = pki.files("coordinator").ca
        replicas = [ApprovalVerifier(ca, ledger=first), ApprovalVerifier(ca, ledger=second)]
        signed = sign(pki)
        claims = await replicas[0].verify_once(signed, **CALL)  # type: ignore[arg-type]
        assert claims.approved_by == CLIENT
        for replica in replicas:
            with pytest.raises(PermissionDenied) as err:
                await replica.verify_once(signed, **CALL)  # type: ignore[arg-type]
            assert err.value.reason == "APPROVAL_REPLAYED"
        # A grant valid longer than used grants are remembered could be replayed later.
        lasting = ApprovalSigner(pki.files("coordinator"), ttl=7200).sign(
            **CALL, approved_by=CLIENT
        )
        with pytest.raises(PermissionDenied) as err:
            await replicas[1].verify_once(lasting, **CALL)  # type: ignore[arg-type]
        assert err.value.reason == "APPROVAL_OUTLIVES_LEDGER"
    finally:
        await first.close()
        await second.close()


async def test_an_unreachable_ledger_is_unavailable_and_uses_nothing(
    pki: Pki, nats_server: NatsServer
) -> None:
    down = NatsGrantLedger(f"nats://127.0.0.1:{reserved_port()}", timeout=1)
    verifier = ApprovalVerifier(pki.files("coordinator").ca, ledger=down)
    signed = sign(pki)
    with pytest.raises(Unavailable) as err:
        await verifier.verify_once(signed, **CALL)  # type: ignore[arg-type]
    assert err.value.reason == "APPROVAL_LEDGER_UNAVAILABLE"
    # The grant was not used up: it still works once the ledger is reachable.
    up = NatsGrantLedger(nats_server.url)
    try:
        verifier.ledger = up
        assert (await verifier.verify_once(signed, **CALL)).task_id == "task-1"  # type: ignore[arg-type]
    finally:
        await up.close()
        await down.close()
