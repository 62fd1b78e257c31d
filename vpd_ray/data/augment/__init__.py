"""Per-task augmentation on decoded samples (numpy in, fixed-shape torch tensors out)."""
