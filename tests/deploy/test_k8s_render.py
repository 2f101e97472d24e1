"""`kubectl kustomize` renders the base and every overlay of deploy/k8s, each with the whole stack."""

from __future__ import annotations

import pytest
from k8s_render import OVERLAYS, TREES

STACK = {"ivl-redis", "ivl-vision", "ivl-llm", "ivl-gateway", "ivl-frontend"}


@pytest.mark.parametrize("name", list(TREES))
def test_every_tree_renders_the_whole_stack(rendered, name):
    tree = rendered[name]
    assert set(tree.deployments) == STACK
    assert set(tree.services) == STACK
    assert set(tree.kind("PodDisruptionBudget")) == STACK - {"ivl-redis"}
    assert "ivl-gateway" in tree.kind("HorizontalPodAutoscaler")
    assert {"ivl-default-deny", *STACK} == set(tree.kind("NetworkPolicy"))
    (config,) = tree.kind("ConfigMap").values()
    assert config["metadata"]["name"].startswith("ivl-redis-config-"), "generated with a content hash"


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_have_their_namespace_under_the_restricted_pod_security_profile(rendered, name):
    tree = rendered[name]
    (namespace,) = tree.kind("Namespace").values()
    assert namespace["metadata"]["name"] == tree.namespace != "default"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {"ivl-frontend", "ivl-gateway-http", "ivl-gateway-grpc"} == set(tree.kind("Ingress"))


def test_the_gpu_overlay_scales_the_model_services_on_queue_depth_and_reads_a_volume(rendered):
    for name in ("gpu", "gpu+model-from-image"):
        tree = rendered[name]
        assert set(tree.kind("HorizontalPodAutoscaler")) == {"ivl-gateway", "ivl-vision", "ivl-llm"}
        for deployment in ("ivl-vision", "ivl-llm", "ivl-gateway"):
            assert "replicas" not in tree.deployments[deployment]["spec"], f"{name}: the HPA owns {deployment}'s count"
    assert set(rendered["gpu"].kind("PersistentVolumeClaim")) == {"ivl-models"}
    assert not rendered["gpu+model-from-image"].kind("PersistentVolumeClaim")
    assert set(rendered["cpu-demo"].kind("HorizontalPodAutoscaler")) == {"ivl-gateway"}
