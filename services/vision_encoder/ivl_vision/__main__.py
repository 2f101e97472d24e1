"""`python -m ivl_vision` / `ivl-vision-encoder`: run the vision encoder gRPC service.

Configuration comes from IVL_VISION_* environment variables (see ivl_vision.settings and
docs/vision_encoder.md); command-line flags override the few most used ones.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from ivl_proto.errors import ServingError
from ivl_proto.request_context import install_request_id_logging
from ivl_proto.settings_errors import SettingsError, load_settings

from ivl_vision.settings import VisionSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ivl-vision-encoder",
        description="InternVL vision encoder gRPC service (settings: IVL_VISION_* environment variables)",
    )
    parser.add_argument("--model-path", help="checkpoint folder (IVL_VISION_MODEL_PATH)")
    parser.add_argument("--host", help="bind address (IVL_VISION_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (IVL_VISION_PORT, default 50051; 0 = any free)")
    parser.add_argument("--device", help="cpu, cuda or auto (IVL_VISION_DEVICE)")
    parser.add_argument("--dtype", help="float32, float16, bfloat16 or auto (IVL_VISION_DTYPE)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_request_id_logging(logging.getLevelName(args.log_level.upper()))  # "[request id]" on every line
    overrides: dict[str, Any] = {
        name: value
        for name, value in {
            "model_path": args.model_path, "host": args.host, "port": args.port,
            "device": args.device, "dtype": args.dtype,
        }.items()
        if value is not None
    }
    try:
        settings = load_settings(VisionSettings, "vision encoder", overrides, **overrides)
        from ivl_vision.server import serve  # torch and the model code: imported once settings are valid

        asyncio.run(serve(settings))
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    except (ServingError, RuntimeError, OSError) as error:
        logging.getLogger("ivl_vision").error("vision encoder failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
