"""Reference-style InternVL tiling, written the way the public reference code works.

Used by the tests (and bench/bench_preprocess.py) as the yardstick for ivl_vision.tiling:
- the grid choice: a set of candidate grids sorted by area with the stable `sorted`, then the
  strict-less / equal-with-area rule on float64 aspect ratios;
- the pixels: PIL resize of the whole image (PIL's default resample for RGB, BICUBIC), each tile
  cropped with PIL, the thumbnail a PIL resize of the whole image, then ToTensor (torch float32
  divided by 255) and Normalize (subtract mean, divide by std with float32 tensors), as torchvision
  does; torchvision itself does not install beside the CPU torch here.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_target_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def reference_closest_grid(
    width: int,
    height: int,
    min_num: int,
    max_num: int,
    image_size: int,
    target_grids: list[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """target_grids: reference_target_grids(min_num, max_num), when the caller already has it."""
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    if target_grids is None:
        target_grids = reference_target_grids(min_num, max_num)
    for ratio in target_grids:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def reference_tiles(
    image: Image.Image, min_num: int, max_num: int, image_size: int, use_thumbnail: bool
) -> list[Image.Image]:
    width, height = image.size
    cols, rows = reference_closest_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for i in range(cols * rows):
        left = (i % cols) * image_size
        top = (i // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def to_tensor(tile: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return array.to(dtype=torch.get_default_dtype()).div(255)


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def reference_pixels(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> torch.Tensor:
    """(num_tiles, 3, S, S) float32, the reference's pixel_values for one RGB image."""
    tiles = reference_tiles(image, min_num, max_num, image_size, use_thumbnail)
    return torch.stack([normalize(to_tensor(tile)) for tile in tiles])
