"""HPAs and PodDisruptionBudgets point at real Deployments; the queue-depth HPAs ask for exactly the custom
metrics the Prometheus adapter rule serves, built from the services' gauges vision_queued_tiles and
llm_requests_waiting."""

from __future__ import annotations

import re

import pytest
import yaml
from k8s_render import K8S, TREES, main_container

QUEUE_METRICS = {"ivl-vision": "vision_queued_tiles", "ivl-llm": "llm_requests_waiting"}


@pytest.mark.parametrize("name", list(TREES))
def test_autoscalers_and_disruption_budgets_target_real_deployments(rendered, name):
    tree = rendered[name]
    for hpa_name, hpa in tree.kind("HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["apiVersion"]) == ("Deployment", "apps/v1")
        deployment = tree.deployments[target["name"]]
        assert "replicas" not in deployment["spec"], f"{hpa_name}: an applied replicas field would fight the HPA"
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":
                resource = metric["resource"]["name"]
                assert resource in main_container(deployment)["resources"]["requests"], (
                    f"{hpa_name}: utilization of {resource} needs a request"
                )
    gateway = tree.kind("HorizontalPodAutoscaler")["ivl-gateway"]["spec"]["metrics"]
    assert [m["resource"]["name"] for m in gateway] == ["cpu"]
    for pdb_name, pdb in tree.kind("PodDisruptionBudget").items():
        deployment = tree.deployment_selected_by(pdb["spec"]["selector"]["matchLabels"])
        assert deployment["metadata"]["name"] == pdb_name
        # maxUnavailable (not minAvailable: 1) so a one-replica Deployment never blocks a node drain.
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


def _adapter_rules() -> dict[str, dict]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["default"] is False
    return {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}


@pytest.mark.parametrize("name", ["gpu", "gpu+model-from-image"])
def test_queue_depth_autoscalers_use_the_metrics_the_adapter_serves(rendered, name):
    rules = _adapter_rules()
    hpas = rendered[name].kind("HorizontalPodAutoscaler")
    for deployment, metric_name in QUEUE_METRICS.items():
        (metric,) = hpas[deployment]["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == metric_name
        assert metric["pods"]["target"]["type"] == "AverageValue"
        rule = rules[metric_name]
        series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
        assert series == metric_name, "the adapter reads the service's own gauge of that name"
        assert re.search(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"], "per-pod values for a Pods metric"
    assert set(rules) == set(QUEUE_METRICS.values())
