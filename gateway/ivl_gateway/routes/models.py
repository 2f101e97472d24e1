"""GET /v1/models and /v1/models/{id} (API key and rate limit: http_edge.EdgeMiddleware)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ivl_gateway.http_context import HttpContext
from ivl_gateway.openai_response import ErrorResponse, Model, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    names = await HttpContext.of(request).served_names()
    return ModelList(data=[Model(id=name) for name in names])


@router.get("/{model_id:path}", response_model=Model, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model_id: str, request: Request) -> Model:
    return Model(id=await HttpContext.of(request).model_for(model_id))
