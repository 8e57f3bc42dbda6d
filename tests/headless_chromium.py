"""How the status-page tests start the system's Chromium (never a download)."""

from __future__ import annotations

#: headless, and nothing that reaches the network on its own
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
