"""The live web dashboard in a real headless Chromium, against real processes.

nats-server, the coordinator, the calculator agent and ``hivewire dashboard`` run as
processes; Debian's Chromium (``make chromium``) is driven by Playwright. A person with
the mesh's admin certificate opens the page, sees the agent, submits a task and
watches its timeline fill in, cancels a task that cannot run, and sees the events; a
person with a token logs in and is held to the mesh authorization policy. A
screenshot is saved to test-artifacts/dashboard.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.conftest import Pki
from tests.helpers import NatsServer
from tests.support.e2e_mesh import CALCULATOR, REPO_ROOT, agent_process, coordinator_process

pytestmark = pytest.mark.timeout(180)

HIVEWIRE = str(Path(sys.executable).with_name("hivewire"))
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ALICE = "spiffe://hivewire.local/client/alice"
TOKENS = {"alice-token-123": ALICE, "model-token-456": "spiffe://hivewire.local/model/m"}


@contextlib.asynccontextmanager
async def dashboard_process(
    pki: Pki, coordinator: str, nats_url: str, workdir: Path
) -> AsyncIterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    env.update(
        HIVEWIRE_CERTS_DIR=str(pki.dir),
        HIVEWIRE_NATS_URL=nats_url,
        HIVEWIRE_DASHBOARD__TOKENS=json.dumps(TOKENS),
    )
    log = (workdir / "dashboard.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE,
        "dashboard",
        "--port",
        "0",
        "--address",
        coordinator,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env=env,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("dashboard: https://localhost:"), line
        yield line.split(" ", 1)[1].strip()
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def open_page(browser: Browser, url: str, pki: Pki | None = None) -> Page:
    certificates = []
    if pki is not None:
        certificates = [
            {
                "origin": url.rstrip("/"),
                "certPath": str(pki.dir / "admin.pem"),
                "keyPath": str(pki.dir / "admin.key"),
            }
        ]
    context = await browser.new_context(ignore_https_errors=True, client_certificates=certificates)
    page = await context.new_page()
    await page.goto(url)
    return page


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; missing is a failure, never a skip."""
    assert CHROMIUM.exists(), "Chromium is missing: run `make chromium` (Debian's chromium)"
    return CHROMIUM


async def test_the_dashboard_in_a_real_browser(pki: Pki, tmp_path: Path, chromium: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
            )
        )
        await stack.enter_async_context(
            agent_process(
                tmp_path, CALCULATOR, name="calculator", certs_dir=pki.dir, nats_url=nats.url
            )
        )
        url = await stack.enter_async_context(
            dashboard_process(pki, coordinator.address, nats.url, tmp_path)
        )
        playwright = await stack.enter_async_context(async_playwright())
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=LAUNCH_ARGS)
        stack.push_async_callback(browser.close)

        # An operator, logged in by their client certificate: the page knows who this is.
        page = await open_page(browser, url, pki)
        await expect(page.locator("#me")).to_have_text(
            "spiffe://hivewire.local/admin/admin (admin)"
        )
        await expect(page.locator("#agents")).to_contain_text("calculate", timeout=30_000)

        # Submit, and watch the timeline fill in from WatchTask.
        await page.fill("#submit-capability", "calculate")
        await page.fill("#submit-text", "6 * 7")
        await page.click("#submit-button")
        await expect(page.locator("#submit-result")).to_contain_text("submitted ")
        await expect(page.locator("#timeline-state")).to_have_text("succeeded", timeout=30_000)
        timeline = page.locator("#timeline-events li")
        await expect(timeline.first).to_contain_text("#1 state_changed queued")
        await expect(page.locator("#timeline-events")).to_contain_text("progress")
        await expect(page.locator("#timeline-events li.event-finished")).to_have_count(1)
        await expect(page.locator("#timeline-output")).to_contain_text("42")
        await expect(page.locator("#tasks")).to_contain_text("succeeded")
        await expect(page.locator("#events")).to_contain_text("task.completed", timeout=30_000)

        # A task no agent can run stays queued; cancel it from its row.
        await page.fill("#submit-capability", "nobody-serves-this")
        await page.fill("#submit-text", "")
        await page.click("#submit-button")
        queued = page.locator("#tasks tr", has_text="nobody-serves-this")
        await expect(queued).to_contain_text("queued", timeout=30_000)
        await queued.locator("button.cancel").click()
        await expect(queued).to_contain_text("cancelled", timeout=30_000)
        await expect(page.locator("#tasks tr", has_text="cancelled")).to_have_count(1)

        # Filters go to the coordinator's ListTasks.
        await page.select_option("#filter-state", "cancelled")
        await expect(page.locator("#tasks tr")).to_have_count(1)
        await page.select_option("#filter-state", "")
        await expect(page.locator("#tasks tr")).to_have_count(2)

        shot = await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert len(shot) > 10_000

        # Without a certificate: a token logs in as its identity, who sees only their tasks.
        anonymous = await open_page(browser, url)
        await expect(anonymous.locator("#login")).to_be_visible()
        await anonymous.fill("#token", "wrong")
        await anonymous.click("#login-button")
        await expect(anonymous.locator("#login-error")).to_have_text("unknown token")
        await anonymous.fill("#token", "alice-token-123")
        await anonymous.click("#login-button")
        await expect(anonymous.locator("#me")).to_have_text(ALICE)
        await expect(anonymous.locator("#agents")).to_contain_text("calculate")
        await expect(anonymous.locator("#tasks tr")).to_have_count(0)

        # The mesh policy applies to the person: a model identity may not submit tasks.
        denied = await open_page(browser, url)
        await denied.fill("#token", "model-token-456")
        await denied.click("#login-button")
        await denied.fill("#submit-capability", "calculate")
        await denied.click("#submit-button")
        await expect(denied.locator("#submit-result")).to_contain_text("CALLER_NOT_ALLOWED")
