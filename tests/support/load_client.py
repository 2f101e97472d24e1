"""A measuring OpenAI-HTTP chat client for load tests and benches: TTFT, status, error code per request.

    outcome = await stream_chat(client, base_url, chat_body("What is this?", [unique_png(7)]))
    outcome.ok, outcome.status, outcome.ttft_s, outcome.error_code, outcome.cache_hits

`run_clients(base_url, clients=16, requests=64, make_body=...)` runs `clients` concurrent loops that
share `requests` request bodies (make_body(i) builds the i-th) and returns every outcome in order.
Every request ends as exactly one ChatOutcome: answered (200 + final chunk), refused (an HTTP error
status with an OpenAI error body, or an error event in the stream) or failed (transport error,
no final chunk: what a load test must never see).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image


def unique_png(seed: int, width: int = 480, height: int = 320) -> bytes:
    """A PNG that differs for every seed (so it is new to the cache); smooth, compresses like a picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x + seed) % 256, (y * 3 + seed * 7) % 256, (x + y + seed * 13) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-4, 5, size=base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(
    text: str, images: list[bytes] | None = None, *, max_tokens: int = 8, stream: bool = True, **extra: Any
) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images or []]
    content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, **extra}


@dataclass
class ChatOutcome:
    status: int = 0  # HTTP status (0: no response at all)
    ttft_s: float | None = None  # request start to the first content delta
    total_s: float = 0.0
    text: str = ""
    error_code: str = ""  # the OpenAI error body's "code" (ivl_proto ErrorCode value), or "transport"
    error_message: str = ""
    cache_hits: int | None = None
    finished: bool = False  # a final chunk (finish_reason) arrived
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finished and not self.error_code

    @property
    def refused_clearly(self) -> bool:
        """Refused with a status and an error code a client can act on (not a transport failure)."""
        return self.error_code not in ("", "transport", "internal") and (self.status >= 400 or self.status == 200)


async def stream_chat(client: httpx.AsyncClient, base_url: str, body: dict[str, Any]) -> ChatOutcome:
    """POST a streaming chat; parse the SSE events; never raises (a failure is an outcome)."""
    outcome = ChatOutcome()
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                _read_error(outcome, await response.aread())
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    _read_event(outcome, json.loads(line[6:]), start)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        outcome.error_code = outcome.error_code or "transport"
        outcome.error_message = f"{type(error).__name__}: {error}"
    outcome.total_s = time.perf_counter() - start
    return outcome


def _read_error(outcome: ChatOutcome, raw: bytes) -> None:
    try:
        error = json.loads(raw)["error"]
        outcome.error_code, outcome.error_message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        outcome.error_code, outcome.error_message = "unparsed", raw[:300].decode(errors="replace")


def _read_event(outcome: ChatOutcome, event: dict[str, Any], start: float) -> None:
    if "error" in event:
        outcome.error_code = str(event["error"].get("code", "unparsed"))
        outcome.error_message = str(event["error"].get("message", ""))
        return
    for choice in event.get("choices", []):
        content = choice.get("delta", {}).get("content")
        if content:
            if outcome.ttft_s is None:
                outcome.ttft_s = time.perf_counter() - start
            outcome.text += content
        if choice.get("finish_reason"):
            outcome.finished = True
            outcome.extra = event.get("ivl", {})
            outcome.cache_hits = outcome.extra.get("cache_hits")
            if outcome.ttft_s is None:  # nothing generated: the first token time is the end
                outcome.ttft_s = time.perf_counter() - start


async def run_clients(
    base_url: str, clients: int, requests: int, make_body: Callable[[int], dict[str, Any]],
    timeout_s: float = 120.0,
) -> list[ChatOutcome]:
    """`clients` concurrent workers take request indices 0..requests-1 in order; outcomes by index."""
    outcomes: list[ChatOutcome | None] = [None] * requests
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            for index in next_index:
                outcomes[index] = await stream_chat(client, base_url, make_body(index))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return [o for o in outcomes if o is not None]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def split_outcomes(outcomes: list[ChatOutcome]) -> tuple[list[ChatOutcome], list[ChatOutcome], list[ChatOutcome]]:
    """(answered, refused with a clear 4xx/5xx status, errors): every outcome lands in exactly one list."""
    answered = [o for o in outcomes if o.ok]
    refused = [o for o in outcomes if not o.ok and o.refused_clearly and o.status >= 400]
    errors = [o for o in outcomes if not o.ok and not (o.refused_clearly and o.status >= 400)]
    return answered, refused, errors
