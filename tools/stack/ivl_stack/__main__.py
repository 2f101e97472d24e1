"""python -m ivl_stack: the whole InternVL stack with one command (flags override IVL_STACK_* / MODEL_PATH)."""

from __future__ import annotations

import argparse
import sys

from ivl_proto.settings_errors import SettingsError, load_settings

from ivl_stack.launcher import Launcher
from ivl_stack.settings import StackSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ivl_stack", description=__doc__)
    add = parser.add_argument
    add("--model-path", help="InternVL checkpoint folder (or MODEL_PATH); default: the trained tiny demo model")
    add("--random-demo", action="store_true", default=None,
        help="without --model-path: the tiny random checkpoint instead of the trained demo model")
    add("--host", help="where the UI and the HTTP API listen (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    add("--ui-port", type=int, help="UI port (default 7860)")
    add("--http-port", type=int, help="gateway HTTP/OpenAI port (default 8000)")
    add("--grpc-port", type=int, help="gateway gRPC port (default 50050)")
    add("--vision-port", type=int, help="vision encoder gRPC port (default 50051)")
    add("--llm-port", type=int, help="LLM service gRPC port (default 50052)")
    add("--vision-metrics-port", type=int, help="vision service Prometheus metrics port (default 9091; 0 = off)")
    add("--llm-metrics-port", type=int, help="LLM service Prometheus metrics port (default 9092; 0 = off)")
    add("--redis-port", type=int, help="Redis port (default 6390)")
    add("--metrics-port", type=int, help="the launcher's own Prometheus /metrics on loopback (default 9400; 0 = off)")
    add("--redis-maxmemory", help="Redis memory cap for the embedding cache, LRU-evicted (default 1gb)")
    add("--cache-dir", help="where the tiny random checkpoint is written (default ~/.cache/ivl-stack)")
    add("--gpu", action="store_true", default=None, help="CUDA + bfloat16, LMDeploy for the LLM")
    add("--backend", choices=["transformers", "lmdeploy"], help="LLM backend")
    add("--device", choices=["cpu", "cuda"], help="device of both model services")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of both model services")
    add("--torch-threads", type=int,
        help="torch threads of each model service (default: torch's, every core)")
    add("--trust-remote-code", action="store_true", default=None, help="needed by real InternLM2 tokenizers")
    add("--share", action="store_true", default=None, help="public gradio.live link (needs internet)")
    add("--auth", help="protect the UI with user:password")
    add("--no-ui", action="store_true", default=None, help="start everything but the UI")
    add("--ready-timeout-s", type=float, help="give up if a service is not ready after this long (default 900)")
    add("--ready-file", help="write the URLs and child pids as JSON here once everything is ready (kept current)")
    add("--max-restarts", type=int, help="restarts of a dead child within 300 s before it is given up (default 5)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = load_settings(StackSettings, "stack launcher", overrides, **overrides)
    except SettingsError as error:
        print(f"[ivl-stack] {error}", file=sys.stderr)
        return 2
    return Launcher(settings, sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
