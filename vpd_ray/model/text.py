"""The text side: class names, CLIP prompt templates, class embeddings and sentence tokens.

Class embeddings follow VPD: each class name fills the 80 ImageNet prompt templates, CLIP's text
model encodes them (max length 20, pooled output) and the 80 vectors are averaged. They are computed
once (``python -m vpd_ray.embeddings``) and stored as safetensors, so training never runs CLIP for
depth or segmentation. transformers is imported where used.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch

CLASS_EMBEDDINGS_KEY = "class_embeddings"  # tensor name inside the safetensors file, [N, D]
CLASS_MAX_LENGTH = 20

# NYUv2 scene types (folder names of the official split; "excercise_room" is spelled as there).
NYU_CLASSES = (
    "bathroom", "bedroom", "bookstore", "cafe", "classroom", "computer_lab", "conference_room",
    "dinette", "dining_room", "excercise_room", "foyer", "furniture_store", "home_office",
    "home_storage", "indoor_balcony", "kitchen", "laundry_room", "living_room", "office",
    "office_kitchen", "playroom", "printer_room", "reception_room", "student_lounge", "study",
    "study_room", "basement",
)  # fmt: skip

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip

CLASS_SETS = {"nyu": NYU_CLASSES, "ade20k": ADE20K_CLASSES}

# The 80 ImageNet prompt templates of CLIP's zero-shot evaluation.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip


def class_names(class_set: str) -> tuple[str, ...]:
    """Built-in class names of ``class_set`` ("nyu" or "ade20k")."""
    if class_set not in CLASS_SETS:
        raise ValueError(f"unknown class set {class_set!r}; built in: {', '.join(CLASS_SETS)}")
    return CLASS_SETS[class_set]


class ClipText:
    """A frozen CLIP text model + tokenizer (local folder or hub id), loaded once, eval mode."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path)
            self.model = CLIPTextModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a CLIP text model + tokenizer from {path!r}: {err}") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_length: int) -> Any:
        """CLIP text outputs for ``texts`` padded/truncated to ``max_length`` tokens."""
        tokens = self.tokenizer(
            list(texts), max_length=max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        return self.model(input_ids=tokens.input_ids)


def _as_clip(clip: str | ClipText) -> ClipText:
    return clip if isinstance(clip, ClipText) else ClipText(clip)


def compute_class_embeddings(
    names: Iterable[str], clip: str | ClipText, templates: Sequence[str] = IMAGENET_TEMPLATES, progress: bool = False
) -> torch.Tensor:
    """``[N, D]``: per class, the mean over ``templates`` of CLIP's pooled output (max length 20).

    Underscores in names become spaces ("living_room" -> "a photo of a living room.").
    """
    clip = _as_clip(clip)
    names = list(names)
    bar = None
    if progress:
        from vpd_ray.progress import progress as progress_bar

        bar = progress_bar(len(names), "class embeddings", unit="class")
    vectors = []
    for name in names:
        out = clip.encode([t.format(name.replace("_", " ")) for t in templates], CLASS_MAX_LENGTH)
        vectors.append(out.pooler_output.float().mean(dim=0))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.stack(vectors).cpu()


def save_class_embeddings(path: str, vectors: torch.Tensor, names: Sequence[str]) -> None:
    """Write ``[N, D]`` vectors as safetensors; the class names go in the metadata."""
    from safetensors.torch import save_file

    if vectors.shape[0] != len(names):
        raise ValueError(f"{vectors.shape[0]} vectors for {len(names)} class names")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({CLASS_EMBEDDINGS_KEY: vectors.contiguous()}, path, metadata={"names": "\n".join(names)})


def class_vectors(num_classes: int, path: str | None, dim: int) -> torch.Tensor:
    """``[N, D]`` class embeddings from ``path``, or seeded random ones (tiny / synthetic runs)."""
    if path:
        return load_class_embeddings(path, num_classes=num_classes, dim=dim)
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))


def load_class_embeddings(path: str, num_classes: int | None = None, dim: int | None = None) -> torch.Tensor:
    """``[N, D]`` from a file written by :func:`save_class_embeddings`, shape-checked when asked."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"class embeddings file {path!r} does not exist (make one: python -m vpd_ray.embeddings)"
        )
    with safe_open(path, framework="pt") as f:
        if CLASS_EMBEDDINGS_KEY not in f.keys():
            raise ValueError(f"{path!r} has no {CLASS_EMBEDDINGS_KEY!r} tensor (tensors: {list(f.keys())})")
        vectors = f.get_tensor(CLASS_EMBEDDINGS_KEY)
    expected = (num_classes or vectors.shape[0], dim or vectors.shape[-1])
    if tuple(vectors.shape) != expected:
        raise ValueError(f"class embeddings in {path!r} have shape {list(vectors.shape)}, expected {list(expected)}")
    return vectors.float()
