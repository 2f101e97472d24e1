"""ivl_tiny: tiny random InternVL checkpoints in the real OpenGVLab and transformers-native layouts."""

from ivl_tiny.spec import PRESETS, TinySpec, spec_from_preset
from ivl_tiny.writer import LAYOUTS, write_tiny_checkpoint

__all__ = ["LAYOUTS", "PRESETS", "TinySpec", "spec_from_preset", "write_tiny_checkpoint"]
