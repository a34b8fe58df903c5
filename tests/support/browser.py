"""The system's headless Chromium for Playwright (never ``playwright install``).

``make browser`` installs Debian's ``chromium-headless-shell`` (or
``chromium``) when neither is there. Where Debian puts the binaries:

- ``chromium-headless-shell``: the real binary is
  ``/usr/lib/chromium/chromium-headless-shell``; ``/usr/bin/chromium-headless-shell``
  is a shell wrapper that execs it.
- ``chromium``: ``/usr/lib/chromium/chromium``, with the wrapper ``/usr/bin/chromium``.

``COSIGNER_TEST_CHROMIUM`` overrides the lookup with a path of your own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Real binaries first (Playwright talks to them directly), then wrappers on PATH.
CANDIDATES = (
    "/usr/lib/chromium/chromium-headless-shell",
    "/usr/lib/chromium/chromium",
    "chromium-headless-shell",
    "chromium",
    "chromium-browser",
    "google-chrome",
)
# Root in a container has no user namespace sandbox; nothing here may phone home.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def chromium_path() -> str | None:
    """The Chromium executable to drive, or None when none is installed."""
    override = os.environ.get("COSIGNER_TEST_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@contextmanager
def browser() -> Iterator[Any]:
    """A launched headless Chromium (Playwright's sync API), always closed."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if path is None:
        raise RuntimeError("no Chromium found: run `make browser` (Debian chromium-headless-shell)")
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=path, args=ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


def artifact(name: str) -> Path:
    """Where a test writes a screenshot (``test-artifacts/``, ignored by git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


def distinct_colors(page: Any, png: bytes) -> int:
    """How many distinct colours a PNG has, counted by the browser itself (no imaging library)."""
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    count: int = page.evaluate(
        """async (src) => {
            const img = new Image();
            img.src = src;
            await img.decode();
            const canvas = document.createElement('canvas');
            canvas.width = img.naturalWidth;
            canvas.height = img.naturalHeight;
            const ctx = canvas.getContext('2d');
            ctx.drawImage(img, 0, 0);
            const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            const seen = new Set();
            for (let i = 0; i < px.length; i += 4) {
                seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
                if (seen.size > 4096) break;
            }
            return seen.size;
        }""",
        data_url,
    )
    return count
