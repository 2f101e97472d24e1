"""Fixtures of the gateway tests: the real stack (redis-server + vision + LLM + gateway) on a tiny checkpoint."""

from __future__ import annotations

import pytest
from gateway_helpers import GATEWAY_OVERRIDES, LLM_OVERRIDES
from support.stack import running_stack


@pytest.fixture(scope="module")
def stack(tiny_original):
    with running_stack(tiny_original, gateway=GATEWAY_OVERRIDES, llm=LLM_OVERRIDES) as running:
        yield running
