"""Tools (OpenAI function calling) on a model without a tool-call format of its own: the functions are
described in the system message, each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(the format the Hermes/Qwen-style chat models use, which InternVL2.5/3 LLMs saw), and the LLM service's
guided decoding makes every call valid JSON for its function's parameters (ivl.common.v1.ToolCalls).

tool_choice: none = tools unused; auto = the model may answer or call; required = only calls (at least one);
a named function = exactly one call of it. parallel_tool_calls false = at most one call.

History: an assistant message's tool_calls are written back as the same tags; `tool` messages become a user
turn of `<tool_response>` blocks (consecutive ones merged), so the chat alternates as the templates expect.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ivl_proto.common.v1 import common_pb2

BEGIN, END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it


def call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tools_system_text(tools: list[Any]) -> str:
    """The functions, described for the model (appended to the system message)."""
    lines = [
        "# Tools", "", "You may call one or more functions to assist with the user query.",
        "You are provided with function signatures within <tools></tools> XML tags:", "<tools>",
    ]
    for tool in tools:
        function = tool.function
        lines.append(json.dumps({"type": "function", "function": {
            "name": function.name, "description": function.description or "",
            "parameters": function.parameters or {"type": "object"}}}, ensure_ascii=False))
    lines += [
        "</tools>", "",
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:",
        "<tool_call>", '{"name": <function-name>, "arguments": <args-json-object>}', "</tool_call>",
    ]
    return "\n".join(lines)


def guided_tool_calls(tools: list[Any], mode: str, named: str | None, parallel: bool) -> common_pb2.GuidedDecoding:
    chosen = [t for t in tools if named is None or t.function.name == named]
    return common_pb2.GuidedDecoding(tool_calls=common_pb2.ToolCalls(
        call_schemas=[json.dumps(call_schema(t.function.name, t.function.parameters)) for t in chosen],
        required=mode in ("required", "named"),
        parallel=parallel and mode != "named",
    ))


def call_text(name: str, arguments: str) -> str:
    """An earlier call, written back into the conversation as the model would have written it."""
    try:
        args: Any = json.loads(arguments) if arguments else {}
    except ValueError:
        args = arguments
    return f"{BEGIN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{END}"


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """(the text outside the calls, stripped, or None if empty; the calls). A block that is not a valid call
    (only possible when the output was cut by max_tokens) stays in the text."""
    content: list[str] = []
    calls: list[ParsedCall] = []
    rest = text
    while True:
        start = rest.find(BEGIN)
        end = rest.find(END, start + len(BEGIN)) if start >= 0 else -1
        if start < 0 or end < 0:
            content.append(rest)
            break
        call = _parse_block(rest[start + len(BEGIN):end])
        if call is None:
            content.append(rest[: end + len(END)])
        else:
            content.append(rest[:start])
            calls.append(call)
        rest = rest[end + len(END):]
    joined = "".join(content).strip()
    return (joined or None), calls


def _parse_block(body: str) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return ParsedCall(new_call_id(), value["name"], json.dumps(value.get("arguments", {}), ensure_ascii=False))


class StreamingCallParser:
    """Splits streamed text into content and complete tool calls: text that may be the start of a call is
    held back until the call closes (then it becomes one tool-call delta) or proves to be plain text."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self.buffer += text
        out: list[str] = []
        calls: list[ParsedCall] = []
        while True:
            start = self.buffer.find(BEGIN)
            if start < 0:
                keep = _partial_prefix(self.buffer, BEGIN)
                out.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            end = self.buffer.find(END, start + len(BEGIN))
            if end < 0:
                out.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            call = _parse_block(self.buffer[start + len(BEGIN):end])
            if call is None:
                out.append(self.buffer[: end + len(END)])
            else:
                out.append(self.buffer[:start])
                calls.append(call)
            self.buffer = self.buffer[end + len(END):]
        self.calls += len(calls)
        return "".join(out), calls

    def flush(self) -> str:
        held, self.buffer = self.buffer, ""
        return held


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
