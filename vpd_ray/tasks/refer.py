"""Referring segmentation (RefCOCO, RefCOCO+, G-Ref), VPD's protocol: a frozen CLIP text encoder turns
the sentence into ``last_hidden_state`` tokens, which (through the backbone's adapter) are the
cross-attention context, attention maps on; top-down decoder; 2-class cross entropy.

Training draws one sentence of a ref at random per step; evaluation scores every sentence of every
ref. Sentences are tokenized in the data transform (``input_ids``), so loader workers load only the
tokenizer; the CLIP text model runs in ``context`` on the batch's device. The text model belongs to
the task, not to the ``nn.Module`` tree: it is frozen, so it stays out of the optimizer, out of
DeepSpeed's ZeRO partitioning and out of checkpoints, and a model package names it by path
(``tasks.refer.text_encoder``) instead of copying 123M frozen parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vpd_ray.contracts import Batch, Sample
from vpd_ray.data.synth import SYNTH_REFER_WORDS
from vpd_ray.metrics.refer import PRECISION_THRESHOLDS, ReferMetric
from vpd_ray.model.text import TINY, FrozenCLIPText
from vpd_ray.tasks import register_task
from vpd_ray.tasks.base import Task, TaskConfig, image_of


@dataclasses.dataclass
class ReferConfig(TaskConfig):
    """Options under ``tasks.refer``. Defaults are the reference RefCOCO run."""

    # CLIP text model: a transformers folder or hub id (SD v1: "<sd folder>/text_encoder"), or "tiny"
    # (seeded random 2-layer CLIP, one token per word of the synthetic sample, for the tiny backbone); required
    # metadata "weights": a path or hub id that vpd_ray.paths checks before training, except these names
    text_encoder: str | None = dataclasses.field(default=None, metadata={"weights": (TINY,)})
    # CLIP tokenizer folder or hub id; None: same as text_encoder
    tokenizer: str | None = dataclasses.field(default=None, metadata={"weights": (TINY,)})
    max_tokens: int = 40  # context length T: 40 for RefCOCO / RefCOCO+, 77 for G-Ref
    image_size: int = 512  # images and masks are resized to this square
    decoder_hidden: int = 0  # decoder width; 0: half the coarsest feature's channels (640 for SD)
    class_weights: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.1])  # CE weights (bg, object)
    max_sentences: int = 16  # eval: sentence slots per ref (a ref with more is an error naming it)

    def __post_init__(self) -> None:
        if not self.text_encoder:
            raise ValueError("tasks.refer.text_encoder: required (a CLIP text model folder or hub id, or 'tiny')")


def sentences_of(sample: Sample) -> list[str]:
    """The ref's sentences from ``meta["sentences"]``: strings, or dicts with ``sent`` (the refs(unc).p form)."""
    raw = sample.get("meta", {}).get("sentences")
    if not raw:
        raise ValueError(f"sample {sample.get('__key__')!r} has no meta['sentences']")
    return [s["sent"] if isinstance(s, dict) else str(s) for s in raw]


@register_task
class ReferTask(Task):
    name = "refer"
    config_class = ReferConfig
    primary_metric = "oIoU"
    metric_mode = "max"
    fields = ("jpg", "png", "mask.png", "json")
    # The paper's table columns for this task: (metric key, column label), for `python -m vpd_ray.evaluate`.
    paper_row = tuple((f"P@{t:.1f}", f"P@{t:.1f}") for t in PRECISION_THRESHOLDS) + (("oIoU", "oIoU"), ("mIoU", "mIoU"))
    output_kind = "mask"
    inference_inputs = ("sentence",)
    cfg: ReferConfig

    def __init__(self, cfg: ReferConfig):
        super().__init__(cfg)
        self.text = FrozenCLIPText(self.name, cfg.text_encoder, cfg.tokenizer, cfg.max_tokens, SYNTH_REFER_WORDS)

    # --- text side (lazy: loader workers need only the tokenizer, the model side only the encoder) ------
    @property
    def tokenizer(self):
        return self.text.tokenizer

    def text_model(self, device: torch.device) -> torch.nn.Module:
        """The frozen CLIP text model (built by :meth:`build_head`) on ``device``."""
        return self.text.model(device)

    def tokenize(self, sentences: list[str]) -> torch.Tensor:
        """``[N, max_tokens]`` CLIP ids, padded / truncated like the reference's ``FrozenCLIPEmbedder``."""
        return self.text.tokenize(sentences)

    # --- model side -------------------------------------------------------------------------
    def inference_batch(self, pixels: torch.Tensor, inputs: list[dict[str, Any]], protocol: bool) -> Batch:
        """The tokenised sentence of each image; the protocol takes one sentence slot per image
        (``[B,1,T]`` plus ``sentence_valid``), as a ref with one sentence in evaluation."""
        sentences = [item.get("sentence") for item in inputs]
        if any(not s for s in sentences):
            raise ValueError("the refer task needs a sentence per image: give --input a JSONL of (image, sentence) lines")
        ids = self.tokenize(sentences).to(pixels.device)  # [B,T]
        if not protocol:
            return {"image": pixels, "input_ids": ids}
        valid = torch.ones(len(sentences), 1, dtype=torch.bool, device=pixels.device)
        return {"image": pixels, "input_ids": ids[:, None], "sentence_valid": valid}

    @property
    def uses_attention_maps(self) -> bool:
        return True

    def context_tokens(self) -> int:
        return self.cfg.max_tokens

    def build_head(self, backbone: Any) -> torch.nn.Module:
        from vpd_ray.model.heads.refer import ReferDecoder

        self.text.build(backbone.text_dim)
        return ReferDecoder(backbone.feature_info(self.context_tokens()), hidden=self.cfg.decoder_hidden or None)

    @torch.no_grad()
    def context(self, backbone: Any, batch: Batch) -> torch.Tensor:
        """CLIP ``last_hidden_state`` of ``batch["input_ids"]`` ``[B, T]`` -> ``[B, T, D]`` in the backbone's dtype."""
        return self.text.encode(batch["input_ids"], next(backbone.text_adapter.parameters()).dtype)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        weight = torch.tensor(self.cfg.class_weights, dtype=torch.float32, device=outputs.device)
        return F.cross_entropy(outputs.float(), batch["mask"].long(), weight=weight)

    def predict(self, forward: Callable[[torch.Tensor, Batch], Any], batch: Batch) -> torch.Tensor:
        """0/1 masks ``[B, S, H, W]``: one forward per sentence slot over the refs that have that sentence."""
        images, ids, valid = batch["image"], batch["input_ids"], batch["sentence_valid"].bool()  # [B,3,H,W] [B,S,T] [B,S]
        pred = torch.zeros(ids.shape[:2] + images.shape[-2:], dtype=torch.long, device=images.device)
        for s in range(ids.shape[1]):
            rows = valid[:, s]
            if rows.any():
                logits = forward(images[rows], {"image": images[rows], "input_ids": ids[rows, s]})
                pred[rows, s] = logits.argmax(dim=1)
        return pred

    def metric(self) -> ReferMetric:
        return ReferMetric()

    # --- pictures -------------------------------------------------------------------------------
    def panels(self, image: Any, prediction: Any, truth: Any = None, sentence: str | None = None,
               fixed_scale: bool = False) -> list[Any]:
        """image captioned with the sentence | ground-truth mask | predicted mask."""
        from vpd_ray import visualize as vz

        panels = [vz.Panel("image", np.asarray(image, dtype=np.uint8), caption=f"“{sentence}”")]
        if truth is not None:
            panels.append(vz.refer_panel(image, truth, sentence, "ground truth"))
        return panels + [vz.refer_panel(image, prediction, sentence, "prediction")]

    def example(self, batch: Batch, prediction: torch.Tensor, index: int) -> list[Any]:
        """The first sentence of the ref: ``prediction`` ``[B,S,H,W]``, ``batch["mask"]`` ``[B,H,W]``."""
        sentence = self.tokenizer.decode(batch["input_ids"][index, 0].tolist(), skip_special_tokens=True)
        return self.panels(image_of(batch, index), prediction[index, 0].cpu().numpy().astype(np.uint8),
                           batch["mask"][index].cpu().numpy().astype(np.uint8), sentence)

    # --- data side --------------------------------------------------------------------------
    def _resized(self, sample: Sample) -> dict[str, torch.Tensor]:
        from vpd_ray.data.augment.refer import resize_square

        image, mask = resize_square(sample["image"], sample["mask"], self.cfg.image_size)
        return {"image": image, "mask": mask}

    def train_transform(self, sample: Sample, rng: Any) -> dict[str, Any]:
        """Image, mask and the ids of one sentence drawn at random ``[T]``."""
        from vpd_ray.data.augment.refer import pick_sentence

        return {**self._resized(sample), "input_ids": self.tokenize([pick_sentence(sentences_of(sample), rng)])[0]}

    def eval_transform(self, sample: Sample) -> dict[str, Any]:
        """Image, mask, ids of every sentence in ``max_sentences`` slots ``[S, T]`` and their validity ``[S]``."""
        sentences = sentences_of(sample)
        slots = self.cfg.max_sentences
        if len(sentences) > slots:
            raise ValueError(
                f"sample {sample.get('__key__')!r} has {len(sentences)} sentences, more than "
                f"tasks.refer.max_sentences={slots}"
            )
        ids = torch.zeros(slots, self.cfg.max_tokens, dtype=torch.long)
        ids[: len(sentences)] = self.tokenize(sentences)
        valid = torch.arange(slots) < len(sentences)
        return {**self._resized(sample), "input_ids": ids, "sentence_valid": valid}

    # --- report ---------------------------------------------------------------------------------
    score_label = "per-sentence IoU (fraction, 0 to 1)"
    score_item = "sentence"

    def scores(self, prediction: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, None]:
        """Each sentence's IoU (``mask_iou``, as the metric scores it) in its slot ``[B, S]``, NaN in
        the slots without a sentence."""
        from vpd_ray.metrics.refer import mask_iou

        valid = batch["sentence_valid"].detach().cpu().bool()  # [B, S]
        pred = prediction.detach().cpu()  # [B, S, H, W]
        target = batch["mask"].detach().cpu()[:, None].expand_as(pred)
        values = torch.full(valid.shape, float("nan"), dtype=torch.float64)
        values[valid] = mask_iou(pred[valid], target[valid])[2]
        return values, None


def tiny_clip_tokenizer() -> Any:
    """The refer task's ``"tiny"`` tokenizer: whole-word tokens for the synthetic sample's words
    (``SYNTH_REFER_WORDS``), characters for anything else (:func:`vpd_ray.model.text.tiny_clip_tokenizer`)."""
    from vpd_ray.model.text import tiny_clip_tokenizer as tokenizer_of

    return tokenizer_of(SYNTH_REFER_WORDS)


def tiny_clip_text_model(width: int) -> torch.nn.Module:
    """The refer task's ``"tiny"`` CLIP text model of ``width`` (seed 0, never saved)."""
    from vpd_ray.model.text import tiny_clip_text_model as model_of

    return model_of(width, tiny_clip_tokenizer())
