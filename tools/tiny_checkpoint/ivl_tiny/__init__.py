"""ivl_tiny"""
