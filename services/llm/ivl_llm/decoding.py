"""Turning generated token ids into text deltas: incremental UTF-8-safe detokenizing, stop strings and the
reference's final strip()."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Emits text as tokens arrive, never half a character.

    Decodes a short window of ids (from `prefix` to the end) and emits what it adds to the decode of
    the window's already-emitted part; a window ending in U+FFFD (an incomplete UTF-8 sequence split
    over byte tokens, e.g. a Chinese character) waits for the next token. The window keeps
    tokenizers' leading-space handling consistent between the two decodes.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (possibly an incomplete character, shown as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if after.startswith(before) else after


class StopStringMatcher:
    """Finds stop strings across delta boundaries; text that could begin a stop string is held back."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `stopped` when a stop string was found."""
        if self.stopped:
            return ""
        buffer = self.pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return buffer[: min(hits)]
        hold = self._held_suffix(buffer)
        self.pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def _held_suffix(self, buffer: str) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if stop.startswith(buffer[len(buffer) - size :]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class ReplyStripper:
    """Streams a reply the way the reference returns it, `reply.strip()`: leading whitespace is never
    sent, trailing whitespace is held back until more text follows, so the deltas concatenate to
    exactly the stripped reply and no whitespace-only delta ends a stream."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        buffer = self.held + text
        body = buffer.rstrip()
        self.held = buffer[len(body) :]
        return body
