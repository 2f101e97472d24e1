"""The per-reply line under each answer: cache hits, time to first token, tokens/s; its details: prompt tokens
(and how many the LLM reused from earlier turns), prefill time, TTFT."""

from __future__ import annotations

from dataclasses import dataclass

from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2

GENERATING = "⏳ generating"  # the stats note's title while the reply streams
STOPPED = "⏹ stopped"  # ... and after Stop (history_cleanup.py)

FINISH_WORDS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length limit",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass
class ReplyStats:
    """What one reply measured; the UI-side TTFT includes vision encoding and the network."""

    ttft_s: float | None = None
    final: gateway_pb2.Final | None = None

    def title(self) -> str:
        parts = []
        final = self.final
        if final is not None:
            if final.images:
                hit = "hit" if final.cache_hits == final.images else ("miss" if final.cache_hits == 0 else "partial hit")
                parts.append(f"cache {hit} ({final.cache_hits}/{final.images} images)")
            else:
                parts.append("no images")
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        if final is not None:
            parts.append(f"{final.usage.decode_tokens_per_s:.1f} tokens/s")
        return " · ".join(parts) if parts else "no statistics"

    def live_title(self) -> str:
        """The title while the reply streams (status "pending"): kept, with "stopped", if Stop ends it."""
        parts = [GENERATING]
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s:.2f} s")
        return " · ".join(parts)

    def details(self) -> str:
        final = self.final
        if final is None:
            return "the reply ended before the gateway sent its statistics"
        usage = final.usage
        return (
            f"prompt tokens {usage.prompt_tokens} ({usage.cached_prompt_tokens} reused from earlier turns) · "
            f"completion tokens {usage.completion_tokens} · "
            f"finish: {FINISH_WORDS.get(final.finish_reason, 'unknown')}  \n"
            f"vision {final.vision_s:.2f} s · LLM prefill {usage.prefill_s * 1000:.0f} ms · "
            f"LLM time to first token {usage.time_to_first_token_s:.2f} s · total {usage.total_s:.2f} s"
        )
