"""Training machinery: DeepSpeed config and param groups (``optim``), checkpoints (``checkpoint``),
distributed evaluation (``evaluation``) and the per-worker Ray Train loop (``loop``).

Nothing here imports Ray or DeepSpeed at module level, so ``vpd_ray.package`` and the tests of
the pure parts stay light.
"""
