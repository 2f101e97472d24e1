"""Serving the page: a login with --auth, a soft failure of --share offline, telemetry off."""

from __future__ import annotations

import logging
import os
import socket

import httpx
import pytest
from gradio_client import Client
from ivl_frontend.app import build_demo
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.serve import disable_telemetry, launch
from ivl_frontend.settings import FrontendSettings
from support.redis_server import free_port


def _online() -> bool:
    try:
        socket.create_connection(("api.gradio.app", 443), timeout=2).close()
        return True
    except OSError:
        return False


def test_auth_protects_the_page_and_the_api():
    # No gateway runs here: the page must still come up and say so in its banner.
    settings = FrontendSettings(gateway_address=f"127.0.0.1:{free_port()}", port=free_port(), auth="ann:s3cret",
                                info_timeout_s=1)
    demo = build_demo(settings, GatewayClient(settings))
    served = launch(demo, settings)
    try:
        assert httpx.get(served.local_url + "config", timeout=10).status_code == 401
        with pytest.raises(Exception, match=r"(?i)login|auth|401"):
            Client(served.local_url, verbose=False)
        client = Client(served.local_url, auth=("ann", "s3cret"), verbose=False)
        assert "The gateway is not reachable" in client.predict(api_name="/banner")
    finally:
        demo.close()


def test_share_fails_softly_offline_and_keeps_serving_locally(caplog):
    if _online():
        pytest.skip("this machine is online: --share would open a real public link")
    settings = FrontendSettings(gateway_address=f"127.0.0.1:{free_port()}", port=free_port(), share=True)
    demo = build_demo(settings, GatewayClient(settings))
    with caplog.at_level(logging.WARNING, logger="ivl_frontend"):
        served = launch(demo, settings)
    try:
        assert served.share_url is None
        assert "could not create a public --share link" in caplog.text and served.local_url in caplog.text
        assert httpx.get(served.local_url, timeout=10).status_code == 200
    finally:
        demo.close()


def test_telemetry_is_off_unless_the_operator_turns_it_on(monkeypatch):
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    disable_telemetry()
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "0"  # an explicit choice is kept


def test_the_ui_process_removes_its_preview_folder_when_it_stops(tmp_path):
    """python -m ivl_frontend keeps its tile previews in Gradio's cache folder and removes them on SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path), "IVL_FRONTEND_PORT": str(port),
           "IVL_FRONTEND_GATEWAY_ADDRESS": f"127.0.0.1:{free_port()}", "GRADIO_ANALYTICS_ENABLED": "False"}
    ui = subprocess.Popen([sys.executable, "-m", "ivl_frontend"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert ui.poll() is None and time.monotonic() < deadline, "the UI did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        (folder,) = tmp_path.glob("ivl-ui-previews-*")
        (folder / "tiles-x.png").write_bytes(b"png")
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
    finally:
        if ui.poll() is None:
            ui.kill()
    assert not folder.exists()
