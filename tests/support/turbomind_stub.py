"""A stand-in for LMDeploy's compiled `lmdeploy.turbomind._turbomind` extension, the one part of LMDeploy
that cannot run here (CUDA only). Everything else of LMDeploy's Python layer runs for real on top of it
(tests/llm/test_lmdeploy_contract.py).

What it provides is what turbomind.py uses of the extension: the types it names at import time
(TokenizerInfo, DataType, DataFormat, TensorMap, ...), the value holders its request path fills
(GenerationConfig, SessionParam, EngineConfig) as plain attribute bags the test can read back, and an
engine (`StubModelComm`) whose requests behave as the Python layer expects of ModelRequest.forward:
output ids written into the `output_ids` buffer after the prompt, `shared_state.consume()` returning
(status, seq_len), `signal_cb()` after every change, status 7 (finish) or 8 (cancelled) at the end.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

MODULE_NAME = "lmdeploy.turbomind._turbomind"
STATUS_FINISH, STATUS_CANCEL = 7, 8


class _Names(type):
    """Enum-like classes whose members are their own names (DataType.TYPE_BF16 == "TYPE_BF16")."""

    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return name


class DataType(metaclass=_Names):
    pass


class DataFormat(metaclass=_Names):
    pass


class Bag:
    """An attribute bag: the Python layer sets fields, the test reads them."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class GenerationConfig(Bag):
    pass


class SessionParam(Bag):
    pass


class EngineConfig(Bag):
    pass


class TokenizerInfo:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class TensorMap(dict):
    pass


def from_dlpack(value: Any) -> Any:
    return value  # torch tensors stay torch tensors; the layer reads them back with torch.from_dlpack


class RequestMetrics(Bag):
    pass


class TurboMind:
    @classmethod
    def create(cls, **kwargs: Any) -> Any:
        raise RuntimeError("the stub has no compiled engine: build a TurboMind without _from_hf")


class GrammarCompiler:
    def __init__(self, *args: Any) -> None:
        raise RuntimeError("the stub has no grammar compiler")


def _placeholder(name: str) -> type:
    """Other classes the weight builders name at import time (DecoderLayerConfig, ...): attribute bags."""
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (Bag,), {})


def stub_module() -> types.ModuleType:
    module = types.ModuleType(MODULE_NAME)
    module.__getattr__ = _placeholder  # type: ignore[method-assign]  # PEP 562 module fallback
    for name, value in {
        "DataType": DataType, "DataFormat": DataFormat, "GenerationConfig": GenerationConfig,
        "SessionParam": SessionParam, "EngineConfig": EngineConfig, "TokenizerInfo": TokenizerInfo,
        "TensorMap": TensorMap, "from_dlpack": from_dlpack, "RequestMetrics": RequestMetrics,
        "TurboMind": TurboMind, "GrammarCompiler": GrammarCompiler,
    }.items():
        setattr(module, name, value)
    return module


def install() -> None:
    sys.modules[MODULE_NAME] = stub_module()


# --- the engine ---------------------------------------------------------------------------------------

@dataclass
class State:
    status: int
    seq_len: int


class SharedState:
    def __init__(self, seq_len: int) -> None:
        self._lock = threading.Lock()
        self._state = State(0, seq_len)

    def set(self, status: int, seq_len: int) -> None:
        with self._lock:
            self._state = State(status, seq_len)

    def consume(self) -> State:
        with self._lock:
            return State(self._state.status, self._state.seq_len)


@dataclass
class ForwardCall:
    inputs: dict[str, Any]
    mm_inputs: Any
    session: Any
    gen_cfg: Any
    stream_output: bool
    enable_metrics: bool
    cancelled: bool = False


@dataclass
class StubModelComm:
    """`model_comm` of a TurboMind: create_request() gives a ModelRequest that plays `script()`."""

    script: Callable[[], Iterator[int]]
    session_len: int = 4096
    delay_s: float = 0.0
    cached_tokens: int = 0  # what the engine reports as reused prompt tokens
    final_status: int = STATUS_FINISH  # a non-zero error code (e.g. 6 = input too long) ends requests early
    calls: list[ForwardCall] = field(default_factory=list)

    def create_request(self) -> StubModelRequest:
        return StubModelRequest(self)


class StubModelRequest:
    def __init__(self, comm: StubModelComm) -> None:
        self.comm = comm
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()
        if self.comm.calls:
            self.comm.calls[-1].cancelled = True

    def forward(
        self, inputs: dict[str, Any], mm_inputs: Any, session: Any, gen_cfg: Any, stream_output: bool,
        enable_metrics: bool, signal_cb: Callable[[], None],
    ) -> tuple[TensorMap, SharedState, RequestMetrics]:
        call = ForwardCall(dict(inputs), mm_inputs, session, gen_cfg, stream_output, enable_metrics)
        self.comm.calls.append(call)
        self._cancel.clear()
        prompt_len = int(inputs["input_ids"].shape[0])
        output_ids = torch.zeros(self.comm.session_len + 1, dtype=torch.int32)
        outputs = TensorMap(output_ids=output_ids, sequence_length=torch.zeros(1, dtype=torch.int32))
        logprob_rows = int(getattr(gen_cfg, "output_logprobs", 0) or 0)
        if logprob_rows:  # the engine's top-N logprobs per generated token (N <= 1024), as TurboMind fills them
            steps = int(gen_cfg.max_new_tokens)
            outputs.update(logprob_vals=torch.full((steps, 1024), float("-inf")),
                           logprob_indexes=torch.zeros((steps, 1024), dtype=torch.int32),
                           logprob_nums=torch.zeros(steps, dtype=torch.int32))
        state = SharedState(prompt_len)
        metrics = RequestMetrics(cached_tokens=self.comm.cached_tokens, enqueue_time=time.time() * 1e6, scheduled_time=0)
        eos = set(getattr(gen_cfg, "eos_ids", []) or [])

        def run() -> None:
            seq_len = prompt_len
            if self.comm.final_status not in (0, STATUS_FINISH):
                state.set(self.comm.final_status, seq_len)
                signal_cb()
                return
            for count, token in enumerate(self.comm.script(), start=1):
                time.sleep(self.comm.delay_s)
                if self._cancel.is_set():
                    state.set(STATUS_CANCEL, seq_len)
                    signal_cb()
                    return
                if token in eos:  # stop tokens are not returned (GenerationConfig.stop_token_ids)
                    break
                output_ids[seq_len] = token
                if logprob_rows:  # the chosen token ranked first at -0.5, then token + 1, + 2, ... each 1 lower
                    position = seq_len - prompt_len
                    for rank in range(logprob_rows):
                        outputs["logprob_indexes"][position, rank] = token + rank
                        outputs["logprob_vals"][position, rank] = -0.5 - rank
                    outputs["logprob_nums"][position] = logprob_rows
                seq_len += 1
                if count >= gen_cfg.max_new_tokens:
                    break
                state.set(0, seq_len)
                signal_cb()
            state.set(STATUS_FINISH, seq_len)
            signal_cb()

        threading.Thread(target=run, daemon=True, name="stub-turbomind").start()
        return outputs, state, metrics
