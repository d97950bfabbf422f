"""``/dashboard``: the page and its assets over HTTP, the series it draws, and the page itself in headless
Chromium (Selenium), against the real gateway and emulator.

Selenium is synchronous and the servers run in the test's event loop, so every browser step runs in a
thread (``asyncio.to_thread``) while the loop keeps serving. Waits are Selenium's ``WebDriverWait`` on a
condition of the page, never a sleep.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from app.emulator.moonshot import MoonshotEmulatorConfig
from app.pool.account import State
from tests.conftest import MASTER_KEY, Stack, run_stack

MODEL = "kimi-k2-0905-preview"
HELLO = [{"role": "user", "content": "Say hello to the pool."}]
ADMIN = {"Authorization": f"Bearer {MASTER_KEY}"}
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
WAIT = 20.0
REASON = "<b>maintenance</b> <img src=x onerror=alert(1)>"


async def chat(http: httpx.AsyncClient, key: str = MASTER_KEY) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                           headers={"Authorization": f"Bearer {key}"})


# --- over HTTP ---------------------------------------------------------------------------------------


async def test_the_page_is_a_shell_and_its_assets_are_served_from_the_package_with_long_cache(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        page = await http.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert MASTER_KEY not in page.text and "acct-1" not in page.text, "the shell holds no data"
        assets = re.findall(r'(?:src|href)="(/dashboard/assets/[^"]+)"', page.text)
        assert len(assets) == 5 and all(re.search(r"\?v=[0-9a-f]{12}$", url) for url in assets)
        assert not re.search(r'(?:src|href)="(?:https?:)?//', page.text), "nothing from the internet"

        kinds = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        for url in assets:
            asset = await http.get(url)
            assert asset.status_code == 200, url
            assert asset.headers["content-type"].startswith(kinds[Path(url.split("?")[0]).suffix]), url
            assert asset.headers["cache-control"] == "public, max-age=31536000, immutable", url
            assert asset.headers["x-content-type-options"] == "nosniff"
        chart = await http.get("/dashboard/assets/vendor/uPlot.iife.min.js")
        assert chart.status_code == 200 and chart.text.startswith("/*! https://github.com/leeoniya/uPlot")
        assert chart.headers["cache-control"] == "no-cache", "a URL without the current hash may change"
        license = await http.get("/dashboard/assets/vendor/uPlot-LICENSE.txt")
        assert license.headers["content-type"].startswith("text/plain") and "MIT License" in license.text

        for missing in ("/dashboard/assets/nope.js", "/dashboard/assets/%2e%2e/dashboard.py",
                        "/dashboard/assets/..%2F..%2Fmain.py", "/dashboard/assets/vendor"):
            response = await http.get(missing)
            assert response.status_code == 404, missing
            assert response.json()["error"]["code"] == "not_found"


async def test_the_series_needs_the_master_key_and_counts_every_request_per_account_and_key(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        created = await http.post("/admin/keys", json={"name": "batch"}, headers=ADMIN)
        assert created.status_code == 201
        batch = created.json()["key"]

        assert (await http.get("/admin/usage/series")).status_code == 401
        assert (await http.get("/admin/usage/series", headers={"Authorization": "Bearer nope"})).status_code == 401
        refused = await http.get("/admin/usage/series", headers={"Authorization": f"Bearer {batch}"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert (await http.get("/admin/usage/errors", headers={"Authorization": f"Bearer {batch}"})).status_code == 403

        sent: list[tuple[float, str, str, int]] = []  # (when, account, key name, tokens)

        async def send(key: str, name: str) -> None:
            response = await chat(http, key)
            assert response.status_code == 200
            sent.append((stack.clock.time(), response.headers["x-kimi-pool-account"], name,
                         response.json()["usage"]["total_tokens"]))

        for _ in range(5):
            await send(MASTER_KEY, "master")
        for _ in range(3):
            await send(batch, "batch")
        stack.clock.advance(125)
        for _ in range(2):
            await send(batch, "batch")

        response = await http.get("/admin/usage/series?since=10m&step=60&by=account", headers=ADMIN)
        assert response.status_code == 200
        series = response.json()
        step, times = series["step"], series["t"]
        assert step == 60 and len(times) == 11 and all(t % 60 == 0 for t in times)
        assert times == list(range(times[0], times[-1] + 60, 60)) and times[-1] <= series["now"] < times[-1] + 60

        def expected(index: int) -> dict[str, dict[int, list[int]]]:
            counts: dict[str, dict[int, list[int]]] = collections.defaultdict(dict)
            for when, *names, tokens in sent:
                bucket = counts[names[index]].setdefault(int(when // 60 * 60), [0, 0])
                bucket[0] += 1
                bucket[1] += tokens
            return counts

        def observed(body: dict[str, Any]) -> dict[str, dict[int, list[int]]]:
            return {line["name"]: {t: [line["requests"][i], line["tokens"][i]]
                                   for i, t in enumerate(body["t"]) if line["requests"][i]}
                    for line in body["series"]}

        assert observed(series) == expected(0)
        assert sum(sum(line["requests"]) for line in series["series"]) == len(sent) == 10
        assert all(not any(line["errors"]) for line in series["series"])
        assert {row["name"]: row["requests"] for row in series["today"]["rows"]} == collections.Counter(
            account for _when, account, _key, _tokens in sent)

        by_key = (await http.get("/admin/usage/series?since=10m&step=60&by=key", headers=ADMIN)).json()
        assert observed(by_key) == expected(1)
        assert [line["name"] for line in by_key["series"]] == ["batch", "master"], "busiest first"

        default = (await http.get("/admin/usage/series", headers=ADMIN)).json()
        assert default["step"] == 30 and len(default["t"]) == 121 and default["by"] == "account"
        for bad in ("step=0", "step=1&since=7d", "by=day", "since=soon", "since=40d", "limit=3"):
            error = await http.get(f"/admin/usage/series?{bad}", headers=ADMIN)
            assert error.status_code == 400, bad
            assert error.json()["error"]["type"] == "invalid_request_error"


async def test_hostile_asset_names_and_series_steps_are_404_and_400_never_500(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        for path in ("/dashboard/assets/%00", "/dashboard/assets/a%00.js", "/dashboard/assets/" + "a" * 5000,
                     "/dashboard/assets/dashboard.html", "/dashboard/assets/dashboard.html?v=1",
                     "/dashboard/assets/vendor/../dashboard.html"):
            response = await http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
        page = await http.get("/dashboard")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"], "the page comes from here only"
        for bad in ("step=99999999999999999999w", "step=" + "9" * 400, "step=32d&since=31d", "since=" + "9" * 400,
                    "since=99999999999999999999w"):
            error = await http.get(f"/admin/usage/series?{bad}", headers=ADMIN)
            assert error.status_code == 400, bad
            assert error.json()["error"]["param"] in ("step", "since")
        errors = await http.get("/admin/usage/errors?since=" + "9" * 400, headers=ADMIN)
        assert errors.status_code == 400
        widest = await http.get("/admin/usage/series?since=31d&step=31d", headers=ADMIN)
        assert widest.status_code == 200 and widest.json()["step"] == 31 * 86400


async def test_failed_requests_are_listed_latest_first(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, stack.http() as http:
        assert (await chat(http)).status_code == 200
        refusal = {"kind": "status", "status": 400, "type": "invalid_request_error", "message": "bad temperature"}
        stack.emulator.script(None, [refusal, refusal])
        for request_id in ("first-failure", "second-failure"):
            failed = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO},
                                     headers={**ADMIN, "X-Request-Id": request_id})
            assert failed.status_code == 400
            stack.clock.advance(1)
        response = await http.get("/admin/usage/errors?limit=5", headers=ADMIN)
        assert response.status_code == 200
        rows = response.json()["data"]
        assert [(row["request_id"], row["status"]) for row in rows] == [("second-failure", 400), ("first-failure", 400)]
        assert rows[0]["account"] is not None and rows[0]["key"] == "master" and rows[0]["model"] == MODEL
        assert (await http.get("/admin/usage/errors?limit=1", headers=ADMIN)).json()["data"] == rows[:1]
        assert (await http.get("/admin/usage/errors?since=1s", headers=ADMIN)).json()["data"] == rows[:1]
        stack.clock.advance(86400)
        assert (await http.get("/admin/usage/errors", headers=ADMIN)).json()["data"] == [], "a day is the default"
        assert (await http.get("/admin/usage/errors?since=25h", headers=ADMIN)).json()["data"] == rows
        for bad in ("limit=0", "since=0s", "since=32d", "by=key"):
            assert (await http.get(f"/admin/usage/errors?{bad}", headers=ADMIN)).status_code == 400, bad


# --- in a browser ------------------------------------------------------------------------------------


def chromium() -> tuple[str, str]:
    """The Chromium and chromedriver binaries; the test fails (it does not skip) without them."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("the dashboard test needs Chromium and its driver: apt-get install chromium chromium-driver "
                    "(`make test` and .ci/run install them)", pytrace=False)
    return browser, driver


def open_browser(binary: str, driver: str) -> WebDriver:
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000",
                     "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(argument)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given: Selenium Manager, which would go to the network, is never run.
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def until(chrome: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    try:
        return WebDriverWait(chrome, WAIT, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"the dashboard never showed {what}; it showed:\n"
                             f"{chrome.find_element(By.TAG_NAME, 'body').text}") from None


def states(chrome: WebDriver) -> dict[str, str]:
    return {row.get_attribute("data-account") or "": row.find_element(By.CSS_SELECTOR, ".state").text
            for row in chrome.find_elements(By.CSS_SELECTOR, "#accounts tbody tr[data-account]")}


def screenshot(chrome: WebDriver, name: str) -> None:
    """The whole page, into ``test-artifacts/`` at the repository's root."""
    ARTIFACTS.mkdir(exist_ok=True)
    size = chrome.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = chrome.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    (ARTIFACTS / name).write_bytes(base64.b64decode(shot["data"]))


def errors_in_console(chrome: WebDriver) -> list[str]:
    return [entry["message"] for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]


async def test_the_dashboard_in_a_real_browser_shows_the_pool_and_disables_probes_and_enables(tmp_path: Path) -> None:
    binary, driver = chromium()
    config = MoonshotEmulatorConfig.simple(keys=4)
    async with run_stack(tmp_path, emulator=config, account_extra={"rpm": 60}) as stack, stack.http() as http:
        await put_the_accounts_in_four_states(stack, http)
        expected = {"acct-1": "active", "acct-2": "cooling_down", "acct-3": "disabled", "acct-4": "auth_dead"}
        assert {name: a.state.value for name, a in stack.gateway.pool.accounts.items()} == expected

        chrome = await asyncio.to_thread(open_browser, binary, driver)
        try:

            def sign_in_and_read() -> dict[str, str]:
                chrome.get(stack.url + "/dashboard")
                key = until(chrome, lambda c: c.find_element(By.ID, "admin-key").is_displayed()
                            and c.find_element(By.ID, "admin-key"), "the key form")
                key.send_keys("wrong-key")
                chrome.find_element(By.ID, "login-submit").click()
                until(chrome, lambda c: "Incorrect API key" in c.find_element(By.ID, "login-error").text,
                      "the error for a wrong key")
                assert all("401 (Unauthorized)" in error for error in errors_in_console(chrome))  # (and gone)
                chrome.find_element(By.ID, "admin-key").send_keys(MASTER_KEY)
                chrome.find_element(By.ID, "login-submit").click()
                until(chrome, lambda c: states(c) == expected, f"the states {expected}")
                until(chrome, lambda c: c.find_element(By.ID, "chart-account-requests").get_attribute("data-total")
                      == "6", "6 requests in the chart")
                screenshot(chrome, "dashboard-before.png")
                return states(chrome)

            assert await asyncio.to_thread(sign_in_and_read) == expected
            page = await asyncio.to_thread(lambda: chrome.page_source)
            assert MASTER_KEY not in page, "the key is in sessionStorage, never in the page"

            def read_the_page() -> dict[str, Any]:
                row = chrome.find_element(By.CSS_SELECTOR, 'tr[data-account="acct-2"]')
                return {
                    "cooling": row.find_element(By.CSS_SELECTOR, ".until").text,
                    "rpm": chrome.find_element(By.CSS_SELECTOR, 'tr[data-account="acct-1"] .rpm').text,
                    "canvases": len(chrome.find_elements(By.CSS_SELECTOR, ".chart canvas")),
                    "keys": chrome.find_element(By.ID, "chart-key-requests").get_attribute("data-total"),
                    "events": [e.text for e in chrome.find_elements(By.CSS_SELECTOR, "#events tbody tr .state")],
                    "failures": len(chrome.find_elements(By.CSS_SELECTOR, "#failures tbody tr")),
                    "queue": chrome.find_element(By.ID, "queue-depth").text,
                    "reason": chrome.find_element(By.CSS_SELECTOR, 'tr[data-account="acct-3"] .until').text,
                    "markup": len(chrome.find_elements(By.CSS_SELECTOR, "#accounts b, #accounts img")),
                    "disable_disabled": not chrome.find_element(
                        By.CSS_SELECTOR, 'tr[data-account="acct-3"] button[data-action="disable"]').is_enabled(),
                }

            seen = await asyncio.to_thread(read_the_page)
            assert seen["cooling"].startswith("until ") and "(in 30 s)" in seen["cooling"]
            assert re.fullmatch(r"[1-9] / 60", seen["rpm"]), seen["rpm"]
            assert seen["canvases"] == 4 and seen["keys"] == "6"
            assert "cooling_down" in seen["events"] and "auth_dead" in seen["events"]
            assert seen["failures"] == 0, "every request was served, by failing over"
            assert seen["queue"] == "0" and seen["disable_disabled"]
            assert seen["reason"] == REASON and seen["markup"] == 0, "text from the server is shown as text"

            def disable_acct_1() -> None:
                chrome.find_element(By.CSS_SELECTOR, 'tr[data-account="acct-1"] button[data-action="disable"]').click()
                until(chrome, lambda c: states(c).get("acct-1") == "disabled", "acct-1 disabled")
                until(chrome, lambda c: "acct-1 disabled" in c.find_element(By.ID, "notice").text, "the notice")
                screenshot(chrome, "dashboard.png")

            await asyncio.to_thread(disable_acct_1)
            assert stack.gateway.pool.accounts["acct-1"].state == State.DISABLED
            assert stack.gateway.pool.accounts["acct-1"].reason == "disabled from the dashboard"

            def probe_acct_2_and_enable_acct_3() -> str:
                chrome.find_element(By.CSS_SELECTOR, 'tr[data-account="acct-2"] button[data-action="probe"]').click()
                until(chrome, lambda c: "Probe of acct-2" in c.find_element(By.ID, "notice").text, "a verdict")
                verdict = chrome.find_element(By.ID, "notice").text
                chrome.find_element(By.CSS_SELECTOR, 'tr[data-account="acct-3"] button[data-action="enable"]').click()
                until(chrome, lambda c: states(c).get("acct-3") == "active", "acct-3 enabled")
                return verdict

            verdict = await asyncio.to_thread(probe_acct_2_and_enable_acct_3)
            assert verdict.startswith("Probe of acct-2: ok (cooling_down → active)"), verdict
            assert await asyncio.to_thread(states, chrome) == {
                "acct-1": "disabled", "acct-2": "active", "acct-3": "active", "acct-4": "auth_dead"}
            assert {name: a.state.value for name, a in stack.gateway.pool.accounts.items()} == {
                "acct-1": "disabled", "acct-2": "active", "acct-3": "active", "acct-4": "auth_dead"}
            assert await asyncio.to_thread(errors_in_console, chrome) == []

            def sign_out() -> bool:
                chrome.find_element(By.ID, "sign-out").click()
                until(chrome, lambda c: c.find_element(By.ID, "login").is_displayed(), "the key form again")
                return bool(chrome.execute_script("return sessionStorage.length === 0"))

            assert await asyncio.to_thread(sign_out), "signing out forgets the key"
        finally:
            await asyncio.to_thread(chrome.quit)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


async def put_the_accounts_in_four_states(stack: Stack, http: httpx.AsyncClient) -> None:
    """acct-1 active, acct-2 cooling down after a 429, acct-3 disabled by the operator, acct-4 dead
    after a 401; six requests served in all, each failing over where it met the 429 or the 401."""
    stack.emulator.script("sk-emu-0002", [{"kind": "rate_limit", "bucket": "rpm", "wait": 30}])
    stack.emulator.script("sk-emu-0004", [{"kind": "auth"}])
    for _ in range(6):
        assert (await chat(http)).status_code == 200
    disabled = await http.post("/admin/accounts/acct-3/disable", json={"reason": REASON}, headers=ADMIN)
    assert disabled.status_code == 200
