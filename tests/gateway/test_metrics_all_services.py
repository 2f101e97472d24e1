"""Prometheus metrics of all three services, scraped from their real HTTP endpoints during chats: the vLLM-style
names, every series labelled model_name, no `_created` series, the autoscaling gauges deploy/k8s relies on, and
every metric the Grafana dashboard (deploy/grafana/ivl-dashboard.json) queries."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import openai
import pytest
from gateway_helpers import GATEWAY_OVERRIDES, LLM_OVERRIDES, data_url, new_png
from prometheus_client.parser import text_string_to_metric_families
from support.redis_server import free_port
from support.stack import running_stack

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ivl-dashboard.json"


@pytest.fixture(scope="module")
def metered(tiny_original):
    ports = {"vision": free_port(), "llm": free_port()}
    with running_stack(tiny_original, gateway=GATEWAY_OVERRIDES, llm={**LLM_OVERRIDES, "metrics_port": ports["llm"]},
                       vision={"metrics_port": ports["vision"]}) as stack:
        urls = {"gateway": stack.http_url + "/metrics", "vision": f"http://127.0.0.1:{ports['vision']}/metrics",
                "llm": f"http://127.0.0.1:{ports['llm']}/metrics"}
        yield stack, urls


def scrape(url: str) -> dict[str, list]:
    """sample name -> [(labels, value)]"""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def chat(stack, **extra) -> None:
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="ivl", max_tokens=6, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(new_png())}}, {"type": "text", "text": "What is it?"}]}],
        **extra)


def test_each_service_exports_its_metrics_labelled_with_the_model(metered):
    stack, urls = metered
    chat(stack)
    chat(stack)
    expected = {
        "gateway": ["gateway_time_to_first_token_seconds_bucket", "gateway_inter_token_latency_seconds_bucket",
                    "gateway_request_seconds_bucket", "gateway_request_prompt_tokens_bucket",
                    "gateway_request_generation_tokens_bucket", "gateway_requests_in_flight", "gateway_requests_total",
                    "vision_cache_hits_total", "vision_cache_misses_total", "gateway_cached_prompt_tokens_total"],
        "llm": ["llm_time_to_first_token_seconds_bucket", "llm_inter_token_latency_seconds_bucket",
                "llm_e2e_request_latency_seconds_bucket", "llm_request_queue_time_seconds_bucket",
                "llm_request_prompt_tokens_bucket", "llm_request_generation_tokens_bucket", "llm_requests_running",
                "llm_requests_waiting", "llm_prefix_cache_queries_total", "llm_prefix_cache_hits_total",
                "llm_prompt_tokens_total", "llm_generation_tokens_total", "llm_requests_total"],
        "vision": ["vision_queued_tiles", "vision_batch_size_tiles_bucket", "vision_forward_seconds_bucket",
                   "vision_tiles_encoded_total", "vision_forwards_total", "vision_request_seconds_bucket",
                   "vision_decode_refusals_total", "vision_decode_worker_recycles_total", "vision_decode_tasks_total",
                   "vision_rejected_requests_total"],
    }
    for service, names in expected.items():
        samples = scrape(urls[service])
        for name in names:
            assert name in samples, f"{service}: {name} missing"
        assert not [n for n in samples if n.endswith("_created")], f"{service} exports _created series"
        for name, values in samples.items():
            if name.startswith(("gateway_", "llm_", "vision_")):
                assert all(labels.get("model_name") == "ckpt" for labels, _ in values), (service, name)
    llm = scrape(urls["llm"])
    assert llm["llm_time_to_first_token_seconds_count"][0][1] >= 2
    assert llm["llm_generation_tokens_total"][0][1] >= 2
    vision = scrape(urls["vision"])
    assert vision["vision_tiles_encoded_total"][0][1] >= 2 and vision["vision_forwards_total"][0][1] >= 1
    reasons = {labels["reason"] for labels, _ in vision["vision_decode_refusals_total"]}
    assert reasons == {"cpu_limit", "wall_limit", "cancel", "crash"}
    gateway = scrape(urls["gateway"])
    assert gateway["gateway_inter_token_latency_seconds_count"][0][1] >= 1


def test_prefix_reuse_hits_are_counted_in_tokens(metered):
    stack, urls = metered
    before = scrape(urls["llm"])["llm_prefix_cache_hits_total"][0][1]
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
    first = [{"role": "user", "content": "Remember this sentence about a red panda on a platform."}]
    reply = client.chat.completions.create(model="ivl", messages=first, max_tokens=4, temperature=0)
    again = [*first, {"role": "assistant", "content": reply.choices[0].message.content},
             {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="ivl", messages=again, max_tokens=4, temperature=0)
    after = scrape(urls["llm"])["llm_prefix_cache_hits_total"][0][1]
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    served = reply.usage.prompt_tokens_details.cached_tokens + second.usage.prompt_tokens_details.cached_tokens
    assert after - before == served  # the first turn may reuse the system prompt of earlier requests


def test_the_queue_gauges_follow_the_load(metered):
    stack, urls = metered
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
    long = {"model": "ivl", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
            "temperature": 0}
    threads = [threading.Thread(target=lambda: client.chat.completions.create(**long)) for _ in range(4)]
    for thread in threads:
        thread.start()
    seen_waiting = seen_running = 0.0
    for _ in range(200):  # bounded: at most ~20 s
        samples = scrape(urls["llm"])
        seen_running = max(seen_running, samples["llm_requests_running"][0][1])
        seen_waiting = max(seen_waiting, samples["llm_requests_waiting"][0][1])
        if seen_waiting >= 1 and seen_running >= 2:
            break
        threading.Event().wait(0.1)
    for thread in threads:
        thread.join(120)
    assert seen_running == 2 and seen_waiting >= 1  # max_concurrency 2 in the test stack: the others wait
    idle = scrape(urls["llm"])
    assert idle["llm_requests_running"][0][1] == 0 and idle["llm_requests_waiting"][0][1] == 0


def test_every_metric_the_dashboard_queries_exists_in_a_scrape(metered):
    stack, urls = metered
    chat(stack)
    exported: set[str] = set()
    for url in urls.values():
        exported |= set(scrape(url))
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b(?:gateway|llm|vision)_[a-z0-9_]+\b", target["expr"])}
    assert len(queried) >= 20
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics no service exports: {missing}"
    assert any("llm_requests_waiting" in t["expr"] for p in dashboard["panels"] for t in p["targets"])
