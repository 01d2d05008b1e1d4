"""NATS behind mutual TLS with a permission set per mesh identity.

The mesh's nats-server accepts only TLS connections whose client certificate chains to
the mesh CA (``verify_and_map``), and maps each certificate's SPIFFE URI SAN to a user
with its own publish and subscribe permissions:

=================  ==============================================================
role               may publish (besides JetStream reads and ``_INBOX.>`` replies)
=================  ==============================================================
``coordinator``    ``hivewire.events.{task,workflow,project}.>``; registry keys
                   ``hivewire-coordinator.*``; its JetStream task store when used;
                   requests to other coordinators ``hivewire.coordinator.>`` (which
                   it also subscribes to)
``agent``          ``hivewire.events.agent.>``; registry keys ``hivewire-agent.*``
``model``          ``hivewire.events.model.>``; registry keys ``hivewire-model.*``
``tool``           ``hivewire.events.tool.>``; registry keys ``hivewire-tool.*``
``client``         nothing: reads events and the registry (an event reader)
``admin``          everything
any other role     nothing at all (connects, then every publish and subscribe is denied)
=================  ==============================================================

So nobody but the coordinator can publish task events, and a service can write only its
own kind of registry entries: an agent certificate cannot register a fake tool service or
coordinator. Certificates of other CAs, no certificate, and SPIFFE ids the server does not
list are refused at connect.

nats-server matches users by exact string, so the user list is made from the certificates
in the certs directory when the server starts (:func:`mesh_identities`); an identity
issued later needs the config written again and the server reloaded (``hivewire up``
does it at each start). Which subjects the JetStream API needs per operation comes from
the nats-py client's requests (see docs/security.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivewire.services.runtime.pki import describe_cert, list_stems, parse_spiffe_id
from hivewire.services.runtime.tls import TlsFiles

REGISTRY_BUCKET = "hivewire-registry"
EVENTS_STREAM = "HIVEWIRE_EVENTS"
DLQ_STREAM = "HIVEWIRE_DLQ"
EVENTS_PREFIX = "hivewire.events"

COORDINATOR_REQUESTS = "hivewire.coordinator"
"""Subjects coordinators answer each other's requests on (coordinator/cluster.py)."""

NATS_SERVER_STEM = "nats"
"""Certificate stem of the NATS server's own identity (``spiffe://…/nats/nats``)."""

# role -> (registry service name, event category) of the mesh services.
_SERVICES = {
    "coordinator": ("hivewire-coordinator", "task"),
    "agent": ("hivewire-agent", "agent"),
    "model": ("hivewire-model", "model"),
    "tool": ("hivewire-tool", "tool"),
}


@dataclass(frozen=True)
class NatsNames:
    """The bucket and streams the permissions name."""

    bucket: str = REGISTRY_BUCKET
    events_stream: str = EVENTS_STREAM
    dlq_stream: str = DLQ_STREAM
    # The coordinator's JetStream task store (services/coordinator/jetstream_store.py).
    store_buckets: tuple[str, ...] = (
        "HIVEWIRE_TASKS",
        "HIVEWIRE_IDEMPOTENCY",
        "HIVEWIRE_PROJECTS",
        "HIVEWIRE_PURGED",
        "HIVEWIRE_ACTIVE",
        "HIVEWIRE_COORDINATORS",
        "HIVEWIRE_OUTBOX",  # how far the event outbox's relay published (outbox.py)
    )
    journal_stream: str = "HIVEWIRE_JOURNAL"


def _stream_reads(stream: str) -> list[str]:
    """Publish subjects a client needs to read a stream (info, get, consumers, acks)."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def _stream_setup(stream: str) -> list[str]:
    return [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"]


def _coordinator_extras(names: NatsNames) -> list[str]:
    """What only coordinators publish besides task events: plans' and projects' events,
    and the JetStream task store (its KV buckets and journal stream, when used)."""
    extras = [
        f"{EVENTS_PREFIX}.workflow.>",
        f"{EVENTS_PREFIX}.project.>",
        "hivewire.journal.>",
        # Requests between coordinators (cancel/input/sub-task forwarded to the owner).
        f"{COORDINATOR_REQUESTS}.>",
    ]
    for bucket in names.store_buckets:
        extras += [
            *_stream_reads(f"KV_{bucket}"),
            *_stream_setup(f"KV_{bucket}"),
            f"$KV.{bucket}.>",
        ]
        extras.append(f"$JS.API.STREAM.PURGE.KV_{bucket}")
    extras += [
        *_stream_reads(names.journal_stream),
        *_stream_setup(names.journal_stream),
        f"$JS.API.STREAM.PURGE.{names.journal_stream}",
    ]
    return extras


def permissions_for(spiffe_id: str, names: NatsNames = NatsNames()) -> dict[str, Any] | None:
    """The NATS permissions of one mesh identity.

    Args:
        spiffe_id: ``spiffe://hivewire.local/<role>/<name>``.
        names: The registry bucket and event streams.

    Returns:
        A ``permissions`` map, or None for admins (no restriction).
    """
    parsed = parse_spiffe_id(spiffe_id)
    role = parsed[0] if parsed else ""
    if role == "admin":
        return None
    kv = f"KV_{names.bucket}"
    reads = [
        "$JS.API.INFO",
        "$JS.FC.>",
        *_stream_reads(kv),
        *_stream_reads(names.events_stream),
        *_stream_reads(names.dlq_stream),
    ]
    if role in _SERVICES:
        service, category = _SERVICES[role]
        publish = [
            *reads,
            *_stream_setup(kv),
            *_stream_setup(names.events_stream),
            *_stream_setup(names.dlq_stream),
            f"$KV.{names.bucket}.{service}.*",
            f"{EVENTS_PREFIX}.{category}.>",
            # Every service reports the calls it refused (runtime/security.py).
            f"{EVENTS_PREFIX}.security.>",
        ]
        if role == "coordinator":
            publish += _coordinator_extras(names)
    elif role == "client":
        publish = reads
    else:
        return {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}
    permissions: dict[str, Any] = {
        "publish": {"allow": publish},
        "subscribe": {"allow": ["_INBOX.>"]},
    }
    if role == "coordinator":
        # Coordinators answer each other's requests (coordinator/cluster.py): one reply
        # to the inbox of each request received.
        permissions["subscribe"]["allow"].append(f"{COORDINATOR_REQUESTS}.>")
        permissions["allow_responses"] = True
    return permissions


def mesh_identities(certs_dir: Path) -> list[str]:
    """The SPIFFE ids of every certificate in the certs directory (the CA's excepted)."""
    found = []
    for stem in list_stems(certs_dir):
        info = describe_cert(certs_dir / f"{stem}.pem")
        if info.spiffe_id and info.spiffe_id not in found:
            found.append(info.spiffe_id)
    return found


def render_security(
    server: TlsFiles, identities: Iterable[str], names: NatsNames = NatsNames()
) -> str:
    """The ``tls`` and ``authorization`` blocks of nats-server's configuration.

    Args:
        server: The CA bundle clients must chain to, and the server's certificate.
        identities: SPIFFE ids that may connect.
        names: The registry bucket and event streams.

    Returns:
        Configuration text (NATS config accepts JSON values).
    """
    tls = {
        "cert_file": str(server.cert.resolve()),
        "key_file": str(server.key.resolve()),
        "ca_file": str(server.ca.resolve()),
        "verify_and_map": True,
        "timeout": 2,
    }
    return f"tls: {json.dumps(tls, indent=2)}\n" + render_authorization(identities, names)


def render_authorization(identities: Iterable[str], names: NatsNames = NatsNames()) -> str:
    """The ``authorization`` block alone: one user per SPIFFE id, with its permissions.

    ``hivewire certs nats-auth`` prints it for servers whose ``tls`` block is written
    elsewhere (the deploy/ files include it).
    """
    users = []
    for spiffe_id in identities:
        user: dict[str, Any] = {"user": spiffe_id}
        permissions = permissions_for(spiffe_id, names)
        if permissions is not None:
            user["permissions"] = permissions
        users.append(user)
    return f"authorization: {json.dumps({'users': users}, indent=2)}\n"
