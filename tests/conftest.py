"""Shared fixtures: tiny InternVL checkpoints written by ivl_tiny, cached per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread() -> None:
    """The CI machine has 2 cores shared by everything; keep each torch op on one thread."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ckpt_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """factory(layout="original", **TinySpec fields) -> folder; one write per (spec, layout).

    Treat the folder as read-only (copy it first to change it): other tests share it.
    """
    from ivl_tiny import TinySpec, write_tiny_checkpoint

    cache: dict[tuple[TinySpec, str], Path] = {}

    def factory(layout: str = "original", **spec_kwargs: Any) -> Path:
        spec = TinySpec(**spec_kwargs)
        key = (spec, layout)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{spec.vision}-{spec.llm}-{spec.ps_version}-{layout}")
            cache[key] = write_tiny_checkpoint(folder / "ckpt", spec, layout=layout)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_original(tiny_ckpt_factory: Callable[..., Path]) -> Path:
    """300m vision, internlm2 LLM, ps_version v2, original OpenGVLab layout."""
    return tiny_ckpt_factory("original")


@pytest.fixture(scope="session")
def tiny_native(tiny_ckpt_factory: Callable[..., Path]) -> Path:
    """The same spec (same weights) as tiny_original, transformers-native layout."""
    return tiny_ckpt_factory("native")
