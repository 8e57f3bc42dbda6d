"""A module that starts a thread when imported: a fork server that preloads
it must refuse to fork (tests/integration/test_forkserver.py)."""

from __future__ import annotations

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="preload-thread", daemon=True).start()
