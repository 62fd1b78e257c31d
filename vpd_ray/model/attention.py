"""Cross-attention map capture through diffusers' attention-processor mechanism.

VPD concatenates head-averaged cross-attention probabilities onto two of its feature maps. The
UNet's own attention runs on PyTorch's fused kernel, which never materialises probabilities, so
a :class:`CrossAttentionCapture` processor is installed (``unet.set_attn_processor(dict)``) on the
``attn2`` layers of the down and up blocks only. Its output always comes from the fused kernel;
when maps are wanted it also computes ``softmax(QK^T)`` for layers small enough to keep and adds
the head mean to a per-resolution running sum in an :class:`AttentionMapStore`.

Maps are requested per call by tagging the context tensor (:func:`request_maps`): the tag travels
with the tensor into activation-checkpoint recomputation, so the recomputed graph matches the
forward one (non-reentrant checkpointing checks that), while only the forward records maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers loads in seconds: not on import, so that a config check stays quick
    from diffusers.models.attention_processor import Attention


_MAX_TOKENS_ATTR = "_vpd_attn_map_max_tokens"


def request_maps(context: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Tag ``context`` so that capture processors materialise maps of layers with h*w <= ``max_tokens``."""
    setattr(context, _MAX_TOKENS_ATTR, max_tokens)
    return context


class AttentionMapStore:
    """Per-forward accumulator: ``{HW: (sum of head-averaged maps [B,HW,T], count)}``.

    ``begin``/``end`` bracket one backbone forward; outside it (checkpoint recomputation during
    backward) ``add`` is a no-op.
    """

    def __init__(self) -> None:
        self.recording = False
        self.sums: dict[int, tuple[torch.Tensor, int]] = {}

    def begin(self) -> None:
        self.recording = True
        self.sums = {}

    def end(self) -> dict[int, torch.Tensor]:
        """Stop recording and return the mean map per resolution ``{HW: [B, HW, T]}``."""
        means = {hw: total / count for hw, (total, count) in self.sums.items()}
        self.recording = False
        self.sums = {}
        return means

    def add(self, probs: torch.Tensor) -> None:
        if not self.recording:
            return
        hw = probs.shape[1]
        total, count = self.sums.get(hw, (0, 0))
        self.sums[hw] = (probs + total, count + 1)


class CrossAttentionCapture:
    """Attention processor: the fused default, plus head-averaged probabilities into ``store``.

    The output always comes from the fused kernel; the recorded map is ``softmax(QK^T * scale)``
    computed from the same projections, so gradients reach ``to_q``/``to_k`` through both paths
    exactly as they would through a single explicit-softmax attention.
    """

    def __init__(self, store: AttentionMapStore):
        self.store = store
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        out = self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        # hidden_states: [B, HW, C] inside SD's Transformer2DModel; context: [B, T, D]
        max_tokens = getattr(encoder_hidden_states, _MAX_TOKENS_ATTR, 0)
        if hidden_states.ndim == 3 and hidden_states.shape[1] <= max_tokens:
            self.store.add(_head_mean_probs(attn, hidden_states, encoder_hidden_states, attention_mask))
        return out


def _head_mean_probs(
    attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``[B, HW, T]``: attention probabilities of ``attn`` averaged over its heads."""
    batch = hidden_states.shape[0]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B*heads, HW, C/heads]
    key = attn.head_to_batch_dim(attn.to_k(context))  # [B*heads, T, C/heads]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
    probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, HW, T]
    return probs.reshape(batch, attn.heads, *probs.shape[1:]).mean(dim=1)


def cross_attention_processors(unet: torch.nn.Module, store: AttentionMapStore) -> dict[str, object]:
    """The full processor dict for ``unet.set_attn_processor``: capture on down/up ``attn2``, others unchanged."""
    processors = dict(unet.attn_processors)
    for name in processors:
        if name.startswith(("down_blocks.", "up_blocks.")) and ".attn2." in name:
            processors[name] = CrossAttentionCapture(store)
    return processors
