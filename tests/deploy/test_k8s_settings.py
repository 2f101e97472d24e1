"""Every env var the manifests set is a real setting of its service (imported settings classes, validated with
the manifests' values) or one of a few listed non-settings; every port agrees: listeners = containerPorts,
probes hit declared ports, Services/Ingresses/addresses reach the port the target container listens on."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
from ivl_frontend.settings import FrontendSettings
from ivl_gateway.settings import GatewaySettings
from ivl_llm.settings import LLMSettings
from ivl_vision.settings import VisionSettings
from k8s_render import (
    ROOT,
    TREES,
    Rendered,
    container_ports,
    env_values,
    main_container,
    pod_spec,
    resolve_port,
)
from pydantic_settings import BaseSettings

# container name -> (settings class, env prefix)
SETTINGS: dict[str, tuple[type[BaseSettings], str]] = {
    "vision": (VisionSettings, "IVL_VISION_"),
    "llm": (LLMSettings, "IVL_LLM_"),
    "gateway": (GatewaySettings, "IVL_GATEWAY_"),
    "frontend": (FrontendSettings, "IVL_FRONTEND_"),
}
# Env vars that are deliberately not settings of the service they are given to.
NOT_SETTINGS = {
    "frontend": {"GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "HOME"},
}
# Values standing in for the ivl-api-keys Secret's keys (docs/deploy.md creates it with these keys).
SECRET_SAMPLES = {
    "gateway-api-keys": "ui-key,client-key",
    "frontend-gateway-api-key": "ui-key",
    "frontend-auth": "admin:change-me",
}
# Which setting holds which listening port, per container port name.
LISTENERS = {
    "vision": {"grpc": "port", "metrics": "metrics_port"},
    "llm": {"grpc": "port", "metrics": "metrics_port"},
    "gateway": {"grpc": "grpc_port", "http": "http_port"},
    "frontend": {"http": "port"},
}
HOSTS = {"vision": ["host"], "llm": ["host"], "gateway": ["grpc_host", "http_host"], "frontend": ["host"]}


def _settings_of(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> BaseSettings:
    """The service's settings object as the container's environment builds it."""
    cls, prefix = SETTINGS[container["name"]]
    for name in [n for n in os.environ if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    for name, entry in env_values(container).items():
        if not name.startswith(prefix):
            continue
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "ivl-api-keys", f"{name}: secrets come from ivl-api-keys"
            monkeypatch.setenv(name, SECRET_SAMPLES[ref["key"]])
    # The model folder is in the image or on a volume, not on this machine: stand in a real folder.
    overrides = {"model_path": str(tmp_path)} if "model_path" in cls.model_fields else {}
    return cls(**overrides)


def _check_env_names(container: dict[str, Any], where: str) -> None:
    cls, prefix = SETTINGS[container["name"]]
    fields = set(cls.model_fields)
    for env_name in env_values(container):
        if env_name in NOT_SETTINGS.get(container["name"], set()):
            continue
        assert env_name.startswith(prefix), f"{where}: {env_name} is not an {prefix}* setting"
        field = env_name[len(prefix):].lower()
        assert field in fields, f"{where}: {env_name} is not a field of {cls.__name__}"


@pytest.mark.parametrize("name", list(TREES))
def test_every_env_var_is_a_setting_of_its_service_and_its_value_validates(rendered, name, monkeypatch, tmp_path):
    tree: Rendered = rendered[name]
    for deployment, container in tree.containers(init=False):
        if container["name"] == "redis":
            assert not container.get("env"), "redis is configured by redis.conf"
            continue
        _check_env_names(container, f"{name}/{deployment}")
        settings = _settings_of(container, monkeypatch, tmp_path)
        for host in HOSTS[container["name"]]:
            assert getattr(settings, host) in ("0.0.0.0", "::"), f"{deployment}: {host} must accept the kubelet and peers"


def test_a_misspelt_or_foreign_env_var_is_refused(rendered):
    """The check above can fail: a misspelt setting and another service's variable are refused."""
    gateway = main_container(rendered["base"].deployments["ivl-gateway"])
    for wrong in ("IVL_GATEWAY_VISION_ADRESSES", "IVL_VISION_GRACE_S", "GRADIO_ANALYTICS_ENABLED"):
        container = copy.deepcopy(gateway)
        container["env"].append({"name": wrong, "value": "x"})
        with pytest.raises(AssertionError, match=wrong):
            _check_env_names(container, "base/ivl-gateway")


@pytest.mark.parametrize("name", list(TREES))
def test_listeners_equal_container_ports_and_probes_hit_declared_ports(rendered, name, monkeypatch, tmp_path):
    tree: Rendered = rendered[name]
    for deployment, container in tree.containers(init=False):
        ports = container_ports(container)
        if container["name"] == "redis":
            config = next(iter(tree.kind("ConfigMap").values()))["data"]["redis.conf"]
            assert ports == {"redis": int(re.search(r"^port (\d+)$", config, re.M).group(1))}
        else:
            settings = _settings_of(container, monkeypatch, tmp_path)
            expected = {port_name: getattr(settings, field) for port_name, field in LISTENERS[container["name"]].items()}
            assert ports == expected, f"{name}/{deployment}: containerPorts {ports} != settings {expected}"
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_kind)
            if probe is None:
                continue
            action = next(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe)
            if action == "exec":
                assert "-p" in probe["exec"]["command"], "redis-cli must name the port"
                resolve_port(container, int(probe["exec"]["command"][probe["exec"]["command"].index("-p") + 1]))
            else:
                resolve_port(container, probe[action]["port"])
        assert {"readinessProbe", "livenessProbe"} <= set(container), f"{deployment}: readiness and liveness probes"
        if container["name"] in ("vision", "llm"):
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert "grpc" in container[probe_kind], f"{deployment}: {probe_kind} is a grpc.health.v1 probe"


@pytest.mark.parametrize("name", list(TREES))
def test_services_target_the_ports_their_pods_listen_on(rendered, name):
    tree: Rendered = rendered[name]
    for service_name, service in tree.services.items():
        deployment = tree.deployment_selected_by(service["spec"]["selector"])
        container = main_container(deployment)
        for port in service["spec"]["ports"]:
            target = resolve_port(container, port.get("targetPort", port["port"]))
            # Clients dial the Service port; for headless Services it is the pod port itself.
            assert port["port"] == target, f"{service_name}: port {port['port']} != targetPort {target}"


def _service_port(tree: Rendered, host: str, port: int, *, headless: bool) -> None:
    assert host in tree.services, f"{tree.name}: no Service {host}"
    spec = tree.services[host]["spec"]
    assert (spec.get("clusterIP") == "None") == headless, f"{host}: headless must be {headless}"
    assert port in [p["port"] for p in spec["ports"]], f"{host} has no port {port}"


@pytest.mark.parametrize("name", list(TREES))
def test_addresses_the_services_are_given_reach_real_service_ports(rendered, name, monkeypatch, tmp_path):
    tree: Rendered = rendered[name]
    gateway = _settings_of(main_container(tree.deployments["ivl-gateway"]), monkeypatch, tmp_path)
    for targets, service in ((gateway.vision_addresses, "ivl-vision"), (gateway.llm_addresses, "ivl-llm")):
        (target,) = targets
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
        assert match, f"{target}: the gateway must balance over the headless Service (grpc's dns:///NAME:PORT)"
        assert match.group(1) == service
        _service_port(tree, service, int(match.group(2)), headless=True)
    redis = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", gateway.redis_url)
    assert redis, gateway.redis_url
    _service_port(tree, redis.group(1), int(redis.group(2)), headless=False)
    frontend = _settings_of(main_container(tree.deployments["ivl-frontend"]), monkeypatch, tmp_path)
    host, _, port = frontend.gateway_address.rpartition(":")
    _service_port(tree, host, int(port), headless=False)
    assert int(port) == gateway.grpc_port


@pytest.mark.parametrize("name", [n for n in TREES if n != "base"])
def test_ingress_backends_and_network_policy_ports_exist(rendered, name):
    tree: Rendered = rendered[name]
    for ingress in tree.kind("Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                _service_port(tree, backend["name"], backend["port"]["number"], headless=False)
    for policy in tree.kind("NetworkPolicy").values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector:
            continue
        container = main_container(tree.deployment_selected_by(selector))
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                resolve_port(container, port["port"])


def test_the_secret_keys_the_manifests_read_are_the_ones_the_docs_create(rendered):
    keys = {
        entry["valueFrom"]["secretKeyRef"]["key"]
        for tree in rendered.values()
        for _, container in tree.containers()
        for entry in env_values(container).values()
        if "valueFrom" in entry
    }
    assert keys == set(SECRET_SAMPLES)
    docs = (ROOT / "docs" / "deploy.md").read_text()
    created = set(re.findall(r"--from-literal=([a-z-]+)=", docs))
    assert keys <= created, f"docs/deploy.md must create the Secret keys {sorted(keys - created)}"


def test_model_paths_point_at_the_folder_the_images_and_volumes_provide(rendered):
    for name, tree in rendered.items():
        for deployment in ("ivl-vision", "ivl-llm"):
            container = main_container(tree.deployments[deployment])
            prefix = SETTINGS[container["name"]][1]
            assert env_values(container)[f"{prefix}MODEL_PATH"]["value"] == "/models/current"
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            if name.startswith("gpu"):
                assert mounts["/models/current"].get("readOnly") is True, f"{name}/{deployment}: model mounted read-only"
            else:
                assert "/models/current" not in mounts, f"{name}: the model is in the image"
        volumes = pod_spec(tree.deployments["ivl-vision"]).get("volumes", [])
        if name == "cpu-demo":
            assert all("emptyDir" in v for v in volumes), "cpu-demo: no volumes but scratch space"
