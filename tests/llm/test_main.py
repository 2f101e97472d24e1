"""`python -m ivl_llm` as a user starts it: serves on the port it logs, answers, stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc


def test_module_entry_point_serves_and_stops_gracefully(tiny_original, tmp_path):
    env = {**os.environ, "IVL_LLM_HOST": "127.0.0.1", "IVL_LLM_GRACE_S": "1", "IVL_LLM_TORCH_THREADS": "1"}
    log = tmp_path / "llm.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "ivl_llm", "--model-path", str(tiny_original), "--port", "0"],
            env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        address = None
        deadline = time.monotonic() + 60
        while address is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"serving \S+ on (127\.0\.0\.1:\d+)", log.read_text())
            address = found.group(1) if found else None
            time.sleep(0.1)
        assert address, f"no 'serving' line; log:\n{log.read_text()}"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert llm_pb2_grpc.LanguageModelStub(channel).Info(llm_pb2.InfoRequest()).hidden_size == 64
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopping" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_without_a_model_path_it_says_what_to_set(monkeypatch):
    from ivl_llm.__main__ import main

    for name in [k for k in os.environ if k.startswith("IVL_LLM_")]:
        monkeypatch.delenv(name)
    with pytest.raises(SystemExit, match="IVL_LLM_MODEL_PATH"):
        main([])


def test_flags_for_real_internlm2_checkpoints_and_reuse(monkeypatch):
    from ivl_llm.__main__ import parse_args

    for name in [k for k in os.environ if k.startswith("IVL_LLM_")]:
        monkeypatch.delenv(name)
    settings = parse_args(["--model-path", "m", "--trust-remote-code", "--prefix-cache-bytes", "0"])
    assert (settings.trust_remote_code, settings.prefix_cache_bytes) == (True, 0)
    defaults = parse_args(["--model-path", "m"])
    assert (defaults.trust_remote_code, defaults.prefix_cache_bytes) == (False, 1024**3)
