"""load_vision_encoder: a checkpoint folder (original or native layout) -> a ready VisionEncoder.

Reads config.json and only the vision tower + projector tensors (see checkpoint_weights), builds
the encoder on the meta device, assigns the tensors in the caller's dtype on the caller's device,
and computes the fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from ivl_proto.dtypes import name_of_torch
from ivl_proto.errors import ErrorCode, ServingError

from ivl_vision.checkpoint_config import VisionCheckpointConfig, read_config
from ivl_vision.checkpoint_weights import read_tensors, sources_for, weight_map
from ivl_vision.encoder import VisionEncoder
from ivl_vision.fingerprint import fingerprint
from ivl_vision.model_info import VisionModelInfo

__all__ = ["VisionModelInfo", "build_random_encoder", "load_vision_encoder"]


def load_vision_encoder(
    model_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> VisionEncoder:
    folder = Path(model_path)
    _check_dtype(dtype)
    config = read_config(folder)
    with torch.device("meta"):
        encoder = VisionEncoder(config, attn_implementation)
    expected = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    available = weight_map(folder)
    tensors = read_tensors(folder, sources_for(expected, config.layout, available), available)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ServingError(
                ErrorCode.FAILED_PRECONDITION,
                f"{folder}: tensor for {name} has shape {tuple(tensors[name].shape)}; config.json implies {shape}",
            )
    state = {name: t.to(device=device, dtype=dtype).contiguous() for name, t in tensors.items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return _finish(encoder, config, folder.resolve().name, dtype, device)


def build_random_encoder(
    config: VisionCheckpointConfig,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> VisionEncoder:
    """An encoder of the given sizes with random weights (benchmarks; speed does not depend on values)."""
    _check_dtype(dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        encoder = VisionEncoder(config, attn_implementation)
    encoder.to(dtype=dtype)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, fan_in**-0.5)
            elif "lambda" in name:
                parameter.fill_(0.5)
    return _finish(encoder, config, "random", dtype, device)


def _check_dtype(dtype: torch.dtype) -> None:
    name_of_torch(dtype, "the vision encoder")  # INVALID_ARGUMENT for dtypes off the table


def _finish(
    encoder: VisionEncoder, config: VisionCheckpointConfig, model_id: str, dtype: torch.dtype, device: str
) -> VisionEncoder:
    encoder.eval()
    encoder.requires_grad_(False)
    dtype_name = name_of_torch(dtype)
    encoder.info = VisionModelInfo(
        model_id=model_id,
        layout=config.layout,
        llm_hidden_size=config.llm_hidden_size,
        vision_hidden_size=config.tower.hidden_size,
        image_size=config.image_size,
        patch_size=config.tower.patch_size,
        tokens_per_tile=config.tokens_per_tile,
        ps_version=config.ps_version,
        select_layer=config.select_layer,
        downsample_ratio=config.downsample_ratio,
        template=config.template,
        flavour=config.flavour,
        default_max_tiles=config.max_dynamic_patch,
        default_min_tiles=config.min_dynamic_patch,
        use_thumbnail=config.use_thumbnail,
        dynamic_image_size=config.dynamic_image_size,
        dtype=dtype_name,
        device=str(device),
        fingerprint=fingerprint(config, encoder.state_dict(), dtype_name),
        vision_layers_run=config.layers_to_run,
    )
    return encoder
