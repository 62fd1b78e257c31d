"""The text side: class names, CLIP prompt templates, class embeddings, sentence tokens and learned prompts.

Class embeddings follow VPD: each class name fills the 80 ImageNet prompt templates, CLIP's text
model encodes them (max length 20, pooled output) and the 80 vectors are averaged. They are computed
once (``python -m vpd_ray.embeddings``) and stored as safetensors, so training never runs CLIP for
depth or segmentation in their default ``context: class``. transformers is imported where used.

Per-sample text (refer's sentences, depth's and seg's captions under ``context: caption``) goes
through :class:`FrozenCLIPText`: tokenised in the data transform, encoded on the batch's device by a
frozen CLIP text model that a task owns outside the ``nn.Module`` tree (no optimizer state, no ZeRO
partitioning, not in checkpoints: a package names it by path). ``"tiny"`` stands for a seeded
random CLIP for the tiny backbone. Learned prompt tokens (``context: learned``, MetaPrompts) are
:class:`PromptTokens`, trained parameters like any other.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

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


# --- per-sample text: a frozen CLIP text encoder a task owns ------------------------------------

TINY = "tiny"  # a seeded random 2-layer CLIP text model + BPE tokenizer, for the tiny backbone
CLIP_MAX_TOKENS = 77  # CLIP's position embeddings


def load_clip(kind: str, path: str) -> Any:
    """``transformers.<kind>.from_pretrained(path)`` with a one-line error naming the path."""
    import transformers

    from vpd_ray.errors import first_line

    try:
        return getattr(transformers, kind).from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a {kind} from {path!r}: {first_line(err)}") from None


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to one word's symbols, as ``CLIPTokenizer`` does."""
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(parts)))
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def tiny_clip_tokenizer(words: Sequence[str]) -> Any:
    """A CLIP BPE tokenizer over printable ASCII characters plus whole-word tokens for ``words`` (the
    synthetic samples' words), as real CLIP has single tokens for common words.

    Each word's merges join the pieces that earlier merges leave, left to right, so every listed word
    is one token and any other text falls back to characters.
    """
    import json
    import tempfile

    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            parts = [parts[0] + parts[1]] + parts[2:]
            tokens.append(parts[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as root:
        vocab, merges = os.path.join(root, "vocab.json"), os.path.join(root, "merges.txt")
        with open(vocab, "w") as f:
            json.dump({t: i for i, t in enumerate(dict.fromkeys(tokens))}, f)
        with open(merges, "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))  # insertion order = rank
        return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip_text_model(width: int, tokenizer: Any) -> nn.Module:
    """A 2-layer CLIP text model of ``width`` over ``tokenizer``'s vocabulary, identical in every
    process (seed 0): it is never saved.

    Token embeddings are drawn with std 1 instead of CLIP's 0.02: at 0.02 the random layers and
    position embeddings blur different sentences into near-identical hidden states (cosine 0.8-0.9
    at the differing words), while a trained CLIP keeps words apart.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPTextModel(config)
        torch.nn.init.normal_(model.embeddings.token_embedding.weight, std=1.0)
        return model


class FrozenCLIPText:
    """A frozen CLIP text model + tokenizer that a task owns (not a submodule: see the module docstring).

    ``text_encoder``: a transformers folder or hub id, or ``"tiny"`` (whose tokenizer has whole-word
    tokens for ``tiny_words``); ``tokenizer``: its own folder / id, None for the encoder's. Loader
    workers use only :meth:`tokenize` (the tokenizer loads on first use); the model side calls
    :meth:`build` once (``Task.build_head``), then :meth:`encode` on each batch's device.
    """

    def __init__(self, owner: str, text_encoder: str, tokenizer: str | None, max_tokens: int,
                 tiny_words: Sequence[str] = ()):
        self.owner, self.text_encoder, self.tokenizer_path = owner, text_encoder, tokenizer or text_encoder
        self.max_tokens, self.tiny_words = max_tokens, tuple(tiny_words)
        self._tokenizer: Any = None
        self._model: nn.Module | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            path = self.tokenizer_path
            self._tokenizer = tiny_clip_tokenizer(self.tiny_words) if path == TINY else load_clip("CLIPTokenizer", path)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, max_tokens]`` CLIP ids, padded / truncated like the reference's ``FrozenCLIPEmbedder``."""
        out = self.tokenizer(list(texts), max_length=self.max_tokens, padding="max_length", truncation=True,
                             return_tensors="pt")  # fmt: skip
        return out.input_ids

    def build(self, width: int) -> nn.Module:
        """Load (or, for ``"tiny"``, make) the text model, frozen, and check it is ``width``-d (the backbone's
        context width)."""
        if self.text_encoder == TINY:
            model = tiny_clip_text_model(width, self.tokenizer)
        else:
            model = load_clip("CLIPTextModel", self.text_encoder)
        self._model = model.eval().requires_grad_(False)
        if model.config.hidden_size != width:
            raise ValueError(
                f"CLIP text model {self.text_encoder!r} is {model.config.hidden_size}-d but the backbone's context is "
                f"{width}-d (SD v1 needs CLIP ViT-L/14, 768-d)"
            )
        return self._model

    def model(self, device: torch.device) -> nn.Module:
        """The frozen text model (made by :meth:`build`) on ``device``."""
        if self._model is None:
            raise RuntimeError(f"the {self.owner} task's text model is built by build_head (VPDModel calls it) before use")
        if self._model.device != device:
            self._model.to(device)
        return self._model

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """CLIP ``last_hidden_state`` of ``ids`` ``[B, T]`` -> ``[B, T, D]`` in ``dtype``."""
        return self.model(ids.device)(input_ids=ids).last_hidden_state.to(dtype)


# --- learned prompts ------------------------------------------------------------------------------

class PromptTokens(nn.Module):
    """``count`` learned context tokens ``[count, D]`` (MetaPrompts' meta prompts), the same for every
    image: ``forward(B)`` -> ``[B, count, D]``. A module (not a bare parameter read from outside), so
    that ZeRO-3 gathers the tokens in its forward hook like any layer's weights.

    Drawn from a fixed seed (N(0, 1), as MetaPrompts' ``torch.randn``), so building a model draws
    nothing from the global generator. ``lr_mult`` rides on the parameter (``tokens.lr_mult``), where
    :func:`vpd_ray.engine.optim.param_groups` reads it: the optimizer sees only named parameters.
    """

    def __init__(self, count: int, dim: int, lr_mult: float = 1.0, seed: int = 0):
        super().__init__()
        self.lr_mult = float(lr_mult)
        self.tokens = nn.Parameter(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)))
        self.tokens.lr_mult = self.lr_mult

    def __setstate__(self, state: dict[str, Any]) -> None:
        """``copy.deepcopy`` rebuilds parameters without their attributes: put ``lr_mult`` back."""
        super().__setstate__(state)
        self.tokens.lr_mult = self.lr_mult

    def forward(self, batch_size: int) -> torch.Tensor:
        # a copy, not a view of the parameter: ZeRO-3 frees a gathered parameter after this forward
        return self.tokens[None].repeat(batch_size, 1, 1)
