"""The dashboard in a real headless Chromium, against a running pipeline."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from negcase.client.trades import publish_trades
from negcase.sim.engine import random_trades
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, (
        "the dashboard test needs Debian's chromium and chromium-driver "
        "(apt-get install chromium chromium-driver; the README's test command does it)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def number(driver, element_id: str) -> int:
    text = driver.find_element(By.ID, element_id).text
    return int(text) if text.isdigit() else -1


def test_the_page_shows_live_numbers_that_update(client, settings, spawn, browser):
    # given a running detector, a dashboard, and some trades already handled
    trades = random_trades(seed=2)
    spawn("detect", "--block-ms", "100")
    dashboard = spawn("dashboard", "--port", "0", "--interval", "0.3")
    url = dashboard.stdout.readline().split(" on ")[1].strip()
    # and trades decided by model version 3, whose live figures the page shows
    decided = [{**next(trades), "model_version": 3} for _ in range(20)]
    publish_trades(client, settings.keys, [next(trades) for _ in range(200)] + decided)
    # (trades are counted only once the detector's group exists, so test that first)
    [(last_id, _)] = client.xrevrange(settings.keys.trades, count=1)

    def all_handled() -> bool:
        groups = client.xinfo_groups(settings.keys.trades)
        done = [g for g in groups if g["last-delivered-id"] == last_id and g["pending"] == 0]
        return bool(done)

    wait_until(all_handled, what="the first 200 trades handled")
    trades_seen, losses = map(int, client.hmget(settings.keys.stats, "trades", "losses"))
    dead_letters = client.xlen(settings.keys.trades_dead)
    assert losses > 0 and dead_letters > 0  # random_trades has both in 200
    # when the page is open
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: number(d, "trades") == trades_seen)
    first = number(browser, "trades")
    # then the numbers are Redis's, and the cases with their lessons and the chart are there
    assert number(browser, "losses") == losses
    assert number(browser, "dead-letters") == dead_letters
    lessons = browser.find_elements(By.CSS_SELECTOR, "#cases-table tr")
    assert lessons and "Should have" in lessons[0].text
    assert browser.find_elements(By.CSS_SELECTOR, "#chart rect")
    live = [row.text.split() for row in browser.find_elements(By.CSS_SELECTOR, "#live-table tr")]
    assert live and live[0][0] == "v3" and int(live[0][2]) > 0
    assert browser.find_element(By.ID, "service").text == "none"
    # and when more trades arrive, the same page updates without a reload
    publish_trades(client, settings.keys, [next(trades) for _ in range(200)])
    wait.until(lambda d: number(d, "trades") > first)
    assert browser.find_element(By.ID, "state").text == "live"
