"""A real browser for the tests that look at pages as a person would: Debian's headless Chromium driven
through Debian's chromedriver with selenium. Nothing is fetched from a browser vendor: ``make browser``
(a step of ``make test``) installs the packages ``chromium`` and ``chromium-driver`` with apt-get, and
selenium is given both paths, so its own driver manager never runs.

Screenshots go to the test's temporary folder and, when ``MPE_SCREENSHOTS`` names a folder (``make
screenshots``: ``docs/img``), there too: the site shows what the tests saw."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Headless, and nothing that reaches for the network on its own: on a closed network Chromium's background
# services (updates, sync, component downloads, QUIC probes) fail and slow or break page loads.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--window-size=1280,900",
]


@contextmanager
def chromium(tmp: Path):
    """A headless Chromium with a fresh profile in ``tmp``, quit on leaving."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)}: not installed; `make browser` installs Debian's chromium and chromium-driver"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager: never download anything
    tmp.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp / 'profile'}"]:
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, tmp: Path, name: str) -> Path:
    """A PNG of the window in ``tmp`` (and in ``$MPE_SCREENSHOTS`` when set); returns the first."""
    out = tmp / name
    assert driver.save_screenshot(str(out)), f"{name}: the browser took no screenshot"
    if os.environ.get("MPE_SCREENSHOTS"):
        dest = Path(os.environ["MPE_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dest / name)
    return out
