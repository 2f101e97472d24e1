"""Contracts of the InternVL serving stack.

Generated stubs live in ivl_proto.<service>.v1 (run `python proto/generate.py`); the shared
runtime pieces every service uses are ivl_proto.errors (one error table for gRPC and HTTP),
ivl_proto.dtypes (the one dtype table: wire names, numpy, torch, bfloat16 bits),
ivl_proto.tensor_codec (numpy <-> Tensor messages) and ivl_proto.grpc_runtime (server options,
health, reflection, graceful shutdown).
"""
