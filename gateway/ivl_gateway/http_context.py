"""What the HTTP routes share, kept on `app.state.ivl` (no module globals): settings, the chat service, the
image fetcher, and the served model names."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from ivl_proto.errors import ErrorCode, ServingError, invalid

from ivl_gateway.chat import ChatService
from ivl_gateway.image_fetch import ImageFetcher
from ivl_gateway.settings import GatewaySettings


@dataclass
class HttpContext:
    settings: GatewaySettings
    chat: ChatService
    fetcher: ImageFetcher

    @classmethod
    def of(cls, request: Request) -> HttpContext:
        context = request.app.state.ivl
        assert isinstance(context, HttpContext)
        return context

    async def served_names(self) -> list[str]:
        """The model's name (IVL_GATEWAY_MODEL_NAME, else the LLM's model id) first, then the aliases."""
        primary = self.settings.model_name or (await self.chat.llm.info()).model_id
        return [primary, *(a for a in self.settings.model_aliases if a != primary)]

    async def model_for(self, requested: str | None) -> str:
        """The name a response reports; 404 model_not_found for a name this server does not serve."""
        names = await self.served_names()
        if requested is None or requested in names:
            return requested or names[0]
        raise ServingError(
            ErrorCode.NOT_FOUND,
            f"The model '{requested[:200]}' does not exist on this server; it serves {', '.join(repr(n) for n in names)}",
            param="model", api_code="model_not_found",
        )


def decode_json(raw: bytes | bytearray) -> Any:
    """The body as JSON (UTF-8/16/32), or a 400: malformed, nested too deeply, NaN/Infinity."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise invalid(
            "the request body is nested too deeply to parse: JSON arrays and objects may nest at most about "
            f"{sys.getrecursionlimit() // 2} levels"
        ) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise invalid(f"the request body is not valid JSON: {error}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range of a 64-bit float")
    return value
