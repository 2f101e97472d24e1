"""ivl_frontend"""
