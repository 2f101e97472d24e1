"""What every pod of every tree promises: Pod Security "restricted", read-only root filesystem with scratch
emptyDirs, requests and limits, pinned images, no API token or service-link env, termination long enough for
the service's own drain; and the overlay specifics (GPUs for the model services, the demo model baked in)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from ivl_gateway.settings import GatewaySettings
from ivl_llm.settings import LLMSettings
from ivl_vision.settings import VisionSettings
from k8s_render import ROOT, TREES, Rendered, env_values, main_container, pod_spec

_UNITS = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
# Project images: name -> the Dockerfile that builds it.
DOCKERFILES = {
    "internvl-serve/vision-encoder": "services/vision_encoder/Dockerfile",
    "internvl-serve/llm": "services/llm/Dockerfile",
    "internvl-serve/gateway": "gateway/Dockerfile",
    "internvl-serve/frontend": "frontend/Dockerfile",
}
# Seconds a container may still need after its drain (release the model, flush logs).
SPARE_S = 10


def quantity(value: str | int) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * _UNITS[unit]


@pytest.mark.parametrize("name", list(TREES))
def test_pods_meet_the_restricted_profile_with_read_only_root_filesystems(rendered, name):
    tree: Rendered = rendered[name]
    for deployment_name, deployment in tree.deployments.items():
        spec = pod_spec(deployment)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, deployment_name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", deployment_name
        assert spec["automountServiceAccountToken"] is False, f"{deployment_name} needs no Kubernetes API token"
        # Service links would put e.g. IVL_FRONTEND_PORT=tcp://10.0.0.1:7860 into the settings' prefixes.
        assert spec["enableServiceLinks"] is False, deployment_name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{name}/{deployment_name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"], where
            assert "privileged" not in security and "runAsUser" not in security, where
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                writable = not mount.get("readOnly", False)
                kinds = set(volume) - {"name"}
                if writable:
                    assert kinds == {"emptyDir"}, f"{where}: {mount['mountPath']} is writable, so scratch only"
                else:
                    assert kinds <= {"configMap", "persistentVolumeClaim", "emptyDir", "secret"}, where
            if container["name"] in ("vision", "llm", "gateway", "frontend"):
                mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
                assert "emptyDir" in mounts["/tmp"], f"{where}: /tmp is a writable emptyDir"


@pytest.mark.parametrize("name", list(TREES))
def test_every_container_has_requests_within_limits(rendered, name):
    for deployment_name, container in rendered[name].containers():
        where = f"{name}/{deployment_name}/{container['name']}"
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), where
        for resource, request in requests.items():
            assert quantity(request) <= quantity(limits[resource]), f"{where}: {resource} request above its limit"
        if "nvidia.com/gpu" in limits:
            assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], f"{where}: whole GPUs"


@pytest.mark.parametrize("name", list(TREES))
def test_images_are_pinned(rendered, name):
    for deployment_name, container in rendered[name].containers():
        image = container["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{deployment_name}: {image} has no tag"
        assert tag != "latest" and not tag.startswith("latest-"), f"{deployment_name}: {image} is not pinned"
        assert container["imagePullPolicy"] == "IfNotPresent", deployment_name


def test_the_project_images_run_as_the_numeric_user_the_pods_declare(rendered):
    """runAsNonRoot can only be checked against a numeric USER; the pods run as that same user."""
    for image, dockerfile in DOCKERFILES.items():
        users = re.findall(r"^USER (\S+)$", (ROOT / dockerfile).read_text(), re.M)
        assert users, dockerfile
        uid, _, gid = users[0].partition(":")
        assert uid.isdigit() and gid.isdigit() and int(uid) > 0, f"{dockerfile}: USER {users[0]} is not numeric"
        for tree in rendered.values():
            for deployment in tree.deployments.values():
                if main_container(deployment)["image"].startswith(image + ":"):
                    pod = pod_spec(deployment)["securityContext"]
                    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid)), f"{tree.name}: {image}"


def _grace_s(container: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> float:
    """The drain the service itself does on SIGTERM (its grace_s setting as the manifest sets it)."""
    classes = {"vision": (VisionSettings, "IVL_VISION_"), "llm": (LLMSettings, "IVL_LLM_"),
               "gateway": (GatewaySettings, "IVL_GATEWAY_")}
    if container["name"] not in classes:
        return 0.0
    cls, prefix = classes[container["name"]]
    for env_name in [n for n in os.environ if n.startswith(prefix)]:
        monkeypatch.delenv(env_name)
    grace = env_values(container).get(f"{prefix}GRACE_S")
    if grace is not None:
        monkeypatch.setenv(f"{prefix}GRACE_S", grace["value"])
    overrides = {"model_path": str(tmp_path)} if "model_path" in cls.model_fields else {}
    return cls(**overrides).grace_s


@pytest.mark.parametrize("name", list(TREES))
def test_termination_grace_covers_the_pre_stop_wait_and_the_service_drain(rendered, name, tmp_path, monkeypatch):
    for deployment_name, deployment in rendered[name].deployments.items():
        container = main_container(deployment)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        drain = _grace_s(container, tmp_path, monkeypatch)
        period = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert period >= pre_stop + drain + SPARE_S, (
            f"{name}/{deployment_name}: terminationGracePeriodSeconds {period} < preStop {pre_stop} s "
            f"+ grace_s {drain} s + {SPARE_S} s: the kubelet would SIGKILL mid-drain"
        )
        if container["name"] in ("gateway", "frontend"):
            # Behind a ClusterIP Service/Ingress: keep serving while endpoints converge.
            assert pre_stop >= 5, f"{deployment_name}: a preStop wait before SIGTERM"
    # The long generations of the LLM get the longest drain.
    base = rendered["base"]
    assert _grace_s(main_container(base.deployments["ivl-llm"]), tmp_path, monkeypatch) >= 60


@pytest.mark.parametrize("name", list(TREES))
def test_model_services_get_time_to_load_weights_before_liveness_counts(rendered, name):
    for deployment in ("ivl-vision", "ivl-llm"):
        probe = main_container(rendered[name].deployments[deployment])["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 600, f"{name}/{deployment}: 10 min at least"


def test_cpu_demo_runs_the_demo_images_on_cpus_without_model_volumes(rendered):
    tree = rendered["cpu-demo"]
    for deployment in ("ivl-vision", "ivl-llm"):
        container = main_container(tree.deployments[deployment])
        assert container["image"].endswith(":0.1.0-demo"), "the image with the model baked in (--target demo)"
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert not pod_spec(tree.deployments[deployment]).get("tolerations")
    llm = env_values(main_container(tree.deployments["ivl-llm"]))
    assert llm["IVL_LLM_BACKEND"]["value"] == "transformers" and llm["IVL_LLM_DEVICE"]["value"] == "cpu"
    assert not tree.kind("PersistentVolumeClaim")


@pytest.mark.parametrize("name", ["gpu", "gpu+model-from-image"])
def test_gpu_overlay_puts_the_model_services_on_gpu_nodes_with_lmdeploy(rendered, name):
    tree = rendered[name]
    for deployment, prefix in (("ivl-vision", "IVL_VISION_"), ("ivl-llm", "IVL_LLM_")):
        spec = pod_spec(tree.deployments[deployment])
        container = main_container(tree.deployments[deployment])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        env = env_values(container)
        assert env[f"{prefix}DEVICE"]["value"] == "cuda" and env[f"{prefix}DTYPE"]["value"] == "bfloat16"
        assert tree.deployments[deployment]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    llm = main_container(tree.deployments["ivl-llm"])
    assert env_values(llm)["IVL_LLM_BACKEND"]["value"] == "lmdeploy"
    assert llm["image"].endswith(":0.1.0-lmdeploy")
    assert main_container(tree.deployments["ivl-vision"])["image"].endswith(":0.1.0-cuda")
    for deployment in ("ivl-gateway", "ivl-frontend", "ivl-redis"):
        assert "nvidia.com/gpu" not in main_container(tree.deployments[deployment])["resources"]["limits"]


def test_model_from_image_copies_the_checkpoint_in_an_init_container(rendered):
    tree = rendered["gpu+model-from-image"]
    for deployment in ("ivl-vision", "ivl-llm"):
        spec = pod_spec(tree.deployments[deployment])
        (init,) = spec["initContainers"]
        assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models/current"}]
        (mount,) = [m for m in main_container(tree.deployments[deployment])["volumeMounts"] if m["name"] == "model"]
        assert mount == {"name": "model", "mountPath": "/models/current", "readOnly": True}, "no subPath left"
        (model,) = [v for v in spec["volumes"] if v["name"] == "model"]
        assert set(model) == {"name", "emptyDir"}, "the PVC is gone"
