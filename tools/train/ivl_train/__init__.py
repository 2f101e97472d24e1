"""ivl_train: trains the tiny InternVL demo model on synthetic images (printed words, numbers, colours, Chinese words)."""
