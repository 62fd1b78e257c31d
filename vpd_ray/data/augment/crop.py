"""Crops shared by the tasks' geometry, on the loader's numpy arrays and on device tensors alike.

The loader crops numpy views (a flip is a negative stride there, free until the one copy); the device
path (``data.jpeg_decode: device``) crops decoded tensors. Both go through :func:`crop_window`, so the
two paths cut the same pixels by construction.
"""

from __future__ import annotations

import numpy as np
import torch


def crop_window(x: np.ndarray | torch.Tensor, top: int, left: int, hw: tuple[int, int], flip: bool) -> torch.Tensor:
    """``x[..., top:top+h, left:left+w]``, mirrored left-right when ``flip``, as a new contiguous tensor
    (one copy of the window, never of ``x``). A window past ``x``'s edge is cut short, as slicing is."""
    window = x[..., top : top + hw[0], left : left + hw[1]]
    if isinstance(window, np.ndarray):  # numpy's copy of a strided view: faster than torch's flip
        return torch.from_numpy(np.ascontiguousarray(window[..., ::-1] if flip else window))
    return window.flip(-1) if flip else window.clone(memory_format=torch.contiguous_format)


def pad_to(x: torch.Tensor, size_hw: tuple[int, int], value: int) -> torch.Tensor:
    """``x`` ``[..., h, w]`` padded bottom/right with ``value`` to ``[..., *size_hw]`` (contiguous; ``x``
    itself when it already is and needs no padding)."""
    h, w = x.shape[-2:]
    if h > size_hw[0] or w > size_hw[1]:
        raise ValueError(f"cannot pad a {h}x{w} crop to {size_hw[0]}x{size_hw[1]}")
    if (h, w) == tuple(size_hw):
        return x.contiguous()
    out = x.new_full((*x.shape[:-2], *size_hw), value)
    out[..., :h, :w] = x
    return out
