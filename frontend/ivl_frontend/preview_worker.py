"""The sandboxed preview worker: `python -m ivl_frontend.preview_worker` (started by ivl_proto.worker_pool).

One task kind, "render": untrusted image bytes + a tile plan -> the PNG of render_preview, inside the
worker's CPU-time and memory limits (a render over its budget is killed, not left running in a thread).
A PreviewRefused crosses the pipe as an INVALID_ARGUMENT error reply with its message.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import ParseDict
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import invalid
from ivl_proto.worker_loop import run_worker

from ivl_frontend.preview_render import PreviewRefused, render_preview


def _render(task: dict[str, Any], payload: bytes | None) -> tuple[dict[str, Any], bytes]:
    plan = ParseDict(task["plan"], common_pb2.ImagePlan())
    try:
        png = render_preview(payload or b"", plan, int(task["max_side"]), max_pixels=int(task["max_pixels"]),
                             max_jpeg_scans=int(task["max_jpeg_scans"]))
    except PreviewRefused as refused:
        raise invalid(str(refused)) from None
    return {}, png


if __name__ == "__main__":
    run_worker({"render": _render})
