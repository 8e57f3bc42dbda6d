"""Write N small torch models in the seed's layout: ``<root>/<id>/model.pt``.

python examples/make_models.py                      # examples/models/1..8
python examples/make_models.py /tmp/models --count 8
python examples/make_models.py s3://my-bucket/models --count 8   # any fsspec URL
"""

from __future__ import annotations

import argparse
import io
import sys

import fsspec
import torch

try:  # run as a script: examples/ is on sys.path
    from torch_mlp import DEFAULT_ROOT, make_net
except ImportError:  # imported as examples.make_models
    from examples.torch_mlp import DEFAULT_ROOT, make_net


def write_models(root: str, count: int, *, seed: int = 0) -> list[str]:
    """Create models ``1..count`` under ``root``; returns their ids."""
    ids = [str(i) for i in range(1, count + 1)]
    for model_id in ids:
        torch.manual_seed(seed + int(model_id))
        buffer = io.BytesIO()
        torch.save(make_net().state_dict(), buffer)
        with fsspec.open(f"{root.rstrip('/')}/{model_id}/model.pt", "wb", auto_mkdir=True) as f:
            f.write(buffer.getvalue())
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "root", nargs="?", default=DEFAULT_ROOT, help="folder or fsspec URL (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        ids = write_models(args.root, args.count)
    except Exception as exc:  # a line saying what to do, not a storage library's traceback
        why = f"{type(exc).__name__}: {exc}{_hint(args.root, exc)}"
        sys.exit(f"make_models.py: cannot write under {args.root}: {why}")
    print(f"wrote {len(ids)} models under {args.root}")


def _hint(root: str, exc: Exception) -> str:
    """What to set when an S3 write fails for want of credentials or of a server."""
    if not root.startswith("s3://"):
        return ""
    name = type(exc).__name__
    if "Credentials" in name:
        return " (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if "Connect" in name:
        return (
            " (no S3 answered; for an S3-compatible server such as MinIO, give its address:"
            " AWS_ENDPOINT_URL_S3=http://HOST:PORT)"
        )
    return ""


if __name__ == "__main__":
    main()
