"""Send one HTTP request to a model: the header picks the model.

python examples/client_http.py --model 2
curl -H 'serve_multiplexed_model_id: 2' -d '{"x": [1, 2, 3, 4]}' http://127.0.0.1:8000/
"""

from __future__ import annotations

import argparse
import json

import httpx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="POST to the Model deployment")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="1", help="model id (the folder name)")
    args = parser.parse_args(argv)
    response = httpx.post(
        f"{args.url}/",
        json={"x": [1.0, 2.0, 3.0, 4.0]},
        headers={"serve_multiplexed_model_id": args.model},
    )
    print(response.status_code, "served by", response.headers.get("x-muxgate-replica"))
    print(json.dumps(response.json()))
    response.raise_for_status()


if __name__ == "__main__":
    main()
