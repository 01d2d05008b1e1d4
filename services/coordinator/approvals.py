"""The coordinator's side of tool approvals: sign the grant when a person says yes.

When an agent's tool call needs approval, the agent asks for input (``INPUT_KIND_APPROVAL``
with the tool name and argument digest). The answer reaches the coordinator from a
client that may answer (``provide_input`` already checked it is the task's owner or an
admin, and that the answer quotes the pending request). Here, and only here, a "yes"
becomes a :class:`~hivewire.common.v1.common_pb2.SignedApproval` bound to the task, the
tool, the digest and the request, with the answering client as approver; it travels to
the agent inside the forwarded ``InputResponse``. Whatever grant a client put in its
answer is dropped: clients do not sign grants either.
"""

from __future__ import annotations

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime.grants import ApprovalSigner


def endorse(
    signer: ApprovalSigner | None,
    task_id: str,
    pending: common_pb2.InputRequest,
    response: common_pb2.InputResponse,
    approver: str,
) -> common_pb2.InputResponse:
    """The answer to forward to the agent: a yes to a tool approval carries a grant.

    Args:
        signer: The coordinator's signer (None: no grant is issued, so the tool
            service will refuse the call).
        task_id: The task.
        pending: The input request being answered.
        response: The client's answer (already checked against ``pending``).
        approver: The answering client's identity.

    Returns:
        A copy of ``response`` without any client-supplied grant, plus the coordinator's
        grant when the request is a tool approval and the answer approves it.
    """
    answer = common_pb2.InputResponse()
    answer.CopyFrom(response)
    answer.ClearField("signed_approval")
    if (
        signer is not None
        and pending.kind == common_pb2.INPUT_KIND_APPROVAL
        and pending.tool_name
        and answer.approved
    ):
        answer.signed_approval.CopyFrom(
            signer.sign(
                task_id=task_id,
                tool_name=pending.tool_name,
                arguments_digest=pending.arguments_digest,
                request_id=pending.request_id,
                approved_by=approver,
            )
        )
    return answer
