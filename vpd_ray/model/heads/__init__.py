"""Task heads. Each head reads only ``backbone.feature_info(...)`` and takes ``(feats, image_hw)``."""
