"""Operations: /health (liveness), /ready (vision + LLM reachable and compatible), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ivl_gateway.http_context import HttpContext

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = await HttpContext.of(request).chat.readiness()
    return JSONResponse({"ready": state.ready, **state.detail}, status_code=200 if state.ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = HttpContext.of(request).chat.metrics
    return Response(registry.render(), media_type=registry.content_type)
