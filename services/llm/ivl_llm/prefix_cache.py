"""Prefix KV reuse across requests: an LRU of key/value tensors with a byte budget, keyed by content.

A request's key is its token ids plus, for every '<IMG_CONTEXT>' run, a digest of the embedding that fills
it (dtype, shape and bytes), so two different images behind the same placeholder ids never match. The
reusable length between a stored entry and a new prompt is their longest common token prefix, cut at
the first image whose digest differs. Stateless: no session ids; a chat's next turn finds the previous
turn's entry because its prompt starts with the same tokens (the previous reply included, as far as its
retokenized text agrees with the generated ids).

Entries hold the KV of everything a generation fed the model (prompt + generated tokens but the last),
per layer as [batch=1, kv_heads, tokens, head_dim] tensors that are never written to again: a request
that reuses one copies the prefix it needs into its own cache, so concurrent requests can share an
entry. A new entry replaces every entry whose prompt it covers (the older entry's only extra is its own
generated tail, which the next turn sends back as retokenized text and the new entry holds as far as
it agrees), so a chat keeps one entry, its latest turn; an entry already covered by a longer one is not
stored twice. Least recently used entries are
evicted until the total is within the budget; an entry larger than the whole budget is not kept.
One cache belongs to one loaded model (checkpoint, dtype, device): it is never shared across models.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ivl_llm.prompt import ImageEmbedding, PreparedPrompt

LayerKV = tuple[torch.Tensor, torch.Tensor]


def embedding_digest(embedding: ImageEmbedding) -> bytes:
    """Content hash of one image embedding (dtype, shape and bytes)."""
    array = np.ascontiguousarray(embedding.array)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{embedding.dtype}:{array.dtype.str}:{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.digest()


@dataclass(frozen=True)
class PromptKey:
    """What a sequence's KV depends on: its token ids and the content of every image run."""

    ids: np.ndarray  # int64 token ids
    images: tuple[tuple[int, int, bytes], ...]  # (start, end, digest) of each '<IMG_CONTEXT>' run, sorted

    @classmethod
    def of(cls, prompt: PreparedPrompt) -> PromptKey:
        ids = np.asarray(prompt.input_ids, dtype=np.int64)
        images = tuple(
            (start, end, embedding_digest(embedding))
            for (start, end), embedding in zip(prompt.embedding_ranges, prompt.embeddings, strict=True)
        )
        return cls(ids, images)

    def extended(self, extra_ids: Sequence[int]) -> PromptKey:
        return PromptKey(np.concatenate([self.ids, np.asarray(list(extra_ids), dtype=np.int64)]), self.images)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def common_prefix(a: PromptKey, b: PromptKey) -> int:
    """How many leading positions of `a` and `b` have the same token and, inside image runs, the same image."""
    n = min(len(a), len(b))
    different = np.flatnonzero(a.ids[:n] != b.ids[:n])
    length = int(different[0]) if different.size else n
    others = {start: (end, digest) for start, end, digest in b.images}
    for start, end, digest in a.images:
        if start >= length:
            break
        if others.get(start) != (end, digest):
            return start
    return length


@dataclass
class KVEntry:
    key: PromptKey
    layers: tuple[LayerKV, ...]
    nbytes: int
    prompt_length: int  # key[:prompt_length] was the request's prompt, the rest its generated tokens


@dataclass(frozen=True)
class PrefixHit:
    layers: tuple[LayerKV, ...]  # the entry's tensors; use only [..., :length, :]
    length: int  # reusable leading tokens


@dataclass(frozen=True)
class PrefixCacheStats:
    budget_bytes: int
    used_bytes: int
    entries: int
    hits: int
    misses: int
    evictions: int


def kv_nbytes(layers: Sequence[LayerKV]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


class PrefixKVCache:
    """Thread-safe: the decode loops of concurrent requests look up and store from worker threads."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, KVEntry] = OrderedDict()
        self._next_id = 0
        self._used = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def lookup(self, key: PromptKey, max_length: int) -> PrefixHit | None:
        """The entry sharing the longest prefix with `key` (at most `max_length` tokens), marked as used."""
        if not self.enabled or max_length <= 0:
            return None
        with self._lock:
            best_id, best_length = None, 0
            for entry_id, entry in self._entries.items():
                length = min(common_prefix(entry.key, key), max_length)
                if length > best_length:
                    best_id, best_length = entry_id, length
            if best_id is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(best_id)
            return PrefixHit(self._entries[best_id].layers, best_length)

    def store(self, key: PromptKey, layers: tuple[LayerKV, ...], prompt_length: int | None = None) -> bool:
        """Keep the KV of `key` (layers hold exactly len(key) positions, the first `prompt_length` of them
        the prompt's); False when it was not kept."""
        if not self.enabled or len(key) == 0:
            return False
        for k, v in layers:
            if k.shape[-2] != len(key) or v.shape[-2] != len(key):
                raise ValueError(f"KV holds {k.shape[-2]} positions but the key has {len(key)} tokens")
        nbytes = kv_nbytes(layers)
        if nbytes > self.budget_bytes:
            return False
        with self._lock:
            for entry_id, entry in list(self._entries.items()):
                shared = common_prefix(entry.key, key)
                if shared == len(key):  # already covered by an entry at least as long
                    self._entries.move_to_end(entry_id)
                    return False
                if shared >= entry.prompt_length:  # the new entry covers this one's prompt
                    self._drop(entry_id)
            prompt_length = len(key) if prompt_length is None else prompt_length
            self._entries[self._next_id] = KVEntry(key, layers, nbytes, prompt_length)
            self._next_id += 1
            self._used += nbytes
            while self._used > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
        return True

    def _drop(self, entry_id: int) -> None:
        self._used -= self._entries.pop(entry_id).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(
                self.budget_bytes, self._used, len(self._entries), self._hits, self._misses, self._evictions
            )
