"""`python -m ivl_gateway`: start the gateway with settings from IVL_GATEWAY_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from ivl_gateway.server import serve
from ivl_gateway.settings import GatewaySettings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = GatewaySettings()
    except ValidationError as error:
        print(f"invalid gateway settings (IVL_GATEWAY_*):\n{error}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
