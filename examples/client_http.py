"""Send one HTTP request to a model: the header picks the model.

python examples/client_http.py --model 2
curl -H 'serve_multiplexed_model_id: 2' -d '{"x": [1, 2, 3, 4]}' http://127.0.0.1:8000/
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="POST to the Model deployment")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="1", help="model id (the folder name)")
    args = parser.parse_args(argv)
    try:
        response = httpx.post(
            f"{args.url}/",
            json={"x": [1.0, 2.0, 3.0, 4.0]},
            headers={"serve_multiplexed_model_id": args.model},
        )
    except httpx.ConnectError as exc:
        sys.exit(f"cannot reach {args.url} ({exc}): is `muxgate serve examples/app.yaml` running?")
    # empty when the gateway answered itself (a bad model id, no route, ...)
    replica = response.headers.get("x-muxgate-replica") or "the gateway"
    print(response.status_code, "served by", replica)
    print(json.dumps(response.json()))
    if response.is_error:  # the error document above says why (404: no such model folder)
        sys.exit(1)


if __name__ == "__main__":
    main()
