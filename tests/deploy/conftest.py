"""Every kustomize tree of deploy/k8s rendered once per session with the real `kubectl kustomize`."""

from __future__ import annotations

import pytest
from k8s_render import TREES, Rendered, render


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    work = tmp_path_factory.mktemp("kustomize")
    return {name: Rendered.of(name, render(name, work / name)) for name in TREES}
