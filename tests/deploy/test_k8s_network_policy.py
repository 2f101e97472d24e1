"""The rendered NetworkPolicies evaluated with Kubernetes' semantics (isolation by selection, allow rules
unioned, ingress AND egress must both allow) over every pair of pods and ports: exactly the intended paths
are open, nothing else."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from k8s_render import OVERLAYS, Rendered, container_ports, main_container


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ports: tuple[tuple[str, int, str], ...] = field(default=())  # (name, number, protocol)

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """LabelSelector semantics (matchLabels and matchExpressions); {} selects everything."""
    if selector is None:
        return False
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


class Cluster:
    def __init__(self, policies: list[dict[str, Any]], namespaces: dict[str, dict[str, str]]) -> None:
        self.policies = policies
        self.namespaces = namespaces

    def _peer_matches(self, peer: dict[str, Any], policy_namespace: str, pod: Pod) -> bool:
        assert "ipBlock" not in peer, "ipBlock peers are not expected here"
        if "namespaceSelector" in peer:
            if not _matches(peer["namespaceSelector"], self.namespaces[pod.namespace]):
                return False
        elif pod.namespace != policy_namespace:
            return False
        return _matches(peer.get("podSelector", {}), pod.label_dict)

    @staticmethod
    def _port_matches(ports: list[dict[str, Any]] | None, target: Pod, number: int, protocol: str) -> bool:
        if not ports:
            return True
        names = {name: (n, proto) for name, n, proto in target.ports}
        for port in ports:
            if port.get("protocol", "TCP") != protocol:
                continue
            wanted = port.get("port")
            if wanted is None:
                return True
            if isinstance(wanted, str):
                wanted = names.get(wanted, (None, None))[0]
            if wanted == number or (port.get("endPort") and wanted <= number <= port["endPort"]):
                return True
        return False

    def _selecting(self, pod: Pod, direction: str) -> list[dict[str, Any]]:
        return [
            p for p in self.policies
            if p["metadata"]["namespace"] == pod.namespace
            and direction in p["spec"].get("policyTypes", ["Ingress", *(["Egress"] if "egress" in p["spec"] else [])])
            and _matches(p["spec"]["podSelector"], pod.label_dict)
        ]

    def allowed(self, source: Pod, target: Pod, number: int, protocol: str = "TCP") -> bool:
        ingress = self._selecting(target, "Ingress")
        ingress_ok = not ingress or any(
            (not rule.get("from") or any(self._peer_matches(peer, target.namespace, source) for peer in rule["from"]))
            and self._port_matches(rule.get("ports"), target, number, protocol)
            for policy in ingress for rule in policy["spec"].get("ingress", [])
        )
        egress = self._selecting(source, "Egress")
        egress_ok = not egress or any(
            (not rule.get("to") or any(self._peer_matches(peer, source.namespace, target) for peer in rule["to"]))
            and self._port_matches(rule.get("ports"), target, number, protocol)
            for policy in egress for rule in policy["spec"].get("egress", [])
        )
        return ingress_ok and egress_ok


def _world(tree: Rendered, policies: list[dict[str, Any]]) -> tuple[Cluster, dict[str, Pod]]:
    namespace = tree.namespace
    pods = {}
    for name, deployment in tree.deployments.items():
        container = main_container(deployment)
        ports = tuple((n, p, "TCP") for n, p in container_ports(container).items())
        labels = tuple(sorted(deployment["spec"]["template"]["metadata"]["labels"].items()))
        pods[name] = Pod(name, namespace, labels, ports)
    http = (("http", 80, "TCP"),)
    pods["ingress-controller"] = Pod("ingress-controller", "ingress-nginx", (("app", "ingress-nginx"),), http)
    pods["prometheus"] = Pod("prometheus", "monitoring", (("app", "prometheus"),), http)
    pods["kube-dns"] = Pod("kube-dns", "kube-system", (("k8s-app", "kube-dns"),), (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")))
    # Something else running in the same namespace, and a pod of another tenant.
    pods["intruder"] = Pod("intruder", namespace, (("app", "debug-shell"),), http)
    pods["other-tenant"] = Pod("other-tenant", "tenant-b", (("app", "ivl-gateway"),), http)
    namespaces = {
        ns: {"kubernetes.io/metadata.name": ns} for ns in {p.namespace for p in pods.values()}
    }
    return Cluster(policies, namespaces), pods


# (source, target, port, protocol): the only open paths.
EXPECTED = {
    ("ingress-controller", "ivl-frontend", 7860, "TCP"),
    ("ingress-controller", "ivl-gateway", 8000, "TCP"),
    ("ingress-controller", "ivl-gateway", 50050, "TCP"),
    ("ivl-frontend", "ivl-gateway", 50050, "TCP"),
    ("prometheus", "ivl-gateway", 8000, "TCP"),
    ("prometheus", "ivl-vision", 9090, "TCP"),
    ("prometheus", "ivl-llm", 9090, "TCP"),
    ("ivl-gateway", "ivl-vision", 50051, "TCP"),
    ("ivl-gateway", "ivl-llm", 50052, "TCP"),
    ("ivl-gateway", "ivl-redis", 6379, "TCP"),
    ("ivl-gateway", "kube-dns", 53, "UDP"),
    ("ivl-gateway", "kube-dns", 53, "TCP"),
    ("ivl-frontend", "kube-dns", 53, "UDP"),
    ("ivl-frontend", "kube-dns", 53, "TCP"),
}
OUTSIDE = {"ingress-controller", "prometheus", "kube-dns", "other-tenant"}  # pods our policies don't select


def _open_paths(tree: Rendered, policies: list[dict[str, Any]]) -> set[tuple[str, str, int, str]]:
    cluster, pods = _world(tree, policies)
    open_paths = set()
    for source in pods.values():
        for target in pods.values():
            if source is target or (source.name in OUTSIDE and target.name in OUTSIDE):
                continue  # traffic between pods we don't manage is not ours to judge
            for _, number, protocol in target.ports:
                if cluster.allowed(source, target, number, protocol):
                    open_paths.add((source.name, target.name, number, protocol))
    return open_paths


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_the_intended_paths_are_open(rendered, name):
    tree = rendered[name]
    policies = list(tree.kind("NetworkPolicy").values())
    assert _open_paths(tree, policies) == EXPECTED


def test_without_the_default_deny_the_evaluation_would_see_open_paths(rendered):
    """The check above can fail: dropping the namespace-wide deny opens the intruder's paths."""
    tree = rendered["gpu"]
    policies = [copy.deepcopy(p) for p in tree.kind("NetworkPolicy").values() if p["metadata"]["name"] != "ivl-default-deny"]
    extra = _open_paths(tree, policies) - EXPECTED
    assert ("intruder", "ivl-frontend", 7860, "TCP") not in extra  # the UI's own policy still isolates it
    assert any(path[0] == "ivl-vision" for path in extra), "vision pods could call out"
    assert any(path[1] == "intruder" for path in extra)
