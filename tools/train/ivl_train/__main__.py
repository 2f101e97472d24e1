"""CLI: python -m ivl_train {train,export,evaluate,examples,probe-copy} ... (see docs/demo_model.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ivl_train.model import PRESETS


def _train(args: argparse.Namespace) -> int:
    from ivl_train.train import TrainConfig, Trainer

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if args.kinds:
        fields["kind_weights"] = json.loads(args.kinds)
    config = TrainConfig(**fields)
    trainer = Trainer(config)
    trainer.run()
    if args.export:
        from ivl_train.export import export_checkpoint

        folder = export_checkpoint(trainer.out, args.export, dtype=args.export_dtype)
        print(f"exported {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ivl_train.export import export_checkpoint

    print(export_checkpoint(args.run, args.out, dtype=args.dtype))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ivl_train.evaluate import EvalConfig, run_evaluation

    config = EvalConfig(
        model_path=args.model_path, seed=args.seed, per_kind=args.per_kind, small_max_tiles=tuple(args.small_max_tiles),
        base_url=args.base_url, api_key=args.api_key, results=args.results, readme=args.readme,
        start_stack=args.start_stack, threads=args.threads,
    )
    return run_evaluation(config)


def _examples(args: argparse.Namespace) -> int:
    from ivl_train.examples import write_examples

    for path in write_examples(args.out):
        print(path)
    return 0


def _probe_copy(args: argparse.Namespace) -> int:
    from ivl_train.copy_probe import ProbeConfig, run_probe

    fields = {k: v for k, v in vars(args).items() if k in ProbeConfig.__dataclass_fields__ and v is not None}
    history = run_probe(ProbeConfig(**fields), args.log)
    print(f"final exact match {history[-1]['exact_match']:.1%} after {history[-1]['step']} steps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ivl_train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from scratch, or resume the run in --out-dir")
    train.add_argument("--out-dir", required=True, help="run folder: state.pt, log.jsonl (resumes if present)")
    train.add_argument("--preset", choices=list(PRESETS))
    for name, kind in (("seed", int), ("steps", int), ("batch", int), ("lr", float), ("min-lr", float),
                       ("warmup", int), ("weight-decay", float), ("token-budget", int), ("threads", int),
                       ("workers", int), ("log-every", int), ("save-every", int), ("eval-every", int),
                       ("eval-per-kind", int), ("two-turn-fraction", float), ("aux-weight", float), ("first-phase-steps", int), ("vision-steps", int)):
        train.add_argument(f"--{name}", dest=name.replace("-", "_"), type=kind)
    train.add_argument("--kinds", help='JSON share of each kind, e.g. {"text": 1}')
    train.add_argument("--large-tile-weights", dest="large_tile_weights", type=lambda s: tuple(json.loads(s)),
                       help="JSON chances of the tile budgets 1, 2, 4, 6, 12 for the large kinds")
    train.add_argument("--export", help="after training, write the checkpoint to this folder")
    train.add_argument("--export-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    train.set_defaults(func=_train)

    export = sub.add_parser("export", help="write a run's model as an OpenGVLab-layout checkpoint")
    export.add_argument("--run", required=True, help="run folder with state.pt")
    export.add_argument("--out", required=True, help="checkpoint folder to create")
    export.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    export.set_defaults(func=_export)

    evaluate = sub.add_parser("evaluate", help="held-out accuracy per kind: the running stack vs all-in-one")
    evaluate.add_argument("--model-path", required=True, help="the checkpoint folder (the stack serves the same)")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--per-kind", type=int, default=50)
    evaluate.add_argument("--small-max-tiles", type=int, nargs="+", default=[1, 2, 6, 12])
    evaluate.add_argument("--base-url", default="", help="the stack's OpenAI API, e.g. http://127.0.0.1:8000/v1")
    evaluate.add_argument("--api-key", default="none")
    evaluate.add_argument("--start-stack", action="store_true",
                          help="start `python -m ivl_stack --no-ui` on free ports for the evaluation")
    evaluate.add_argument("--results", help="append the tables to this file (bench/RESULTS.md)")
    evaluate.add_argument("--readme", help="replace the demo-model table in this README")
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.set_defaults(func=_evaluate)

    examples = sub.add_parser("examples", help="write the UI's example images")
    examples.add_argument("--out", required=True)
    examples.set_defaults(func=_examples)

    probe = sub.add_parser("probe-copy", help="can the LLM learn to copy a word out of ideal visual tokens? (copy_probe.py)")
    probe.add_argument("--layout", choices=("token", "patch"), default="token",
                       help="one character per visual token, or one per 28 px patch (two per token)")
    probe.add_argument("--preset", choices=list(PRESETS))
    for name, kind in (("steps", int), ("batch", int), ("lr", float), ("noise", float), ("seed", int),
                       ("threads", int), ("log-every", int), ("downsample-ratio", float)):
        probe.add_argument(f"--{name}", dest=name.replace("-", "_"), type=kind)
    probe.add_argument("--log", help="append one JSON line per logged step to this file")
    probe.set_defaults(func=_probe_copy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
