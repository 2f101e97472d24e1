"""After a reply: the chat history as it should stay on screen.

- An image the stack refused (a broken file, one over the limits, one that is gone) is removed from
  the user's message; the reply next to it says why. Later turns do not send it again.
- A reply that was stopped (its stats note is still "generating" when the reply ends) is marked
  "⏹ stopped"; a reply stopped before its first token says so instead of showing "…".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ivl_frontend.conversation import PLACEHOLDER, STOPPED_EARLY, blocks, file_path
from ivl_frontend.reply_stats import GENERATING, STOPPED


class RefusedImages:
    """Paths of images the stack refused, with the reason (the newest `capacity` kept). Gradio names an
    upload after its content, so the path stands for the file itself."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._reasons: OrderedDict[str, str] = OrderedDict()

    def add(self, path: str, reason: str) -> None:
        self._reasons[path] = reason
        self._reasons.move_to_end(path)
        while len(self._reasons) > self._capacity:
            self._reasons.popitem(last=False)

    def __contains__(self, path: object) -> bool:
        return path in self._reasons

    def __iter__(self) -> Iterator[str]:
        return iter(self._reasons)

    def __len__(self) -> int:
        return len(self._reasons)


def stopped_note(message: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stats note of a stopped reply, or None when `message` is not a pending stats note."""
    metadata = message.get("metadata")
    if message.get("role") != "assistant" or not isinstance(metadata, Mapping) or metadata.get("status") != "pending":
        return None
    title = str(metadata.get("title") or "")
    rest = title.removeprefix(GENERATING).lstrip(" ·")
    return {
        **message,
        "content": "stopped before the end of the reply (Stop was pressed)",
        "metadata": {**metadata, "title": f"{STOPPED} · {rest}" if rest else STOPPED, "status": "done"},
    }


def _text(content: Any) -> str | None:
    """The text of a text-only message content, else None."""
    if isinstance(content, str):
        return content
    parts = list(blocks(content))
    if len(parts) == 1 and isinstance(parts[0], Mapping) and parts[0].get("type") == "text":
        return str(parts[0].get("text", ""))
    return None


def settle_in_place(history: Sequence[Any]) -> None:
    """Mark stopped replies in the message dicts themselves (Gradio shows edits of the history's
    messages made by the chat function); refused images are left to `settle` and the request filter."""
    for index, message in enumerate(history):
        if not isinstance(message, dict):
            continue
        note = stopped_note(message)
        if note is None:
            continue
        message.update(note)
        previous = history[index - 1] if index else None
        if isinstance(previous, dict) and previous.get("role") == "assistant" and _text(previous.get("content")) == PLACEHOLDER:
            previous["content"] = STOPPED_EARLY


def settle(history: Sequence[Mapping[str, Any]], refused: RefusedImages) -> list[dict[str, Any]] | None:
    """The history after a reply (see the module doc), or None when nothing needs to change."""
    out: list[dict[str, Any]] = []
    changed = False
    for message in history:
        note = stopped_note(message)
        if note is not None:
            out.append(note)
            changed = True
            previous = out[-2] if len(out) >= 2 else None
            if previous is not None and previous.get("role") == "assistant" and _text(previous.get("content")) == PLACEHOLDER:
                out[-2] = {**previous, "content": STOPPED_EARLY}
            continue
        if message.get("role") == "user" and len(refused):
            parts = list(blocks(message.get("content")))
            kept = [p for p in parts if file_path(p) not in refused]
            if len(kept) != len(parts):
                changed = True
                if kept:
                    out.append({**message, "content": kept})
                continue
        out.append(dict(message))
    return out if changed else None
