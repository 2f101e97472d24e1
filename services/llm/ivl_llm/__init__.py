"""ivl_llm: the InternVL language model fed with visual embeddings, streaming over gRPC (ivl.llm.v1).

Start it with `python -m ivl_llm --model-path DIR` (settings: ivl_llm.settings.LLMSettings, IVL_LLM_*).
In code: `ivl_llm.server.build_server(settings)` -> LLMServer (start / wait_ready / stop),
`ivl_llm.service.LLMService` (transport-free generate()), `ivl_llm.templates` (prompt templates).
"""
