"""Contracts of the InternVL serving stack.

Generated stubs live in ivl_proto.<service>.v1 (run `python proto/generate.py`); the shared
runtime pieces every service uses are ivl_proto.errors (one error table for gRPC and HTTP),
ivl_proto.dtypes (the one dtype table: wire names, numpy, torch, bfloat16 bits),
ivl_proto.tensor_codec (numpy <-> Tensor messages) and ivl_proto.grpc_runtime (server options,
health, reflection, binding); the shared service shape: server_lifecycle (bind, start, health, drain, stop),
settings_errors (one formatter of bad settings), tiling_limits and image_placeholder (the rules every part
checks), checkpoint_layout (the one layout detector of both model services). See docs/architecture.md.
"""
