"""VisionEncoder: InternViT tower -> drop CLS -> pixel shuffle -> mlp1 projector, per 448 px tile.

Built from transformers' native InternVL modules (InternVLVisionModel, InternVLMultiModalProjector);
only the tower layers whose output is used (select_layer) are built and loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from ivl_proto.errors import ErrorCode, ServingError
from torch import nn
from transformers import InternVLConfig, InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

from ivl_vision.checkpoint_config import VisionCheckpointConfig
from ivl_vision.pixel_shuffle import pixel_shuffle

if TYPE_CHECKING:
    from ivl_vision.model_info import VisionModelInfo


def transformers_configs(
    config: VisionCheckpointConfig, attn_implementation: str = "sdpa"
) -> tuple[InternVLVisionConfig, InternVLConfig]:
    """The native vision config (only the layers that run) and the InternVLConfig the projector reads."""
    tower = config.tower
    vision = InternVLVisionConfig(
        hidden_size=tower.hidden_size,
        num_hidden_layers=config.layers_to_run,
        num_attention_heads=tower.num_attention_heads,
        intermediate_size=tower.intermediate_size,
        norm_type=tower.norm_type,
        use_qk_norm=tower.use_qk_norm,
        attention_bias=tower.attention_bias,
        layer_norm_eps=tower.layer_norm_eps,
        hidden_act=tower.hidden_act,
        image_size=tower.image_size,
        patch_size=tower.patch_size,
        num_channels=tower.num_channels,
        use_mean_pooling=True,  # no final norm after the tower, as in InternViT
        attn_implementation=attn_implementation,
    )
    full = InternVLConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", "hidden_size": config.llm_hidden_size},
        downsample_ratio=config.downsample_ratio,
        projector_hidden_act=config.projector_hidden_act,
    )
    return vision, full


class VisionEncoder(nn.Module):
    """Pixel tiles (N, 3, S, S) -> projected visual tokens (N, tokens_per_tile, llm_hidden)."""

    def __init__(self, config: VisionCheckpointConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        vision, full = transformers_configs(config, attn_implementation)
        self.config = config
        self.vision_tower = InternVLVisionModel(vision)
        self.multi_modal_projector = InternVLMultiModalProjector(full)
        self.info: VisionModelInfo | None = None  # set by the loader

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower.embeddings(pixel_values)
        for layer in self.vision_tower.encoder.layer:
            hidden = layer(hidden)
        patches = hidden[:, 1:, :]  # drop CLS
        folded = pixel_shuffle(patches, self.config.downsample_ratio, self.config.ps_version)
        return self.multi_modal_projector(folded)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear_1.weight.device

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised tiles (N, 3, S, S) -> (N, tokens_per_tile, llm_hidden) in the encoder's dtype."""
        size = self.config.image_size
        channels = self.config.tower.num_channels
        if not isinstance(pixel_values, torch.Tensor):
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"pixel_values must be a torch.Tensor, not {type(pixel_values).__name__}")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT,
                f"pixel_values must have shape (N, {channels}, {size}, {size}); got {tuple(pixel_values.shape)}",
            )
        if pixel_values.shape[0] == 0:
            return torch.empty(0, self.config.tokens_per_tile, self.config.llm_hidden_size, dtype=self.dtype, device=self.device)
        pixels = pixel_values.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            return self(pixels)
