"""NATS behind mutual TLS with a permission set per mesh identity.

The mesh's nats-server accepts only TLS connections whose client certificate chains to
the mesh CA (``verify_and_map``), and maps each certificate's SPIFFE URI SAN to a user
with its own publish and subscribe permissions:

=================  ==============================================================
role               may publish (besides JetStream reads)
=================  ==============================================================
``coordinator``    ``hivewire.events.{task,workflow,project}.>`` and
                   ``hivewire.events.agent.health_changed``; its registry keys
                   ``hivewire-coordinator.<name>.>``; its JetStream task store when
                   used; requests to other coordinators ``hivewire.coordinator.>``
                   (which it also subscribes to)
``agent``          ``hivewire.events.agent.>``; registry keys ``hivewire-agent.<name>.>``
``model``          ``hivewire.events.model.>``; registry keys ``hivewire-model.<name>.>``
``tool``           ``hivewire.events.tool.>``; registry keys ``hivewire-tool.<name>.>``;
                   the used-approvals bucket ``HIVEWIRE_GRANTS``
``client``         nothing: reads events and the registry (an event reader)
``nats``           ``hivewire.events.security.>`` (the NATS guard reports refusals)
``admin``          everything
any other role     nothing at all (connects, then every publish and subscribe is denied)
=================  ==============================================================

``<name>`` is the name of the identity (``spiffe://hivewire.local/agent/<name>``): the
registry writes its entries under it (discovery/embedded.py), so an agent cannot
overwrite or delete another agent's entry, nor register a fake tool service or
coordinator. Each identity subscribes only below its own reply prefix
``_INBOX.<role>.<name>`` (``nats_inbox_prefix``), so nobody reads another's replies.
Certificates of other CAs, no certificate, and SPIFFE ids the server does not list are
refused at connect.

nats-server matches users by exact string, so the user list is made from the certificates
in the certs directory when the server starts (:func:`mesh_identities`); an identity
issued later needs the config written again and the server reloaded (``hivewire up``
does it at each start). Which subjects the JetStream API needs per operation comes from
the nats-py client's requests (see docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hivewire.services.mesh.pki import list_stems
from hivewire.services.runtime.grants import GRANTS_BUCKET
from hivewire.services.runtime.revocation import RevocationList
from hivewire.services.runtime.tls import (
    TlsFiles,
    describe_cert,
    nats_inbox_prefix,
    parse_spiffe_id,
)

REGISTRY_BUCKET = "hivewire-registry"
EVENTS_STREAM = "HIVEWIRE_EVENTS"
DLQ_STREAM = "HIVEWIRE_DLQ"
EVENTS_PREFIX = "hivewire.events"

SECURITY_FILE = "nats-security.conf"
"""The file beside nats-server's configuration holding this module's blocks (it is
included, so the NATS guard can rewrite it alone and reload the server)."""

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
    # The tool services' used approvals (runtime/grants.py).
    grants_bucket: str = GRANTS_BUCKET


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
    agents' health changes, and the JetStream task store (its KV buckets and journal
    stream, when used).
    """
    extras = [
        f"{EVENTS_PREFIX}.workflow.>",
        f"{EVENTS_PREFIX}.project.>",
        # Its dispatcher reports agents leaving and circuits opening (dispatch.py).
        f"{EVENTS_PREFIX}.agent.health_changed",
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
    role, name = parsed if parsed else ("", "")
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
            # Its own entries only: the registry writes <service>.<name>.<instance>.
            f"$KV.{names.bucket}.{service}.{name}.>",
            f"{EVENTS_PREFIX}.{category}.>",
            # Every service reports the calls it refused (runtime/security.py).
            f"{EVENTS_PREFIX}.security.>",
        ]
        if role == "coordinator":
            publish += _coordinator_extras(names)
        if role == "tool":
            # Used approvals, shared by every tool service (runtime/grants.py).
            grants = f"KV_{names.grants_bucket}"
            publish += [*_stream_reads(grants), *_stream_setup(grants)]
            publish.append(f"$KV.{names.grants_bucket}.>")
    elif role == "nats":
        # The NATS guard (services/mesh/nats_guard.py) reports nats-server's refusals.
        publish = [
            *reads,
            *_stream_setup(names.events_stream),
            *_stream_setup(names.dlq_stream),
            f"{EVENTS_PREFIX}.security.>",
        ]
    elif role == "client":
        publish = reads
    else:
        return {"publish": {"deny": [">"]}, "subscribe": {"deny": [">"]}}
    # Replies (JetStream API answers, KV watches) reach it under its own inbox prefix.
    permissions: dict[str, Any] = {
        "publish": {"allow": publish},
        "subscribe": {"allow": [f"{nats_inbox_prefix(spiffe_id)}.>"]},
    }
    if role == "coordinator":
        # Coordinators answer each other's requests (coordinator/cluster.py): one reply
        # to the inbox of each request received.
        permissions["subscribe"]["allow"].append(f"{COORDINATOR_REQUESTS}.>")
        permissions["allow_responses"] = True
    return permissions


@dataclass(frozen=True)
class MeshCert:
    """One certificate nats-server admits: who it is and its public-key pin."""

    spiffe_id: str
    pin: str
    """Hex SHA-256 of the DER public key (nats-server's ``pinned_certs`` form)."""


def mesh_certs(certs_dir: Path, revoked_file: Path | None = None) -> list[MeshCert]:
    """The certificates of the certs directory that are not revoked (the CA's excepted).

    A certificate whose serial or SPIFFE id the deny list names (runtime/revocation.py,
    the file ``hivewire certs revoke`` writes) is left out, so nats-server refuses it
    in the handshake once it reloads this configuration.
    """
    revoked = RevocationList(revoked_file) if revoked_file is not None else None
    found = []
    for stem in list_stems(certs_dir):
        pem = (certs_dir / f"{stem}.pem").read_bytes()
        info = describe_cert(certs_dir / f"{stem}.pem")
        if not info.spiffe_id or info.is_ca:
            continue
        if revoked is not None and revoked.revoked(info.spiffe_id, partial(bytes, pem)):
            continue
        key = x509.load_pem_x509_certificate(pem).public_key()
        der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        found.append(MeshCert(info.spiffe_id, hashlib.sha256(der).hexdigest()))
    return found


def mesh_identities(certs_dir: Path, revoked_file: Path | None = None) -> list[str]:
    """The SPIFFE ids of the certificates nats-server admits, each once."""
    return list(dict.fromkeys(c.spiffe_id for c in mesh_certs(certs_dir, revoked_file)))


def render_mesh_security(
    certs_dir: Path, *, revoked_file: Path | None = None, names: NatsNames = NatsNames()
) -> str:
    """nats-server's security configuration for the mesh of one certs directory.

    Every certificate of the directory that is not revoked may connect (its public key
    is pinned), as its identity with that identity's permissions.

    Args:
        certs_dir: The mesh PKI (``ca.pem``, ``nats.pem``/``.key``, every identity).
        revoked_file: The deny list (``certs/revoked.txt``), if any.
        names: The registry bucket and event streams.
    """
    server = TlsFiles.for_identity(certs_dir, NATS_SERVER_STEM)
    certs = mesh_certs(certs_dir, revoked_file)
    return render_security(server, [c.spiffe_id for c in certs], names, pins=[c.pin for c in certs])


def render_security(
    server: TlsFiles,
    identities: Iterable[str],
    names: NatsNames = NatsNames(),
    *,
    pins: Iterable[str] | None = None,
) -> str:
    """The ``tls`` and ``authorization`` blocks of nats-server's configuration.

    Args:
        server: The CA bundle clients must chain to, and the server's certificate.
        identities: SPIFFE ids that may connect.
        names: The registry bucket and event streams.
        pins: Public-key pins of the only certificates admitted (None: any of the CA).

    Returns:
        Configuration text (NATS config accepts JSON values).
    """
    tls: dict[str, Any] = {
        "cert_file": str(server.cert.resolve()),
        "key_file": str(server.key.resolve()),
        "ca_file": str(server.ca.resolve()),
        "verify_and_map": True,
        "timeout": 2,
    }
    if pins is not None:
        # An empty list would turn pinning off: with nothing admitted, pin what no key is.
        tls["pinned_certs"] = sorted(set(pins)) or ["0" * 64]
    return f"tls: {json.dumps(tls, indent=2)}\n" + render_authorization(identities, names)


def render_authorization(identities: Iterable[str], names: NatsNames = NatsNames()) -> str:
    """The ``authorization`` block alone: one user per SPIFFE id, with its permissions.

    ``hivewire certs nats-auth`` prints it for servers whose ``tls`` block is written
    elsewhere (the deploy/ files include it).
    """
    users = []
    for spiffe_id in dict.fromkeys(identities):
        user: dict[str, Any] = {"user": spiffe_id}
        permissions = permissions_for(spiffe_id, names)
        if permissions is not None:
            user["permissions"] = permissions
        users.append(user)
    return f"authorization: {json.dumps({'users': users}, indent=2)}\n"
