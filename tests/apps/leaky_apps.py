"""A deployment whose exceptions carry what a client must not see, for
tests/integration/test_gateway_error_messages.py.

* ``/path``: raises ``FileNotFoundError`` naming an absolute server path;
* ``/url``: raises ``RuntimeError`` naming a bucket URL, an access key id
  and a password;
* anything else: answers ``{"ok": true}``.
"""

from __future__ import annotations

from typing import Any

from muxgate.replicas._deployment import deployment
from muxgate.replicas._http import Request

SECRET_DIR = "/srv/secret-models/tenant-7"
BUCKET_URL = "s3://secret-bucket/tenant-7/model.pt"
KEY_ID = "AKIAABCDEFGHIJKLMNOP"
PASSWORD = "hunter2"


@deployment
class Leaky:
    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.path == "/path":
            # as open() of a missing file would
            raise FileNotFoundError(2, "No such file or directory", f"{SECRET_DIR}/model.pt")
        if request.path == "/url":
            raise RuntimeError(f"cannot read {BUCKET_URL} with key {KEY_ID} (password={PASSWORD})")
        return {"ok": True}
