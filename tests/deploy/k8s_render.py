"""The kustomize trees of deploy/k8s rendered by the real `kubectl kustomize`, and lookups over the result."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"

# name -> (kustomization folder, extra components added on top in a throw-away kustomization)
TREES: dict[str, tuple[Path, tuple[Path, ...]]] = {
    "base": (K8S / "base", ()),
    "cpu-demo": (K8S / "overlays" / "cpu-demo", ()),
    "gpu": (K8S / "overlays" / "gpu", ()),
    "gpu+model-from-image": (K8S / "overlays" / "gpu", (K8S / "components" / "model-from-image",)),
}
OVERLAYS = ("cpu-demo", "gpu", "gpu+model-from-image")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise AssertionError(
            "kubectl is not installed: the Kubernetes manifests are rendered with `kubectl kustomize` "
            "(kubectl >= 1.27 bundles kustomize v5)"
        )
    return path


def render(name: str, work_dir: Path) -> str:
    """The YAML stream of one tree, as `kubectl kustomize` writes it."""
    folder, components = TREES[name]
    if components:
        work_dir.mkdir(parents=True, exist_ok=True)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(folder, work_dir)],
            "components": [os.path.relpath(c, work_dir) for c in components],
        }
        (work_dir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        folder = work_dir
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return result.stdout


@dataclass
class Rendered:
    """One rendered tree: every document, and lookups by kind and name."""

    name: str
    text: str
    docs: list[dict[str, Any]]

    @classmethod
    def of(cls, name: str, text: str) -> Rendered:
        return cls(name, text, [doc for doc in yaml.safe_load_all(text) if doc])

    def kind(self, kind: str) -> dict[str, dict[str, Any]]:
        return {doc["metadata"]["name"]: doc for doc in self.docs if doc["kind"] == kind}

    @property
    def deployments(self) -> dict[str, dict[str, Any]]:
        return self.kind("Deployment")

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.kind("Service")

    @property
    def namespace(self) -> str:
        namespaces = {doc["metadata"].get("namespace", "default") for doc in self.docs if doc["kind"] != "Namespace"}
        assert len(namespaces) == 1, f"{self.name}: resources in several namespaces {namespaces}"
        return namespaces.pop()

    def containers(self, *, init: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """(deployment name, container) for every container (and init container) of every Deployment."""
        for name, deployment in self.deployments.items():
            spec = deployment["spec"]["template"]["spec"]
            for container in [*(spec.get("initContainers", []) if init else []), *spec["containers"]]:
                yield name, container

    def deployment_selected_by(self, selector: dict[str, str]) -> dict[str, Any]:
        """The one Deployment whose pod labels match `selector` (matchLabels semantics)."""
        matches = [
            d for d in self.deployments.values()
            if selector and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"{self.name}: selector {selector} matches {len(matches)} Deployments"
        return matches[0]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(deployment)["containers"]
    return container


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    """name -> containerPort."""
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or container port name) as a declared container port number."""
    ports = container_ports(container)
    if isinstance(port, str):
        assert port in ports, f"{container['name']}: port name {port!r} is not declared ({ports})"
        return ports[port]
    assert port in ports.values(), f"{container['name']}: port {port} is not declared ({ports})"
    return port


def env_values(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> the env entry (value or valueFrom), duplicates refused."""
    names = [entry["name"] for entry in container.get("env", [])]
    assert len(names) == len(set(names)), f"{container['name']}: duplicate env vars {names}"
    return {entry["name"]: entry for entry in container.get("env", [])}
