"""Prometheus endpoints: loopback by default, and HTTPS for mesh clients only when asked."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.metrics import start_metrics_server
from tests.conftest import Pki
from tests.helpers import ServiceProcess

QUIET = {"HIVEWIRE_DISCOVERY": "static", "HIVEWIRE_EVENTS__ENABLED": "false"}


def test_metrics_bind_loopback_even_when_grpc_binds_every_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HIVEWIRE_HOST", "0.0.0.0")
    settings = load_settings()
    assert settings.host == "0.0.0.0" and settings.metrics_host == "127.0.0.1"
    server = start_metrics_server(settings.metrics_host, 0)
    try:
        assert server.host == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).status_code == 200
    finally:
        server.close()


def client(pki: Pki, stem: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    if stem is not None:
        files = pki.files(stem)
        context.load_cert_chain(str(files.cert), str(files.key))
    return context


async def test_a_service_serves_metrics_over_https_to_mesh_clients_only(
    pki: Pki, foreign_pki: Pki, tmp_path: Path
) -> None:
    env = {**QUIET, "HIVEWIRE_METRICS_TLS": "true", "HIVEWIRE_TOOL__PLUGINS": ""}
    process = ServiceProcess(
        "hivewire.services.tool", workdir=tmp_path, certs_dir=pki.dir, identity="tool", env=env
    )
    async with process:
        url = f"https://127.0.0.1:{process.metrics_port}/metrics"
        async with httpx.AsyncClient(verify=client(pki, "admin"), timeout=5) as http:
            response = await http.get(url)
        assert response.status_code == 200 and "grpc_server_started_total" in response.text
        for refused in (client(pki, None), client(foreign_pki, "admin")):
            async with httpx.AsyncClient(verify=refused, timeout=5) as http:
                with pytest.raises((httpx.TransportError, ssl.SSLError)):
                    await http.get(url)
        async with httpx.AsyncClient(timeout=5) as http:
            with pytest.raises((httpx.TransportError, ssl.SSLError)):
                await http.get(f"http://127.0.0.1:{process.metrics_port}/metrics")
