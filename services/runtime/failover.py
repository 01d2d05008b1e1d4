"""Clients of several coordinators: an address list, or the registry, and failover.

A client is given coordinators as ``host:port[,host:port...]`` (the ``hivewire``
CLI's ``--address``, ``HIVEWIRE_COORDINATOR__ADDRESS``), or the word ``discovery``:
then the healthy ``hivewire-coordinator`` instances of the registry named by
``HIVEWIRE_DISCOVERY`` are the list. :func:`connect_first` opens a channel to the
first coordinator that completes a connection (TCP and the mutual-TLS handshake), in
order; an address that refuses or fails is skipped at once, one that stays silent
after ``connect_timeout``. With one address nothing is probed: the call itself
reports what went wrong, exactly as before there were lists. :func:`reconnect` waits
for any of them to come back (a stream whose coordinator went away resumes there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from hivewire.services.runtime.backoff import Backoff
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.tls import TlsFiles

__all__ = [
    "COORDINATOR_SERVICE",
    "DISCOVERY",
    "Connected",
    "connect_first",
    "parse_addresses",
    "reconnect",
]

logger = logging.getLogger(__name__)

DISCOVERY = "discovery"
"""The address that means "ask the registry for the coordinators"."""
COORDINATOR_SERVICE = "hivewire-coordinator"
"""The registry name coordinators register under."""
DEFAULT_CONNECT_TIMEOUT = 5.0


def parse_addresses(text: str | Sequence[str]) -> list[str]:
    """Split ``"a:1, b:2"`` (or several such strings) into ``["a:1", "b:2"]``, in order.

    Raises:
        ValueError: No address, or one without a port.
    """
    parts = [text] if isinstance(text, str) else list(text)
    found: list[str] = []
    for part in parts:
        for item in part.split(","):
            address = item.strip()
            if not address:
                continue
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{address!r} is not host:port")
            if address not in found:
                found.append(address)
    if not found:
        raise ValueError("no coordinator address given")
    return found


@dataclass
class Connected:
    """The channel to the coordinator that answered, and what was skipped on the way.

    Attributes:
        address: The coordinator the channel is connected to.
        channel: The open channel (the caller closes it).
        skipped: Addresses that did not connect, in the order tried.
    """

    address: str
    channel: grpc.aio.Channel
    skipped: list[str]


async def _connects(channel: grpc.aio.Channel) -> bool:
    """Whether ``channel`` reaches READY before it fails (the caller bounds the wait)."""
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state in (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        ):
            return False
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)
    return True


async def connect_first(
    addresses: Sequence[str],
    files: TlsFiles,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    default_timeout: float | None = 30.0,
) -> Connected:
    """Open an mTLS channel to the first of ``addresses`` that connects.

    Args:
        addresses: Coordinators in the order to try them.
        files: The client identity.
        connect_timeout: Seconds one address gets to complete its handshake.
        default_timeout: Deadline of unary calls that set none.

    Returns:
        The connected channel. When none connects, a channel to the first address:
        the first call on it fails with the transport's own reason.
    """
    if not addresses:
        raise ValueError("no coordinator address given")
    if len(addresses) == 1:
        channel = secure_channel(addresses[0], files, default_timeout=default_timeout)
        return Connected(addresses[0], channel, [])
    found = await _first_ready(addresses, files, connect_timeout, default_timeout)
    if found is not None:
        return found
    logger.info("no coordinator of %s connected", ", ".join(addresses))
    channel = secure_channel(addresses[0], files, default_timeout=default_timeout)
    return Connected(addresses[0], channel, list(addresses))


async def reconnect(
    addresses: Sequence[str],
    files: TlsFiles,
    *,
    within: float,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    default_timeout: float | None = 30.0,
) -> Connected:
    """Wait for any of ``addresses`` to connect again, trying the list over and over.

    For a client whose coordinator went away mid-stream: another one of the list, or the
    same one once it is back (``hivewire up`` restarts it), takes over.

    Raises:
        TimeoutError: None connected within ``within`` seconds.
    """
    deadline = time.monotonic() + within
    pause = Backoff(initial=0.2, maximum=2.0)
    while True:
        found = await _first_ready(addresses, files, connect_timeout, default_timeout)
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no coordinator of {', '.join(addresses)} came back in {within}s")
        await asyncio.sleep(min(pause.next_delay(), max(0.0, deadline - time.monotonic())))


async def _first_ready(
    addresses: Sequence[str],
    files: TlsFiles,
    connect_timeout: float,
    default_timeout: float | None,
) -> Connected | None:
    """A channel to the first address that connects, or None."""
    skipped: list[str] = []
    for address in addresses:
        channel = secure_channel(address, files, default_timeout=default_timeout)
        try:
            async with asyncio.timeout(connect_timeout):
                ready = await _connects(channel)
        except TimeoutError:
            ready = False
        if ready:
            if skipped:
                logger.info("coordinators %s unreachable; using %s", ", ".join(skipped), address)
            return Connected(address, channel, skipped)
        skipped.append(address)
        with contextlib.suppress(Exception):
            await channel.close()
    return None
