"""ivl_llm"""
