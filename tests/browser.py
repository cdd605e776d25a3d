"""Headless Chromium for the tests of the pages a person opens: Debian's ``chromium`` and ``chromium-driver``
(``apt-get install chromium chromium-driver``; `.ci/run` installs them), driven through Selenium with the driver's
own binary, so nothing is downloaded at run time."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver"
# this machine's network is closed: without these flags Chromium keeps trying to reach Google at every start
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")


def chromium_binary() -> str:
    """The Chromium executable, or a test failure that says how to install it (the browser tests are not skipped)."""
    for path in CHROMIUM:
        if Path(path).is_file():
            return path
    found = shutil.which("chromium")
    if found:
        return found
    pytest.fail(f"headless Chromium not found (looked for {', '.join(CHROMIUM)}): {INSTALL}", pytrace=False)


def start_browser(downloads: Path, profile: Path) -> Iterator:
    """A headless Chromium whose downloads land in ``downloads`` (a fresh ``profile`` folder each time)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = chromium_binary()
    driver_path = DRIVER if Path(DRIVER).is_file() else shutil.which("chromedriver")
    if not driver_path:
        pytest.fail(f"chromedriver not found at {DRIVER}: {INSTALL}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_file(folder: Path, pattern: str, timeout: float = 20.0) -> Path:
    """The one finished download matching ``pattern`` in ``folder`` (Chromium writes ``.crdownload`` first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no download matching {pattern} in {folder} after {timeout} s: {sorted(folder.iterdir())}")
