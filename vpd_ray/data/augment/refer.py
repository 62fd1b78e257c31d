"""RefCOCO-family augmentation: the reference resizes image and mask to a square and nothing else.

VPD ``refer`` (from LAVT) applies ``Resize(512, 512)`` to the PIL image (Pillow bilinear) and to the
mask (nearest), no flip (a flip would contradict "left"/"right" in the sentence) and no crop; train
and eval use the same geometry, and the metric is computed at that resized resolution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image


def resize_square(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``HxWx3`` image + ``HxW`` 0/1 mask -> float ``[3,size,size]`` in [0,1] and long ``[size,size]``."""
    img = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    msk = Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST)
    image_t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return image_t, torch.from_numpy(np.asarray(msk).copy()).long()


def pick_sentence(sentences: Sequence[str], rng: np.random.Generator) -> str:
    """One sentence of a ref drawn uniformly, as the reference does per training step."""
    if not sentences:
        raise ValueError("a referring sample has no sentences")
    return sentences[int(rng.integers(len(sentences)))]
