"""FrontendSettings: every knob of the browser chat, read from IVL_FRONTEND_* variables or passed explicitly."""

from __future__ import annotations

from ivl_proto.tiling_limits import MAX_TILES_LIMIT
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FrontendSettings(BaseSettings):
    """Settings of the Gradio UI (env prefix IVL_FRONTEND_)."""

    model_config = SettingsConfigDict(env_prefix="IVL_FRONTEND_", extra="ignore")

    # The gateway's gRPC Chat API and an optional API key it expects.
    gateway_address: str = "127.0.0.1:50050"
    gateway_api_key: str = ""
    gateway_timeout_s: float = Field(default=600.0, gt=0)
    info_timeout_s: float = Field(default=5.0, gt=0)
    # Where the page is served.
    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=0, le=65535)
    root_path: str = ""
    # A public gradio.live link (needs internet; offline the UI keeps serving locally).
    share: bool = False
    # "user:pass" (several separated by commas) protects the page with a login.
    auth: str = ""
    # How many chats generate at once, and how many wait in the queue.
    concurrency: int = Field(default=4, ge=1, le=256)
    max_queue: int = Field(default=64, ge=1)
    # Defaults of the controls.
    system_prompt: str = ""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=256, ge=1, le=8192)
    max_tiles: int = Field(default=12, ge=1, le=MAX_TILES_LIMIT)
    use_thumbnail: bool = True
    max_images_per_message: int = Field(default=8, ge=1, le=64)
    # Tile previews: rendered in `preview_workers` sandboxed worker processes (never on the event loop; each
    # with preview_memory_mb of address space), killed and given up after preview_timeout_s (the caption is
    # shown without its picture), refused from the header above preview_max_pixels or preview_max_jpeg_scans
    # (decode-time bombs), files deleted after preview_ttl_s.
    preview_workers: int = Field(default=2, ge=1, le=32)
    preview_timeout_s: float = Field(default=5.0, gt=0)
    preview_memory_mb: int = Field(default=512, ge=64)
    preview_max_pixels: int = Field(default=80_000_000, ge=1)
    preview_max_jpeg_scans: int = Field(default=100, ge=1)
    preview_ttl_s: float = Field(default=3600.0, gt=0)
    # A streamed reply updates the page at most every stream_interval_s (deltas in between are merged):
    # one update per token (~100/s from a fast model) froze the browser tab for tens of seconds.
    stream_interval_s: float = Field(default=0.1, ge=0, le=2)
    title: str = "InternVL chat"

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, value: str) -> str:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            user, sep, password = pair.partition(":")
            if not sep or not user or not password:
                raise ValueError(f"auth must be 'user:password' (comma-separated for several); got {pair!r}")
        return value

    def auth_pairs(self) -> list[tuple[str, str]]:
        """The logins as (user, password) pairs; empty = no login."""
        pairs = []
        for pair in filter(None, (p.strip() for p in self.auth.split(","))):
            user, _, password = pair.partition(":")
            pairs.append((user, password))
        return pairs
