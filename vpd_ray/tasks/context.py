"""The cross-attention context of depth and segmentation, by ``tasks.<name>.context``.

VPD's successors change only what the UNet's cross-attention reads:

- ``class`` (VPD, the default): CLIP class embeddings, depth one token (the scene class), seg every
  class (K tokens). The tasks keep their own code for it, unchanged.
- ``learned`` (MetaPrompts): ``n_tokens`` trained prompt tokens ``[n_tokens, D]``, the same for
  every image, at ``prompt_lr_mult`` times ``train.lr``. They are ``backbone.prompts[<task>]``
  (:class:`~vpd_ray.model.text.PromptTokens`), so checkpoints and packages hold them like any weight.
- ``caption`` (EVP / TADP): each image's caption, the shard's ``txt`` field (written by
  ``python -m vpd_ray.captions``), tokenised in the data transform (``input_ids``, ``max_tokens``)
  and encoded by a frozen CLIP text model on the batch's device, as the refer task does with its
  sentences (:class:`~vpd_ray.model.text.FrozenCLIPText`: the encoder stays out of the module tree,
  the optimizer, ZeRO and checkpoints; a package names it by ``text_encoder``).

T, the context length (:meth:`TaskContext.tokens`), sizes seg's attention-map channels
(``backbone.feature_info(T)``); depth's head reads no attention maps, so only its context changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vpd_ray.contracts import Batch, Sample
from vpd_ray.data.synth import SYNTH_CAPTION_WORDS, SYNTH_REFER_WORDS
from vpd_ray.errors import DataError
from vpd_ray.model.text import CLIP_MAX_TOKENS, TINY, FrozenCLIPText

CLASS, LEARNED, CAPTION = "class", "learned", "caption"
CONTEXT_MODES = (CLASS, LEARNED, CAPTION)
CAPTION_FIELD = "txt"  # the shard field of a caption (decoded as the sample's "caption")


@dataclasses.dataclass
class ContextOptions:
    """The context keys of ``tasks.depth`` and ``tasks.seg`` (mixed into their config classes).

    ``text_encoder`` / ``tokenizer`` / ``max_tokens`` mean what they mean under ``tasks.refer``.
    """

    context: str = CLASS  # "class" (VPD) | "learned" (MetaPrompts) | "caption" (EVP / TADP)
    n_tokens: int = 50  # learned: prompt tokens (MetaPrompts: 50)
    prompt_lr_mult: float = 1.0  # learned: the prompt tokens train at this multiple of train.lr
    # caption: CLIP text model, a transformers folder or hub id (SD v1: "<sd folder>/text_encoder"), or
    # "tiny" (seeded random, for the tiny backbone); metadata "weights": checked as refer's is
    text_encoder: str | None = dataclasses.field(default=None, metadata={"weights": (TINY,)})
    # caption: CLIP tokenizer folder or hub id; None: same as text_encoder
    tokenizer: str | None = dataclasses.field(default=None, metadata={"weights": (TINY,)})
    max_tokens: int = 77  # caption: context length T, captions padded / truncated to it (TADP: 40-77)

    def check_context(self, section: str) -> None:
        """The value checks of the context keys (``section``: ``tasks.depth``); ValueError naming the key."""
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"{section}.context: {self.context!r} is not one of {', '.join(CONTEXT_MODES)}")
        if self.context == LEARNED:
            if self.n_tokens < 1:
                raise ValueError(f"{section}.n_tokens: {self.n_tokens} must be >= 1 with context: learned")
            if not self.prompt_lr_mult >= 0:
                raise ValueError(f"{section}.prompt_lr_mult: {self.prompt_lr_mult} must be >= 0")
        if self.context == CAPTION:
            if not self.text_encoder:
                raise ValueError(f"{section}.text_encoder: required with context: caption (a CLIP text model "
                                 "folder or hub id, or 'tiny')")
            if not 2 <= self.max_tokens <= CLIP_MAX_TOKENS:
                raise ValueError(f"{section}.max_tokens: {self.max_tokens} must be in 2..{CLIP_MAX_TOKENS} "
                                 "(CLIP's start and end tokens included)")


def caption_of(sample: Sample, task: str) -> str:
    """The sample's caption (its shard's ``txt``); a DataError when the shard has none: shards that were
    never captioned are a setup error, not a corrupt sample to skip."""
    caption = sample.get("caption")
    if caption is None:
        raise DataError(
            f"shard {sample.get('__url__')}, key {sample.get('__key__')}: no caption ({CAPTION_FIELD} field), "
            f"which tasks.{task}.context: caption reads; caption the shards first: python -m vpd_ray.captions "
            "SHARDS --model CAPTIONER --out DIR, and train on DIR's shards"
        )
    return caption


class TaskContext:
    """The ``learned`` and ``caption`` modes of one task (``owner``: its name), for depth and seg.

    The tasks call it only where ``mode`` is not ``class``, so their default path is the one VPD has.
    """

    def __init__(self, owner: str, cfg: ContextOptions):
        cfg.check_context(f"tasks.{owner}")
        self.owner, self.cfg, self.mode = owner, cfg, cfg.context
        self.text = None
        if self.mode == CAPTION:
            words = tuple(dict.fromkeys(SYNTH_REFER_WORDS + SYNTH_CAPTION_WORDS))
            self.text = FrozenCLIPText(owner, cfg.text_encoder, cfg.tokenizer, cfg.max_tokens, words)

    def tokens(self, class_tokens: int) -> int:
        """T: ``class_tokens`` (1 for depth, K for seg), ``n_tokens`` or ``max_tokens`` by the mode."""
        return {CLASS: class_tokens, LEARNED: self.cfg.n_tokens, CAPTION: self.cfg.max_tokens}[self.mode]

    def fields(self, fields: tuple[str, ...]) -> tuple[str, ...]:
        """The task's shard fields: ``txt`` joins them under ``caption``."""
        return fields + (CAPTION_FIELD,) if self.mode == CAPTION else fields

    def build(self, backbone: Any) -> None:
        """Register ``backbone.prompts[owner]`` (learned) or build the frozen text model (caption)."""
        if self.mode == LEARNED:
            from torch import nn

            from vpd_ray.model.text import PromptTokens

            if not hasattr(backbone, "prompts"):
                backbone.add_module("prompts", nn.ModuleDict())
            backbone.prompts[self.owner] = PromptTokens(self.cfg.n_tokens, backbone.text_dim, self.cfg.prompt_lr_mult)
        elif self.mode == CAPTION:
            self.text.build(backbone.text_dim)

    def context(self, backbone: Any, batch: Batch) -> torch.Tensor:
        """``[B, T, D]``: the prompt tokens for every image, or the CLIP encoding of each caption."""
        if self.mode == LEARNED:
            return backbone.prompts[self.owner](batch["image"].shape[0])
        return self.text.encode(batch["input_ids"], next(backbone.text_adapter.parameters()).dtype)

    def sample_inputs(self, sample: Sample) -> dict[str, torch.Tensor]:
        """What a transform adds for the context: the caption's ids ``[T]`` under ``caption``."""
        if self.mode != CAPTION:
            return {}
        return {"input_ids": self.text.tokenize([caption_of(sample, self.owner)])[0]}

    def inference_inputs(self, inputs: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch's context inputs for unlabelled images: each image's caption (``caption``, else the
        ``sentence`` an inference JSONL line gives) under ``caption``; ValueError naming what is missing."""
        if self.mode != CAPTION:
            return {}
        captions = [item.get("caption") or item.get("sentence") for item in inputs]
        if any(not c for c in captions):
            raise ValueError(f"tasks.{self.owner}.context: caption needs a caption per image: give --input a JSONL "
                             "of (image, sentence) lines with each image's caption as its sentence")
        return {"input_ids": self.text.tokenize(captions).to(device)}


def attach_context(task: Any, cfg: ContextOptions) -> TaskContext | None:
    """The learned / caption context of ``task`` (None under ``class``: the task's own, VPD's path), with
    the shard field and the inference input it adds set on the task."""
    if cfg.context == CLASS:
        return None
    context = TaskContext(task.name, cfg)
    task.fields = context.fields(type(task).fields)
    task.inference_inputs = ("sentence",) if cfg.context == CAPTION else ()  # the caption
    return context
