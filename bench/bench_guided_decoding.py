"""Per-token overhead of guided decoding (JSON Schema) with xgrammar, llguidance and outlines-core, side by side.

For each library and tokenizer: compile one JSON Schema (time), then walk a valid instance token by token,
and per token compute the allowed-token mask, apply it to a logits row and accept the token (what a decode
loop does each step). Reported: compile ms, mean and p95 microseconds per token. Tokenizers: the tiny
checkpoint's BPE (small vocabulary) and a byte-level BPE of --vocab tokens trained here on Python sources
(a real InternLM2 vocabulary is 92,544; no hub here, so a trained one of that order stands in).

    .venv/bin/python bench/bench_guided_decoding.py [--vocab 65536] [--append]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["math", "poetry", "engineering"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "maxLength": 10}},
            "required": ["city", "zip"], "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
# Compact separators: every library is run with non-flexible whitespace (what the LLM service uses).
INSTANCE = json.dumps({"name": "Ada Lovelace, Countess of Lovelace", "age": 36, "tags": ["math", "poetry"],
                       "address": {"city": "London", "zip": "W1"}}, separators=(",", ":"))


def tiny_tokenizer() -> Any:
    from ivl_tiny.tokenizer import build_tokenizer

    return build_tokenizer(600, "<|endoftext|>")


def trained_tokenizer(vocab: int) -> Any:
    """A byte-level BPE with about `vocab` tokens, trained on the Python sources of the installed packages."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(torch.__file__).parent.rglob("*.py"))[:3000]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class Run:
    """compile() -> matcher; step(logits, token) per token."""

    name = ""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_id: int) -> None:
        self.tokenizer, self.vocab_size, self.stop_id = tokenizer, vocab_size, stop_id


class XGrammarRun(Run):
    name = "xgrammar"

    def prepare(self) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=[self.stop_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self) -> Callable[[Any, int], None]:
        compiled = self.compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                     separators=(",", ":"))
        matcher = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)

        def step(logits: Any, token: int) -> None:
            matcher.fill_next_token_bitmask(bitmask)
            self.xgr.apply_token_bitmask_inplace(logits, bitmask)
            assert matcher.accept_token(token), token

        return step


class LLGuidanceRun(Run):
    name = "llguidance"

    def prepare(self) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.llt = llguidance.torch
        self.lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                   eos_token=self.stop_id)

    def compile(self) -> Callable[[Any, int], None]:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                             defaults={"whitespace_flexible": False})
        matcher = self.ll.LLMatcher(self.lltok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        bitmask = self.llt.allocate_token_bitmask(1, self.vocab_size)

        def step(logits: Any, token: int) -> None:
            self.llt.fill_next_token_bitmask(matcher, bitmask, 0)
            self.llt.apply_token_bitmask_inplace(logits, bitmask)
            assert matcher.consume_token(token), matcher.get_error()

        return step


class OutlinesRun(Run):
    name = "outlines-core"

    def prepare(self) -> None:
        from outlines_core import Vocabulary

        tokens: dict[str, list[int]] = {}
        for token, token_id in self.tokenizer.get_vocab().items():
            if token_id == self.stop_id:
                continue
            text = self.tokenizer.convert_tokens_to_string([token])
            tokens.setdefault(text, []).append(token_id)
        self.vocabulary = Vocabulary(self.stop_id, tokens)

    def compile(self) -> Callable[[Any, int], None]:
        import torch
        from outlines_core import Guide, Index, json_schema

        regex = json_schema.build_regex_from_schema(json.dumps(SCHEMA))
        guide = Guide(Index(regex, self.vocabulary))
        mask = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)

        def step(logits: Any, token: int) -> None:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            logits.masked_fill_(~_unpack(mask, self.vocab_size), float("-inf"))
            if token == self.stop_id:
                assert guide.is_finished()
            else:
                guide.advance(token)

        return step


def _unpack(mask: Any, size: int) -> Any:
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    return ((mask[0].unsqueeze(1) >> shifts) & 1).reshape(-1)[:size].bool()


def measure(run: Run, ids: list[int], repeats: int) -> tuple[float, float, float, float, float]:
    """(prepare ms, compile ms, first token us, mean us of the other tokens, p95 us of the other tokens)."""
    import torch

    started = time.perf_counter()
    run.prepare()
    prepare_ms = (time.perf_counter() - started) * 1000
    compile_ms: list[float] = []
    first: list[float] = []
    per_token: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        step = run.compile()
        compile_ms.append((time.perf_counter() - started) * 1000)
        logits = torch.zeros((1, run.vocab_size))
        for position, token in enumerate(ids):
            logits.zero_()
            t0 = time.perf_counter()
            step(logits, token)
            (first if position == 0 else per_token).append((time.perf_counter() - t0) * 1e6)
    per_token.sort()
    return (prepare_ms, statistics.median(compile_ms), statistics.median(first), statistics.mean(per_token),
            per_token[int(0.95 * (len(per_token) - 1))])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    load = benchlib.load_average()
    rows = []
    with tempfile.TemporaryDirectory():
        for label, tokenizer in (("tiny BPE", tiny_tokenizer()), (f"trained BPE {args.vocab}", trained_tokenizer(args.vocab))):
            vocab_size = len(tokenizer)
            stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
            ids = tokenizer(INSTANCE, add_special_tokens=False)["input_ids"] + [stop_id]
            for cls in (XGrammarRun, LLGuidanceRun, OutlinesRun):
                prepare_ms, compile_ms, first_us, mean_us, p95_us = measure(
                    cls(tokenizer, vocab_size, stop_id), ids, args.repeats)
                rows.append([label, vocab_size, cls.name, len(ids), f"{prepare_ms:.0f}", f"{compile_ms:.1f}",
                             f"{first_us:.0f}", f"{mean_us:.0f}", f"{p95_us:.0f}"])
                print(rows[-1], flush=True)
    lines = [
        f"## Guided decoding: per-token overhead of the grammar libraries ({benchlib.utc_now()})",
        "",
        benchlib.machine_line(load),
        "Python " + platform.python_version() + ", " + ", ".join(
            f"{name} {importlib.metadata.version(name)}" for name in ("xgrammar", "llguidance", "outlines-core", "torch")),
        f"Command: {benchlib.command_line('bench_guided_decoding.py', argv or sys.argv[1:])}",
        "",
        *benchlib.markdown_table(
            ["tokenizer", "vocab", "library", "tokens", "tokenizer setup ms", "compile ms (median)",
             "first token us", "us/token after the first (mean)", "p95 us/token"], rows),
        "",
    ]
    benchlib.publish("\n".join(lines), append=args.append)


if __name__ == "__main__":
    main()
