"""Deterministic orchestration: one workflow per file, no I/O."""
