"""ivl_vision"""
