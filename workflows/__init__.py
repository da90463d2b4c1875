"""Deterministic orchestration: one workflow per file, no I/O; and, apart, their client side (client.py starts,
signals, queries and cancels them; state.py reads them), which the definitions never import."""
