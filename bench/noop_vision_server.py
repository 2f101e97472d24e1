"""The vision service with a no-op encoder: `python bench/noop_vision_server.py` (settings from IVL_VISION_*).

Everything of the real service runs (gRPC, admission, the sandboxed decode workers, batching, the encode
function's conversions, the response) except the encoder forward: the loader given to `build_server(load=)`
returns an encoder whose `encode` returns zeros of the real output shape and dtype at once. What this
process can serve per CPU second is the CPU-side ceiling of the service (bench/bench_vision_ceiling.py).
Runs against whichever `ivl_vision` is first on PYTHONPATH (this checkout or another one, for before/after).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from ivl_proto.grpc_runtime import wait_for_stop_signal
from ivl_vision.checkpoint_config import read_config
from ivl_vision.model_info import VisionModelInfo
from ivl_vision.server import build_server
from ivl_vision.settings import VisionSettings


def load_settings() -> Any:
    """IVL_VISION_* settings, whichever checkout this runs against (the shared loader came with ivl_proto's
    service shape; before it, ivl_vision.settings had its own)."""
    try:
        from ivl_proto.settings_errors import load_settings as shared
    except ImportError:
        from ivl_vision.settings import load_settings as own

        return own()
    return shared(VisionSettings, "vision encoder")


class NoopEncoder:
    """encode(pixels (N, 3, S, S)) -> zeros (N, tokens_per_tile, llm_hidden) in the compute dtype, instantly."""

    def __init__(self, folder: Path, dtype: str, device: str) -> None:
        config = read_config(folder)
        self.dtype = getattr(torch, dtype)  # not ivl_proto.dtypes: this also runs against checkouts before it
        self.device = device
        self.tokens = config.tokens_per_tile
        self.hidden = config.llm_hidden_size
        self.info = VisionModelInfo(
            model_id=f"noop-{folder.name}", layout=config.layout, llm_hidden_size=config.llm_hidden_size,
            vision_hidden_size=config.tower.hidden_size, image_size=config.image_size,
            patch_size=config.tower.patch_size, tokens_per_tile=config.tokens_per_tile, ps_version=config.ps_version,
            select_layer=config.select_layer, downsample_ratio=config.downsample_ratio, template=config.template,
            flavour=config.flavour, default_max_tiles=config.max_dynamic_patch,
            default_min_tiles=config.min_dynamic_patch, use_thumbnail=config.use_thumbnail,
            dynamic_image_size=config.dynamic_image_size, dtype=dtype, device=device,
            fingerprint=f"noop-{dtype}-{config.llm_hidden_size}", vision_layers_run=0,
        )

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.zeros(pixels.shape[0], self.tokens, self.hidden, dtype=self.dtype, device=self.device)


def load_noop(settings: Any, device: str, dtype: str) -> NoopEncoder:
    return NoopEncoder(Path(settings.model_path), dtype, device)


async def main() -> None:
    settings = load_settings()
    server = build_server(settings, load=load_noop)
    stop = asyncio.create_task(wait_for_stop_signal())
    await asyncio.sleep(0)
    await server.start()
    await server.wait_ready()
    await stop
    await server.stop(0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main())
