"""Synthetic shards with exact labels that a tiny model learns in minutes on a CPU.

Three generators with the field layout of the real shards, so everything downstream runs the
real code path:

- ``depth``: a box-shaped room (floor, ceiling, walls) with a few boxes standing on the floor,
  ray cast from a pinhole camera (NYU-like field of view, small yaw and height changes). The
  stored depth is the z distance in uint16 millimetres, like NYU's. The image shades each surface
  by its normal and fades it with distance, and floors carry a checkerboard, so depth is visible
  from shading, texture gradient and perspective. The wall colour family gives the scene class
  (one of a few NYU scene types, by name and index in ``NYU_CLASSES``).
- ``seg``: a wall (label 1) over a floor (label 2) split by a random horizon, with circles (3),
  squares (4), triangles (5) and rings (6) of class-typical colours, and unlabelled scribbles (0,
  ADE's "other", ignored in training). Label PNG in the ADE convention.
- ``refer``: two or three shapes of different colours on a plain background; samples come in
  pairs that target two different objects of one scene, with sentences that match the target and
  no other ("the red square", "the green one", "the leftmost object"), and a 0/1 mask PNG.

Every sample is generated from ``(seed, index)`` alone, so any subset of indices can be written
by any process, and the same command writes byte-identical shards.
"""

from __future__ import annotations

import functools
import json

import numpy as np

from vpd_ray.data.writer import SourceItem, encode_jpeg, encode_png

DEPTH_SCENES = ("bathroom", "bedroom", "kitchen", "living_room", "office")  # names of NYU_CLASSES entries
# One wall hue per scene class (RGB in [0, 1]).
SCENE_WALLS = ((0.55, 0.75, 0.85), (0.85, 0.65, 0.70), (0.90, 0.85, 0.55), (0.70, 0.80, 0.60), (0.75, 0.75, 0.75))
SEG_CLASSES = ("other", "wall", "floor", "circle", "square", "triangle", "ring")  # label value = index
SEG_COLOURS = {3: (200, 60, 50), 4: (50, 90, 200), 5: (60, 170, 70), 6: (220, 170, 40)}
# Colours the tiny random VAE keeps apart from each other and from the grey background (white is not).
REFER_COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 200, 30),
                 "magenta": (200, 40, 200)}
REFER_SHAPES = ("circle", "square", "triangle")
# Every word the refer sentences use: the tiny CLIP tokenizer (tasks/refer.py) gives each its own token.
SYNTH_REFER_WORDS = ("the", "one", "on", "object", "left", "right", "leftmost", "rightmost", *REFER_COLOURS, *REFER_SHAPES)
MAX_DEPTH_MM = 10000
# Every word of the synthetic captions (:func:`synth_caption`): the tiny CLIP tokenizer of ``context:
# caption`` (tasks/context.py) gives each its own token, as it does the refer words.
SYNTH_CAPTION_WORDS = ("a", "with", "boxes", "on", "checkered", "floor", "wall", "above", "and", "shapes",
                       "bathroom", "bedroom", "kitchen", "living", "room", "office",
                       "circles", "squares", "triangles", "rings")


def _json(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode("utf-8")


# --- depth ----------------------------------------------------------------------------------------

def _camera_rays(hw: tuple[int, int], yaw: float, pitch: float) -> np.ndarray:
    """World ray directions ``[H, W, 3]`` whose camera-frame z component is 1 (so t = z-depth)."""
    h, w = hw
    focal = 0.81 * w  # NYU: 518.8 px at 640 wide
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.stack([(u + 0.5 - w / 2) / focal, -(v + 0.5 - h / 2) / focal, np.ones_like(u)], -1)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    pitch_m = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    yaw_m = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return d @ (yaw_m @ pitch_m).T


def _room_hit(origin: np.ndarray, rays: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Exit distance and hit axis/sign of rays from inside the box ``lo..hi``."""
    with np.errstate(divide="ignore"):
        t_axes = np.where(rays > 0, (hi - origin) / rays, (lo - origin) / rays)
    t_axes = np.where(rays == 0, np.inf, t_axes)
    axis = t_axes.argmin(-1)
    t = np.take_along_axis(t_axes, axis[..., None], -1)[..., 0]
    sign = -np.sign(np.take_along_axis(rays, axis[..., None], -1)[..., 0])  # normal points into the room
    return t, axis, sign


def _box_hit(origin: np.ndarray, rays: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Entry distance (inf on a miss) and entry axis/sign of rays against an outside box."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - origin) / rays, (hi - origin) / rays
    near = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf)
    far = np.nan_to_num(np.maximum(t1, t2), nan=np.inf)
    axis = near.argmax(-1)
    t_near, t_far = near.max(-1), far.min(-1)
    t = np.where((t_near < t_far) & (t_near > 0), t_near, np.inf)
    sign = -np.sign(np.take_along_axis(rays, axis[..., None], -1)[..., 0])
    return t, axis, sign


def render_depth(seed: int, index: int, hw: tuple[int, int]) -> dict[str, bytes]:
    """One room: ``jpg`` image, ``depth.png`` uint16 mm, ``json`` with scene / class_id."""
    from vpd_ray.model.text import NYU_CLASSES

    rng = np.random.default_rng((seed, index))
    scene = int(rng.integers(len(DEPTH_SCENES)))
    size = np.array([rng.uniform(3.0, 6.0), rng.uniform(2.4, 3.2), rng.uniform(4.0, 8.0)])
    lo, hi = np.array([-size[0] / 2, 0.0, -0.5]), np.array([size[0] / 2, size[1], size[2]])
    origin = np.array([rng.uniform(-0.3, 0.3) * size[0], rng.uniform(1.0, 1.6), 0.0])
    rays = _camera_rays(hw, yaw=rng.uniform(-0.35, 0.35), pitch=rng.uniform(-0.15, 0.05))
    t, axis, sign = _room_hit(origin, rays, lo, hi)
    albedo = np.empty(t.shape + (3,))
    wall = np.array(SCENE_WALLS[scene]) * rng.uniform(0.85, 1.1)
    albedo[:] = wall
    for _ in range(int(rng.integers(1, 5))):
        bsize = rng.uniform([0.4, 0.3, 0.4], [1.5, 2.0, 1.5])
        bx, bz = rng.uniform(lo[0] + bsize[0] / 2, hi[0] - bsize[0] / 2), rng.uniform(1.5, hi[2] - bsize[2])
        blo = np.array([bx - bsize[0] / 2, 0.0, bz])
        tb, ab, sb = _box_hit(origin, rays, blo, blo + bsize)
        closer = tb < t
        t, axis, sign = np.where(closer, tb, t), np.where(closer, ab, axis), np.where(closer, sb, sign)
        albedo[closer] = rng.uniform(0.2, 0.9, 3)
    points = origin + rays * t[..., None]
    floor = (axis == 1) & (sign > 0) & (points[..., 1] < 1e-6)
    checker = (np.floor(points[..., 0] * 2) + np.floor(points[..., 2] * 2)) % 2
    albedo[floor] = (0.35 + 0.3 * checker[floor])[:, None] * np.array([0.9, 0.8, 0.65])
    normal = np.zeros(t.shape + (3,))
    np.put_along_axis(normal, axis[..., None], sign[..., None], -1)
    light = np.array([0.3, 0.8, -0.5]) / np.linalg.norm([0.3, 0.8, -0.5])
    shade = 0.45 + 0.55 * np.abs(normal @ light)
    fade = np.exp(-0.12 * t)[..., None]
    image = albedo * shade[..., None] * fade * 1.4 + rng.normal(0, 0.015, albedo.shape)
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    depth = np.clip(np.round(t * 1000), 1, MAX_DEPTH_MM).astype(np.uint16)
    name = DEPTH_SCENES[scene]
    meta = {"source": f"synth-depth/{seed}/{index}", "scene": name, "class_id": NYU_CLASSES.index(name),
            "seed": seed, "index": index}
    return {"jpg": encode_jpeg(image), "depth.png": encode_png(depth), "json": _json(meta)}


# --- segmentation ---------------------------------------------------------------------------------

def _shape_mask(kind: str, hw: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius ``r`` centred at (cy, cx)."""
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    if kind == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == "triangle":  # apex up
        return (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == "ring":
        dist = dy**2 + dx**2
        return (dist <= r**2) & (dist >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _texture(rng: np.random.Generator, hw: tuple[int, int], base: np.ndarray, stripes: bool) -> np.ndarray:
    """A float RGB texture: base colour, low-frequency noise and optional stripes."""
    coarse = rng.normal(0, 1, (hw[0] // 16 + 2, hw[1] // 16 + 2, 1))
    noise = np.kron(coarse, np.ones((16, 16, 1)))[: hw[0], : hw[1]] * 12
    image = base + noise + rng.normal(0, 6, hw + (3,))
    if stripes:
        period, angle = rng.uniform(6, 14), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:hw[0], 0:hw[1]]
        image += 18 * np.sign(np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period))[..., None]
    return image


def render_seg(seed: int, index: int, hw: tuple[int, int]) -> dict[str, bytes]:
    """Wall/floor background with shapes: ``jpg``, ``label.png`` (0 other, 1..6), ``json``."""
    rng = np.random.default_rng((seed, index))
    horizon = int(rng.uniform(0.35, 0.65) * hw[0])
    label = np.ones(hw, np.uint8)
    label[horizon:] = 2
    image = _texture(rng, hw, rng.uniform(150, 220, 3), stripes=True)
    image[horizon:] = _texture(rng, hw, rng.uniform(70, 130, 3), stripes=False)[horizon:]
    for _ in range(int(rng.integers(2, 5))):  # "other": unlabelled scribbles
        mask = _shape_mask("circle", hw, *rng.uniform(0, hw[0], 1), *rng.uniform(0, hw[1], 1), rng.uniform(3, 8))
        image[mask], label[mask] = rng.uniform(0, 255, 3), 0
    for _ in range(int(rng.integers(3, 7))):
        cls = int(rng.integers(3, len(SEG_CLASSES)))
        r = rng.uniform(0.07, 0.18) * min(hw)
        mask = _shape_mask(SEG_CLASSES[cls], hw, rng.uniform(r, hw[0] - r), rng.uniform(r, hw[1] - r), r)
        colour = np.array(SEG_COLOURS[cls]) + rng.normal(0, 15, 3)
        image[mask] = colour + rng.normal(0, 8, (int(mask.sum()), 3))
        label[mask] = cls
    meta = {"source": f"synth-seg/{seed}/{index}", "classes": list(SEG_CLASSES), "seed": seed, "index": index}
    image = np.clip(image, 0, 255).round().astype(np.uint8)
    return {"jpg": encode_jpeg(image), "label.png": encode_png(label), "json": _json(meta)}


# --- referring segmentation -----------------------------------------------------------------------

def _place(rng: np.random.Generator, hw: tuple[int, int], count: int) -> list[tuple[float, float, float]]:
    """``count`` non-overlapping (cy, cx, r), centres at least 12 px apart horizontally."""
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.uniform(0.1, 0.16) * min(hw)
        cy, cx = rng.uniform(r, hw[0] - r), rng.uniform(r, hw[1] - r)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + 4) ** 2 and abs(cx - x) > 12 for y, x, q in placed):
            placed.append((cy, cx, r))
    return placed


def referring_phrases(objects: list[dict], target: int) -> list[str]:
    """Phrases that match ``objects[target]`` and no other object (by colour, shape, left/right order)."""
    me = objects[target]

    def others(pred) -> list[dict]:
        return [o for i, o in enumerate(objects) if pred(o)]

    phrases = []
    same_colour = others(lambda o: o["colour"] == me["colour"])
    same_shape = others(lambda o: o["shape"] == me["shape"])
    same_both = others(lambda o: o["colour"] == me["colour"] and o["shape"] == me["shape"])
    if len(same_colour) == 1:
        phrases.append(f"the {me['colour']} one")
    if len(same_shape) == 1:
        phrases.append(f"the {me['shape']}")
    if len(same_both) == 1 and (len(same_colour) > 1 or len(same_shape) > 1):
        phrases.append(f"the {me['colour']} {me['shape']}")
    for group, noun in ((same_both, f"{me['colour']} {me['shape']}"), (same_shape, me["shape"]), (objects, "object")):
        xs = sorted(o["cx"] for o in group)
        if len(group) == 2:
            phrases.append(f"the {noun} on the {'left' if me['cx'] == xs[0] else 'right'}")
        elif len(group) > 2 and me["cx"] in (xs[0], xs[-1]):
            phrases.append(f"the {'leftmost' if me['cx'] == xs[0] else 'rightmost'} {noun}")
    return phrases


def colour_phrases(obj: dict) -> list[str]:
    """Phrases naming ``obj`` by its colour (unique in a synthetic refer scene)."""
    return [f"the {obj['colour']} {obj['shape']}", f"the {obj['colour']} one"]


def render_refer(seed: int, index: int, hw: tuple[int, int]) -> dict[str, bytes]:
    """Shapes on a plain background, one targeted: ``jpg``, ``mask.png`` (0/1), ``json`` with sentences.

    Samples come in pairs: ``2k`` and ``2k+1`` show the same scene (``image_id`` k) and target two
    different objects, so only the sentence tells them apart and a model that ignores the text
    cannot fit both. Colours are unique within a scene; every sample has the two colour phrases, then
    one shape or position phrase when there is one.
    """
    rng = np.random.default_rng((seed, index // 2))
    places = _place(rng, hw, int(rng.integers(2, 4)))
    colours = rng.permutation(list(REFER_COLOURS))[: len(places)]
    shapes = [REFER_SHAPES[int(i)] for i in rng.integers(len(REFER_SHAPES), size=len(places))]
    objects = [{"cy": cy, "cx": cx, "r": r, "colour": str(c), "shape": shape}
               for (cy, cx, r), c, shape in zip(places, colours, shapes)]  # fmt: skip
    image = np.full(hw + (3,), 128.0) + rng.normal(0, 10, hw + (3,))
    masks = []
    for obj in objects:
        mask = _shape_mask(obj["shape"], hw, obj["cy"], obj["cx"], obj["r"])
        image[mask] = REFER_COLOURS[obj["colour"]]
        masks.append(mask)
    target = int(rng.permutation(len(objects))[index % 2])
    named = colour_phrases(objects[target])
    others = [p for p in referring_phrases(objects, target) if p not in named]
    sentences = named + [str(rng.choice(others))] if others else named
    meta = {"source": f"synth-refer/{seed}/{index}", "sentences": sentences, "ref_id": index, "image_id": index // 2,
            "ann_id": target, "category": objects[target]["shape"], "seed": seed, "index": index}
    image = np.clip(image, 0, 255).round().astype(np.uint8)
    return {"jpg": encode_jpeg(image), "mask.png": encode_png(masks[target].astype(np.uint8)), "json": _json(meta)}


RENDERERS = {"depth": render_depth, "seg": render_seg, "refer": render_refer}
DEFAULT_SIZE = {"depth": (128, 128), "seg": (128, 128), "refer": (128, 128)}


def synth_items(kind: str, n: int, seed: int, hw: tuple[int, int] | None = None) -> list[SourceItem]:
    """The :class:`SourceItem` list of ``n`` synthetic samples of ``kind`` (depth, seg, refer)."""
    if kind not in RENDERERS:
        raise ValueError(f"unknown synthetic kind {kind!r}; known: {sorted(RENDERERS)}")
    hw = tuple(hw or DEFAULT_SIZE[kind])
    est = hw[0] * hw[1] // 2
    return [SourceItem(key=f"synth_{kind}_s{seed}_{i:07d}", load=functools.partial(RENDERERS[kind], seed, i, hw),
                       est_bytes=est, source=f"synth-{kind}/{seed}/{i}") for i in range(n)]


# --- captions -------------------------------------------------------------------------------------

def synth_caption(sample: dict) -> str:
    """A true caption of a decoded synthetic depth or seg sample, from what the generator put there:
    depth, the room's scene class (every room has boxes standing on a checkered floor); seg, the shape
    classes its label map holds ("circles and rings on a wall above a floor")."""
    meta = sample.get("meta") or {}
    if "scene" in meta:
        return f"a {meta['scene'].replace('_', ' ')} with boxes on a checkered floor"
    if "label" in sample:
        present = set(np.unique(sample["label"]).tolist())
        shapes = [f"{SEG_CLASSES[k]}s" for k in range(3, len(SEG_CLASSES)) if k in present]
        listed = ", ".join(shapes[:-1]) + f" and {shapes[-1]}" if len(shapes) > 1 else "".join(shapes) or "shapes"
        return f"{listed} on a wall above a floor"
    raise ValueError(f"sample {sample.get('__key__')!r} is no synthetic depth or seg sample (no scene, no label)")


class SynthCaptioner:
    """:func:`synth_caption` in the captioning job's interface (``vpd_ray.data.captions``): the fields
    it reads, and a list of decoded samples in, their captions out. For tests and the sample run:
    true captions without a captioning model."""

    fields = None  # every field a sample has: depth and seg samples differ

    def __call__(self, samples: list[dict]) -> list[str]:
        return [synth_caption(sample) for sample in samples]
