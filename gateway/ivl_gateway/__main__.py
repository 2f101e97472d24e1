"""`python -m ivl_gateway`: start the gateway with settings from IVL_GATEWAY_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys

from ivl_proto.request_context import install_request_id_logging
from ivl_proto.settings_errors import SettingsError, load_settings

from ivl_gateway.server import serve
from ivl_gateway.settings import GatewaySettings


def main() -> None:
    install_request_id_logging(logging.INFO)  # "[request id]" on every line
    try:
        settings = load_settings(GatewaySettings, "gateway")
    except SettingsError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
