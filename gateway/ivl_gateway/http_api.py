"""The HTTP API: FastAPI routers over typed pydantic request/response models (ivl_gateway.routes: chat
completions, models, operations), OpenAI-shaped errors for every status (http_errors), the public edges
(http_edge). `build_app(settings, chat_service)` returns the app; its shared state is `app.state.ivl`
(http_context.HttpContext), no module globals.
"""

from __future__ import annotations

from fastapi import FastAPI

from ivl_gateway.chat import ChatService
from ivl_gateway.edge_state import EdgeState
from ivl_gateway.http_context import HttpContext
from ivl_gateway.http_edge import install_edges
from ivl_gateway.http_errors import install_error_handlers
from ivl_gateway.image_fetch import ImageFetcher
from ivl_gateway.routes import chat, models, ops
from ivl_gateway.settings import GatewaySettings


def build_app(settings: GatewaySettings, chat_service: ChatService, edges: EdgeState | None = None) -> FastAPI:
    """The FastAPI app with its edges (http_edge: access log, content type, rate limit, API keys, body
    budget); `edges` is shared with the gRPC server (one budget and one rate limit per gateway)."""
    docs_on = settings.docs_access != "off"
    app = FastAPI(title="InternVL gateway", version="0.1.0", docs_url="/docs" if docs_on else None,
                  openapi_url="/openapi.json" if docs_on else None, redoc_url=None)
    app.state.ivl = HttpContext(settings, chat_service, ImageFetcher(settings))
    install_edges(app, edges or EdgeState.build(settings, chat_service.metrics))
    install_error_handlers(app)
    for router in (chat.router, models.router, ops.router):
        app.include_router(router)
    return app
