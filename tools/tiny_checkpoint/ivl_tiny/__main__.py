"""CLI: python -m ivl_tiny --out DIR [--layout original|native] [--preset tiny|...] ..."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ivl_tiny.spec import LLM_KINDS, PRESETS, PS_VERSIONS, TOKENIZERS, VISION_FLAVOURS, spec_from_preset
from ivl_tiny.writer import LAYOUTS, write_tiny_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ivl_tiny", description=__doc__)
    parser.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--layout", choices=LAYOUTS, default="original")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--vision", choices=VISION_FLAVOURS, default=None)
    parser.add_argument("--llm", choices=LLM_KINDS, default=None)
    parser.add_argument("--ps-version", choices=PS_VERSIONS, default=None)
    parser.add_argument("--template", default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument(
        "--tokenizer", choices=TOKENIZERS, default=None,
        help="sentencepiece: InternLM2's kind (tokenizer.model + own class; load with trust_remote_code)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_preset(
            args.preset, vision=args.vision, llm=args.llm, ps_version=args.ps_version,
            template=args.template, seed=args.seed, dtype=args.dtype, tokenizer=args.tokenizer,
        )
        folder = write_tiny_checkpoint(args.out, spec, layout=args.layout)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"error: {error}") from None
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
