"""ivl_train: trains the tiny InternVL demo model (reads printed words, numbers, colours, Chinese words)."""
