"""The live dashboard in a real browser during a real sale (issue 7): Debian's headless Chromium, driven by
Playwright, opens /dashboard on a real `stockhold serve` while the flash-100 scenario runs against it
(Locust, scaled down), and watches the figures and the chart move every second until the sale is over.

Screenshots are kept as test artefacts in reports/ (git-ignored): one mid-sale, one at the end.
`make test` installs Chromium first (`make chromium`, Debian's package); Playwright drives that binary and
downloads no browser of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest_asyncio
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from app.auth.scopes import Scope
from app.auth.store import KeyStore
from tests.processes import REPO, stockhold_serve

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # `make chromium` installs it
# As on this machine's probe: no component updates, sync or background requests to Google's hosts, which a
# closed network refuses at every start.
CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPORTS = REPO / "reports"
UNITS = 100


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # launch() adds --headless and --no-sandbox (we are root here) and a fresh, empty profile of its own
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=60_000)
        try:
            yield chromium
        finally:
            await chromium.close()


async def figure(page: Page, testid: str) -> str:
    return (await page.get_by_test_id(testid).inner_text()).strip()


async def number(page: Page, testid: str) -> int | None:
    text = await figure(page, testid)
    return int(text) if text.isdigit() else None


async def cards(page: Page) -> tuple[int | None, ...]:
    """available, held and sold as one rendering shows them: read in one go, never across two polls."""
    texts = await page.evaluate(
        "['available', 'held', 'sold'].map((f) => document.getElementById('c-' + f).textContent.trim())"
    )
    return tuple(int(t) if t.isdigit() else None for t in texts)


async def test_the_dashboard_follows_a_flash_sale_live_in_headless_chromium(
    server: str, service_env: dict[str, str], browser: Browser, tmp_path: Path
) -> None:
    REPORTS.mkdir(exist_ok=True)
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []  # a script the page's Content-Security-Policy blocked would show here
    page.on("console", lambda m: problems.append(m.text) if _is_error(m) else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(f"{server}/dashboard")
    await page.get_by_test_id("status").filter(has_text="live").wait_for(timeout=10_000)
    assert await figure(page, "tenant") == "default"

    folder = tmp_path / "run"
    args = [
        *("flash-100", "--url", server, "--database-url", service_env["DATABASE_URL"]),
        *("--redis-url", service_env["REDIS_URL"], "--users", "600", "--spawn-rate", "300", "--run-time", "60"),
        *("--confirm-all", "--results-dir", str(folder)),
    ]
    log = (tmp_path / "scenario.log").open("wb")
    sale = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtests", *args, cwd=REPO, env=service_env, stdout=log, stderr=log
    )
    try:
        # during the sale: the page shows the sale's SKU, and its figures change from one second to the next
        seen: list[tuple[int | None, ...]] = []
        mid_sale_shot = False
        deadline = time.monotonic() + 120
        while sale.returncode is None and time.monotonic() < deadline:
            row = await cards(page)
            if row[0] is not None and (not seen or row != seen[-1]):
                seen.append(row)
            points = int(await page.get_by_test_id("chart").get_attribute("data-points") or 0)
            if not mid_sale_shot and row[1] and points >= 3:
                assert await page.get_by_test_id("expiring-row").count() > 0  # holds with their deadlines
                await page.screenshot(path=REPORTS / "dashboard-during-sale.png", full_page=True)
                mid_sale_shot = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sale.wait(), 0.5)
        assert sale.returncode == 0, (tmp_path / "scenario.log").read_text()
    finally:
        if sale.returncode is None:
            sale.terminate()
            await sale.wait()
        log.close()

    outcomes = json.loads((folder / "outcomes.json").read_text())
    (sku,) = outcomes["skus"]
    assert mid_sale_shot, f"the page never showed a hold during the sale: {seen}"
    # live: the page showed the sale move through several states while it ran, and sold only ever grew
    assert len(seen) >= 3, seen
    sold_seen = [s for _, _, s in seen if s is not None]
    assert sold_seen == sorted(sold_seen), seen
    assert all(a is not None and h is not None and a + h + (s or 0) <= UNITS for a, h, s in seen), seen

    # after the sale: exactly the hundred units sold, nothing held, nothing left; as the API says
    await page.get_by_test_id("card-sold").filter(has_text=exactly(UNITS)).wait_for(timeout=15_000)
    await page.get_by_test_id("card-held").filter(has_text=exactly(0)).wait_for(timeout=15_000)
    async with httpx.AsyncClient(base_url=server, timeout=5) as http:
        state = (await http.get(f"/v1/skus/{sku}")).json()
    assert (state["sold"], state["held"], state["available"]) == (UNITS, 0, 0)
    assert await figure(page, "card-sku") == sku
    row = page.locator(f'[data-testid="sku-row"][data-sku="{sku}"]')
    fields = ("on_hand", "held", "sold", "available")
    cells = {f: (await row.locator(f'[data-field="{f}"]').inner_text()) for f in fields}
    assert cells == {"on_hand": str(UNITS), "held": "0", "sold": str(UNITS), "available": "0"}
    lines = page.locator('polyline[data-series="sold"]')
    assert int(await lines.get_attribute("data-points") or 0) >= 10  # two minutes of history, one point a second
    assert (await figure(page, "lag")).endswith("ms")
    await page.wait_for_timeout(1_500)  # one more poll, so the chart's last point is the final one
    await page.screenshot(path=REPORTS / "dashboard.png", full_page=True)

    for shot in ("dashboard-during-sale.png", "dashboard.png"):
        png = (REPORTS / shot).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, shot
    assert problems == []


def _is_error(message: ConsoleMessage) -> bool:
    return message.type == "error"


def exactly(n: int) -> re.Pattern[str]:
    return re.compile(rf"^{n}$")


async def test_the_page_asks_for_a_key_and_takes_one_from_its_fragment(
    service_env: dict[str, str], redis: object, pg: asyncpg.Pool, browser: Browser, tmp_path: Path
) -> None:
    store = KeyStore(pg)
    _, admin = await store.create("tenant-z", Scope.ADMIN, "catalogue")
    _, reader = await store.create("tenant-z", Scope.READ, "dashboard")
    env = {**service_env, "STOCKHOLD_REQUIRE_AUTH": "true"}
    with stockhold_serve(env, tmp_path / "server.log") as base:
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            created = await http.put(
                "/v1/skus/gin", json={"on_hand": 7}, headers={"authorization": f"Bearer {admin.token}"}
            )
            assert created.status_code == 201, created.text
        page = await browser.new_page()
        polls: list[str] = []
        page.on("request", lambda r: polls.append(r.url) if "/v1/dashboard" in r.url else None)

        # without a key: the service's 401 is shown as it is, and the page asks for a key and stops polling
        await page.goto(f"{base}/dashboard#sku=gin")
        await page.get_by_test_id("status").filter(has_text="error").wait_for(timeout=10_000)
        assert "401 unauthenticated" in await figure(page, "problem")
        await page.wait_for_timeout(2_500)
        assert len(polls) == 1, polls
        await page.locator("#key-input").fill(reader.token)
        await page.locator("#key-form button").click()
        await page.get_by_test_id("status").filter(has_text="live").wait_for(timeout=10_000)
        assert await figure(page, "tenant") == "tenant-z"
        assert await page.get_by_test_id("problem").is_hidden()
        gin = page.locator('[data-testid="sku-row"][data-sku="gin"] [data-field="available"]')
        assert await gin.inner_text() == "7"

        # a key in the fragment is used, then taken out of the address bar
        fresh = await browser.new_page()
        await fresh.goto(f"{base}/dashboard#key={reader.token}&sku=gin")
        await fresh.get_by_test_id("status").filter(has_text="live").wait_for(timeout=10_000)
        assert await figure(fresh, "card-available") == "7"
        assert "key=" not in fresh.url and fresh.url.endswith("/dashboard#sku=gin")
