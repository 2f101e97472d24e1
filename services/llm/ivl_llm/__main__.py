"""`python -m ivl_llm [--model-path DIR] [--port N] ...`: start the LLM service (settings from IVL_LLM_*)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ivl_proto.dtypes import DTYPE_NAMES
from ivl_proto.errors import ServingError
from ivl_proto.request_context import install_request_id_logging
from ivl_proto.settings_errors import SettingsError, load_settings

from ivl_llm.server import serve
from ivl_llm.settings import LLMSettings


def parse_args(argv: list[str] | None = None) -> LLMSettings:
    parser = argparse.ArgumentParser(prog="python -m ivl_llm", description=__doc__)
    parser.add_argument("--model-path", help="checkpoint folder (IVL_LLM_MODEL_PATH)")
    parser.add_argument("--host", help="IVL_LLM_HOST")
    parser.add_argument("--port", type=int, help="IVL_LLM_PORT (default 50052)")
    parser.add_argument("--backend", choices=["transformers", "lmdeploy"], help="IVL_LLM_BACKEND")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="IVL_LLM_DTYPE")
    parser.add_argument("--device", help="IVL_LLM_DEVICE, e.g. cpu or cuda")
    parser.add_argument(
        "--trust-remote-code", action="store_true", default=None,
        help="IVL_LLM_TRUST_REMOTE_CODE: run the checkpoint's own tokenizer code (real InternLM2 checkpoints need it)",
    )
    parser.add_argument(
        "--prefix-cache-bytes", type=int,
        help="IVL_LLM_PREFIX_CACHE_BYTES: KV kept for reuse by later turns (default 1 GiB; 0 = off)",
    )
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return load_settings(LLMSettings, "LLM", overrides, **overrides)


def main(argv: list[str] | None = None) -> None:
    install_request_id_logging(logging.INFO)  # "[request id]" on every line
    try:
        settings = parse_args(argv)
    except SettingsError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.model_path:
        raise SystemExit("set --model-path or IVL_LLM_MODEL_PATH to a checkpoint folder")
    try:
        asyncio.run(serve(settings))
    except (ServingError, RuntimeError, OSError) as error:
        logging.getLogger("ivl_llm").error("LLM service failed: %s", error)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
