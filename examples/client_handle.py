"""Call the Model deployment from Python through a handle (no HTTP body to build).

    python examples/client_handle.py --model 2

``options(multiplexed_model_id=...)`` picks the model exactly like the HTTP
header, and the gateway routes the call to the replica holding it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from muxgate.replicas import HandleError, HandleUnavailableError, get_deployment_handle


async def run(url: str, model_id: str) -> None:
    handle = get_deployment_handle("Model", gateway_url=url)
    model = handle.options(multiplexed_model_id=model_id)
    # __call__ with a payload, as in Ray Serve's guide ...
    result = await model.remote({"x": [1.0, 2.0, 3.0, 4.0]})
    print(json.dumps(result))
    # ... or any other method by name.
    y = await model.predict.remote([1.0, 2.0, 3.0, 4.0])
    print(json.dumps({"model_id": model_id, "predict": y}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="call the Model deployment through a handle")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="2")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.url, args.model))
    except HandleUnavailableError as exc:
        sys.exit(f"{exc}: is `muxgate serve examples/app.yaml` running?")
    except HandleError as exc:  # e.g. 404 model_not_found: no such model folder
        sys.exit(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
