"""python -m ivl_frontend: serve the browser chat (flags override IVL_FRONTEND_* variables)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from ivl_proto.settings_errors import SettingsError, load_settings

from ivl_frontend.app import build_demo
from ivl_frontend.chat_handler import ChatHandler
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.serve import disable_telemetry, launch
from ivl_frontend.settings import FrontendSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ivl_frontend", description=__doc__)
    parser.add_argument("--gateway", "--gateway-address", dest="gateway_address", help="gateway gRPC host:port (default 127.0.0.1:50050)")
    parser.add_argument("--host", help="address to serve the page on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="port of the page (default 7860)")
    parser.add_argument("--share", action="store_true", default=None, help="also create a public gradio.live link")
    parser.add_argument("--auth", help="protect the page with 'user:password' (or IVL_FRONTEND_AUTH)")
    parser.add_argument("--concurrency", type=int, help="chats generating at once (default 4)")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    disable_telemetry()
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = load_settings(FrontendSettings, "UI", overrides, **overrides)
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    client = GatewayClient(settings)
    handler = ChatHandler(settings, client)
    demo = build_demo(settings, client, handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        launch(demo, settings)
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        handler.close()  # the preview folder goes with the UI
    return 0


if __name__ == "__main__":
    sys.exit(main())
