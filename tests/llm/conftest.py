"""Fixtures for the LLM tests: tokenizers and tiny checkpoints written by ivl_tiny (session cache)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2_original(tiny_ckpt_factory: Callable[..., Path]) -> Path:
    return tiny_ckpt_factory("original", llm="qwen2")


@pytest.fixture(scope="session")
def tiny_qwen2_native(tiny_ckpt_factory: Callable[..., Path]) -> Path:
    return tiny_ckpt_factory("native", llm="qwen2")


@pytest.fixture(scope="session")
def internlm2_tokenizer(tiny_original: Path) -> Any:
    from ivl_llm.checkpoint import load_tokenizer

    return load_tokenizer(tiny_original)


@pytest.fixture(scope="session")
def tiny_internlm2_sentencepiece(tiny_ckpt_factory: Callable[..., Path]) -> Path:
    """InternLM2 with a tokenizer like the real releases': tokenizer.model + its own class (trust_remote_code)."""
    return tiny_ckpt_factory("original", tokenizer="sentencepiece")
