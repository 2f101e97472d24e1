"""Replica address entries -> grpc targets, and the service config grpc balances with (pure functions)."""

from __future__ import annotations

import json

import pytest
from ivl_gateway.replica_targets import Target, channel_target, parse_target
from ivl_gateway.replicas import channel_options, service_config
from ivl_gateway.settings import GatewaySettings
from pydantic import ValidationError


@pytest.mark.parametrize(("entry", "target"), [
    ("10.0.0.7:50051", Target("10.0.0.7", 50051)),
    ("[fd00::7]:50051", Target("fd00::7", 50051)),
    ("vision:50051", Target("vision", 50051)),
    ("dns:ivl-vision:50051", Target("ivl-vision", 50051)),
    ("dns:///ivl-vision.ivl.svc.cluster.local:50051", Target("ivl-vision.ivl.svc.cluster.local", 50051)),
    ("dns://10.96.0.10:53/ivl-vision:50051", Target("ivl-vision", 50051, "10.96.0.10:53")),
])
def test_address_forms(entry, target):
    assert parse_target(entry) == target


@pytest.mark.parametrize("entry", ["vision", "vision:", "vision:0", "vision:99999", "ipv4:10.0.0.1:5",
                                   "http://vision:50051", "dns://10.0.0.1", "[fd00::7]50051", "unix:/tmp/s"])
def test_bad_addresses_are_refused_naming_the_forms(entry):
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        parse_target(entry)
    with pytest.raises(ValidationError, match="is not one of"):
        GatewaySettings(vision_addresses=entry)


def test_one_name_is_grpcs_dns_target_and_lists_are_static():
    assert channel_target([parse_target("dns:ivl-vision:50051")], ["10.1.0.5:50051"]) == "dns:///ivl-vision:50051"
    assert channel_target([parse_target("vision:50051")], []) == "dns:///vision:50051"
    assert (channel_target([parse_target("dns://127.0.0.1:5353/v.test:7")], ["127.0.0.2:7"])
            == "dns://127.0.0.1:5353/v.test:7")
    listed = [parse_target("127.0.0.1:5001"), parse_target("127.0.0.1:5002")]
    assert channel_target(listed, ["127.0.0.1:5001", "127.0.0.1:5002"]) == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert channel_target([parse_target("[::1]:5001")], ["[::1]:5001"]) == "ipv6:[::1]:5001"
    # a list of names: resolved by the gateway; IPv4 when a name has both families
    named = [parse_target("a:1"), parse_target("b:1")]
    assert channel_target(named, ["10.0.0.1:1", "[fd00::1]:1"]) == "ipv4:10.0.0.1:1"
    assert channel_target(named, []) == "dns:///a:1"


def test_service_config_balances_health_checks_and_retries_unavailable():
    config = service_config("ivl.vision.v1.VisionEncoder", 3)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "ivl.vision.v1.VisionEncoder"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 3
    options = dict(channel_options(GatewaySettings(replica_backoff_s=0.5, max_message_bytes=1 << 20),
                                   "ivl.llm.v1.LanguageModel"))
    assert json.loads(options["grpc.service_config"])["methodConfig"][0]["name"] == [
        {"service": "ivl.llm.v1.LanguageModel"}]
    assert options["grpc.max_reconnect_backoff_ms"] == 500
    assert options["grpc.per_rpc_retry_buffer_size"] == 1 << 20  # a whole request can be sent again
