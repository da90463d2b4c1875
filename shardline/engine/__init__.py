"""The MLX engine: the runner process that holds one rank of a served model.

The only package that imports mlx / mlx_lm. `shardline.engine.spec` does not, so the
node activity can build a RunnerSpec without loading MLX.
"""
