"""ivl_gateway"""
