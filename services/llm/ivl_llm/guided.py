"""Guided decoding with xgrammar: the output of a request follows a grammar (JSON, a JSON Schema, tool calls).

Why xgrammar (bench/bench_guided_decoding.py, bench/RESULTS.md): the lowest per-token cost of the three
maintained libraries measured here (llguidance, outlines-core), and the library LMDeploy itself compiles
response formats with, so both backends constrain with the same grammar semantics.

`GuidedDecoder` belongs to one loaded model (tokenizer + the model's vocabulary size + the template's
end-of-turn token, which is what ends a completed grammar). `compile(guided)` checks and compiles a request's
grammar (a bad schema is INVALID_ARGUMENT naming the problem); `RowMatchers` holds one matcher per choice and
masks a (choices, vocab) logits tensor in place before sampling.

Whitespace between JSON tokens is not free: `{"a": 1, "b": [1, 2]}` separators exactly (tool calls: at
most one space between tokens). A grammar with flexible whitespace lets a weak (or random) model emit spaces forever;
this way every token advances the JSON. Strings are still unbounded unless the schema bounds them
(maxLength), as with every such library.

xgrammar's JSON strings admit raw control characters (U+0000..U+001F other than newline), which JSON does
not allow unescaped (Python's json.loads refuses them): tokens holding such bytes are masked as well.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

import torch
from ivl_proto.errors import invalid

from ivl_llm.sampling import Guided

SEPARATORS = (", ", ": ")
TOOL_CALL_BEGIN = "<tool_call>\n"
TOOL_CALL_END = "\n</tool_call>"
TOOL_CALL_TRIGGER = "<tool_call>"


def tool_calls_structural_tag(guided: Guided) -> dict[str, Any]:
    """The xgrammar structural tag of a tool_calls request (also what LMDeploy's response_format takes)."""
    schemas = [json.loads(s) for s in guided.call_schemas]
    content = {"type": "json_schema", "json_schema": schemas[0] if len(schemas) == 1 else {"anyOf": schemas},
               "max_whitespace_cnt": 1}
    tag = {"type": "tag", "begin": TOOL_CALL_BEGIN, "content": content, "end": TOOL_CALL_END}
    if guided.required:
        body: dict[str, Any] = {"type": "tags_with_separator", "tags": [tag], "separator": "\n",
                                "at_least_one": True, "stop_after_first": not guided.parallel}
    else:
        body = {"type": "triggered_tags", "triggers": [TOOL_CALL_TRIGGER], "tags": [tag],
                "at_least_one": False, "stop_after_first": not guided.parallel}
    return {"type": "structural_tag", "format": body}


def parse_schema(text: str, what: str) -> Any:
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise invalid(f"{what} is not valid JSON: {error}") from None
    if not isinstance(schema, dict | bool):
        raise invalid(f"{what} must be a JSON object (a JSON Schema)")
    return schema


class GuidedDecoder:
    """Compiles grammars against one model's vocabulary; thread-safe (xgrammar's compiler is)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Collection[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(int(i) for i in stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True,
                                            cache_limit_bytes=64 * 2**20)
        control = [i for i, raw in enumerate(self.info.decoded_vocab) if any(b < 0x20 and b != 0x0A for b in raw)]
        self.control_tokens = torch.tensor(control, dtype=torch.long)  # never inside JSON (see the module doc)

    def token_bytes(self) -> list[bytes]:
        """Each token id's raw bytes (what the OpenAI logprobs `bytes` field holds)."""
        return list(self.info.decoded_vocab)

    def compile(self, guided: Guided) -> Any:
        """The compiled grammar, or INVALID_ARGUMENT naming what xgrammar could not compile."""
        xgr = self._xgr
        try:
            if guided.kind == "json_object":
                return self.compiler.compile_json_schema(
                    json.dumps({"type": "object"}), any_whitespace=False, separators=SEPARATORS)
            if guided.kind == "json_schema":
                parse_schema(guided.json_schema, "response_format json_schema")
                return self.compiler.compile_json_schema(guided.json_schema, any_whitespace=False,
                                                         separators=SEPARATORS, strict_mode=True)
            if not guided.call_schemas:
                raise invalid("tool calls need at least one function schema")
            for index, schema in enumerate(guided.call_schemas):
                parse_schema(schema, f"tool {index} schema")
            return self.compiler.compile_structural_tag(json.dumps(tool_calls_structural_tag(guided)))
        except (RuntimeError, ValueError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as error:
            raise invalid(f"the {guided.kind} grammar could not be compiled: {error}") from None

    def matchers(self, compiled: Any, rows: int) -> RowMatchers:
        return RowMatchers(self._xgr, compiled, rows, self.vocab_size, self.control_tokens)


class RowMatchers:
    """One grammar matcher per choice; `mask(scores, active)` before sampling, `accept(row, token)` after."""

    def __init__(self, xgr: Any, compiled: Any, rows: int, vocab_size: int, banned: torch.Tensor) -> None:
        self._xgr = xgr
        self.banned = banned
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
        self.bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, scores: torch.Tensor, active: Sequence[int]) -> None:
        """Set the logits of every token the grammar does not allow to -inf, in place, for the active rows."""
        for row in active:
            self.matchers[row].fill_next_token_bitmask(self.bitmask, row)
        self._xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), vocab_size=self.vocab_size,
                                              indices=list(active))
        if self.banned.numel():
            rows = torch.tensor(list(active), dtype=torch.long, device=scores.device)
            scores[rows.unsqueeze(1), self.banned.to(scores.device).unsqueeze(0)] = float("-inf")

    def accept(self, row: int, token_id: int) -> None:
        if not self.matchers[row].accept_token(int(token_id)):
            raise RuntimeError(f"the grammar refused token {token_id} it had allowed (choice {row})")

    def terminated(self, row: int) -> bool:
        return bool(self.matchers[row].is_terminated())
