"""Everything that touches disk, network or MLX, run by node workers."""
