"""Settings of the coordinator: the ``coordinator`` section, and the
coordinator process's settings (the shared ones plus that section).

Environment variables use the nested form ``HIVEWIRE_COORDINATOR__<FIELD>``, for
example ``HIVEWIRE_COORDINATOR__DB_PATH=/var/lib/hivewire/coordinator.db``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.sections import BreakerSection, Section

LINK_BUFFER_BYTES = 4 * 1024 * 1024
"""Default of ``link_buffer_bytes`` (also what a link opened without settings holds)."""


class QuotaLimits(Section):
    """Limits of one principal (0 = no limit)."""

    submit_rate: float = Field(0.0, ge=0, description="Submissions per second (0: no limit).")
    submit_burst: int = Field(0, ge=0, description="Bucket size (0: max(1, submit_rate)).")
    max_active: int = Field(0, ge=0, description="Tasks queued or running at once (0: no limit).")


class QuotaSettings(QuotaLimits):
    """The ``coordinator.quotas`` section: default limits plus overrides.

    ``principals`` is keyed by identity (``spiffe://hivewire.local/client/alice``),
    ``roles`` by role (``client``, ``admin``); a principal's own entry wins over its
    role's, which wins over the defaults.
    """

    principals: dict[str, QuotaLimits] = Field(default_factory=dict)
    roles: dict[str, QuotaLimits] = Field(default_factory=dict)
    max_tracked: int = Field(10_000, ge=1, description="Principals whose buckets are kept.")

    def limits_for(self, identity: str) -> QuotaLimits:
        """The limits that apply to one principal."""
        if identity in self.principals:
            return self.principals[identity]
        # spiffe://<trust domain>/<role>/<name>: the role is the fourth "/" field.
        parts = identity.split("/")
        role = parts[3] if len(parts) > 4 and identity.startswith("spiffe://") else ""
        return self.roles.get(role, self)


class WebhookSettings(BaseModel):
    """How the coordinator delivers webhooks (docs/coordinator.md, Webhooks)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    allow_private: bool = Field(
        False,
        description="Allow webhook hosts on private, loopback and link-local addresses.",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Hosts (names or IP addresses) allowed even when private, e.g. 127.0.0.1.",
    )
    max_attempts: int = Field(8, ge=1, le=100, description="Attempts before dead-lettering.")
    initial_backoff: float = Field(1.0, gt=0, description="Seconds before the first retry.")
    max_backoff: float = Field(300.0, gt=0, description="Longest wait between attempts.")
    timeout: float = Field(10.0, gt=0, description="Seconds one POST may take.")
    max_per_task: int = Field(4, ge=0, description="Most webhooks one task spec may carry.")


class CoordinatorSettings(BreakerSection):
    """Tuning of the coordinator (scheduling, retries, limits, storage).

    An agent's circuit (``breaker_*``, from :class:`BreakerSection`) is opened by
    consecutive transport failures.
    """

    db_path: Path = Field(
        Path(".hivewire/coordinator.db"),
        # ``database`` is accepted too (HIVEWIRE_COORDINATOR__DATABASE).
        validation_alias=AliasChoices("db_path", "database"),
        description="SQLite database of tasks and events; ':memory:' keeps nothing.",
    )
    address: str = Field(
        "127.0.0.1:50051", description="Where clients (the hivewire CLI) reach the coordinator."
    )
    store: Literal["sqlite", "jetstream"] = Field(
        "sqlite",
        description="Where tasks and journals live: the embedded SQLite file (db_path, one "
        "coordinator), or NATS JetStream at nats_url (any number of coordinators).",
    )
    jetstream_replicas: int = Field(
        1, ge=1, le=5, description="JetStream replicas of the store (3 in a cluster)."
    )
    jetstream_prefix: str = Field(
        "HIVEWIRE",
        pattern=r"^[A-Z][A-Z0-9_]{0,31}$",
        description="Name prefix of the store's KV buckets and journal stream.",
    )
    lease_ttl: float = Field(
        10.0,
        gt=0,
        description="JetStream store: seconds a coordinator's heartbeat may be missing before "
        "its peers take its tasks over.",
    )
    lease_heartbeat: float = Field(
        2.0,
        gt=0,
        description="JetStream store: seconds between two heartbeats of a coordinator "
        "(well below lease_ttl).",
    )
    forward_timeout: float = Field(
        5.0,
        gt=0,
        description="JetStream store: seconds a cancel, input or sub-task forwarded to the "
        "coordinator running the task may take.",
    )
    agent_service: str = Field("hivewire-agent", description="Registry name of agents.")
    default_timeout: float = Field(300.0, gt=0, description="Task timeout (s) when none is given.")
    max_timeout: float = Field(86400.0, gt=0, description="Longer task timeouts are lowered to it.")
    max_input_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest task input (serialized Payload), in bytes."
    )
    default_max_attempts: int = Field(3, ge=1, description="Attempts when a task sets none.")
    max_attempts_limit: int = Field(10, ge=1, description="Largest max_attempts a task may ask.")
    retry_initial_backoff: float = Field(
        0.5, ge=0, description="Upper bound (s) of the jittered wait before attempt 2."
    )
    retry_max_backoff: float = Field(30.0, ge=0, description="Cap (s) of the retry wait.")
    aging_interval: float = Field(
        10.0,
        gt=0,
        description="Seconds of waiting worth one priority level (prevents starvation).",
    )
    default_agent_concurrency: int = Field(
        4, ge=1, description="Concurrency of an agent that advertises none."
    )
    cancel_grace: float = Field(
        5.0, ge=0, description="Seconds an agent gets to acknowledge a cancel before the call ends."
    )
    describe_timeout: float = Field(3.0, gt=0, description="Deadline (s) of Describe calls.")
    agent_link: bool = Field(
        True,
        description="Carry attempts on one long-lived Link stream per agent instead of an "
        "Execute call each (agents without Link get Execute calls anyway).",
    )
    link_buffer_bytes: int = Field(
        LINK_BUFFER_BYTES,
        ge=1,
        description="Bytes of an agent's messages its Link holds for attempts that have not "
        "taken them yet; when they are used up the coordinator stops reading the Link until "
        "attempts take half of them, and HTTP/2 flow control holds the agent back.",
    )
    journal_backlog_bytes: int = Field(
        1024 * 1024,
        ge=1,
        description="Bytes of a task's events stored but not yet committed after which its "
        "attempt takes no more of the agent's messages until the store catches up.",
    )
    finished_cache_size: int = Field(
        2000, ge=0, description="Finished tasks kept in memory for fast watch and get."
    )
    write_batch_max: int = Field(
        1000, ge=1, description="Most writes committed in one SQLite transaction."
    )
    gc_pause_budget: float = Field(
        0.05,
        ge=0,
        description="Seconds a full garbage collection may stop the coordinator before what "
        "survived it is frozen out of the next ones (runtime/gcfreeze.py); 0 freezes after "
        "every full collection.",
    )
    gc_thaw_after: float = Field(
        300.0,
        gt=0,
        description="Seconds after a freeze from which the next full collection unfreezes "
        "everything first, so that no frozen reference cycle is held for longer.",
    )
    max_plan_steps: int = Field(64, ge=1, le=10000, description="Most steps a plan may have.")
    compensation_timeout: float = Field(
        300.0, gt=0, description="Seconds a plan step's compensation may take."
    )
    max_subtask_depth: int = Field(
        8,
        ge=1,
        description="How deep sub-tasks may nest (a task an agent submits while running another).",
    )
    quotas: QuotaSettings = Field(
        default_factory=QuotaSettings,
        description="Per-principal submission rate and active-task caps (quotas.py).",
    )
    approval_ttl: float = Field(
        300.0,
        gt=0,
        description="Seconds a signed tool approval stays valid after the person's yes.",
    )
    admin_prefix: str = Field(
        "spiffe://hivewire.local/admin/",
        description="Callers whose SPIFFE id starts with this see and cancel every task.",
    )
    idempotency_window: float = Field(
        86400.0,
        gt=0,
        description="Seconds an idempotency key answers with the task it created; later "
        "resubmissions are new tasks.",
    )
    task_retention: float = Field(
        7 * 86400.0,
        ge=0,
        description="Seconds a finished task and its events are kept before the purge "
        "deletes them (0 keeps them forever).",
    )
    tombstone_retention: float = Field(
        7 * 86400.0,
        ge=0,
        description="Seconds a purged task's id is remembered (GetTask answers TASK_PURGED).",
    )
    purge_interval: float = Field(
        60.0, gt=0, description="Seconds between two purges of finished tasks."
    )
    purge_batch: int = Field(
        500, ge=1, description="Tasks deleted per purge transaction (short, off the hot path)."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_database(cls, data: Any) -> Any:
        # db_path (a flag) wins over the alias from the environment, instead of both
        # being given and the alias refused as an unknown key.
        if isinstance(data, dict) and "db_path" in data and "database" in data:
            data = {k: v for k, v in data.items() if k != "database"}
        return data

    webhooks: WebhookSettings = Field(
        default_factory=WebhookSettings, description="Webhook delivery."
    )
    outbox_hold: Literal["", "publish", "mark"] = Field(
        "",
        description="TEST ONLY: pause the event outbox relay ('publish': send nothing; "
        "'mark': send but never record it sent), so a test can kill the coordinator "
        "between a commit and its publish. Leave empty.",
    )

    @model_validator(mode="after")
    def _check(self) -> CoordinatorSettings:
        if self.default_max_attempts > self.max_attempts_limit:
            raise ValueError("default_max_attempts exceeds max_attempts_limit")
        if self.default_timeout > self.max_timeout:
            raise ValueError("default_timeout exceeds max_timeout")
        if self.lease_heartbeat >= self.lease_ttl:
            raise ValueError("lease_heartbeat must be shorter than lease_ttl")
        return self


class CoordinatorProcessSettings(Settings):
    """The coordinator process's settings: the shared ones and the ``coordinator`` section.

    Also what clients of the coordinator read (the CLI, the dashboard): its address.
    """

    coordinator: CoordinatorSettings = Field(
        default_factory=CoordinatorSettings, description="Coordinator (docs/coordinator.md)."
    )
