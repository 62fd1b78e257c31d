"""Drawing primitives for every picture of the project: depth and error maps, segmentation and
referring overlays, and panels side by side.

Every picture is a list of :class:`Panel` rendered into one figure by :func:`render`, which returns
an ``HxWx3`` uint8 array (what TensorBoard's ``add_image(..., dataformats="HWC")`` and
a PNG writer take). A panel holds the pixels it shows plus what makes them readable: a colour
bar with units, a legend, a caption. Image axes are in pixels, colour bars in metres.

Colours:

- depth: matplotlib's ``magma_r`` (near = bright), the colormap of ``python -m vpd_ray.infer
  --preview``, so batch previews and these pictures agree. magma is perceptually uniform and its
  lightness rises monotonically, so depth order survives greyscale printing and colour-vision
  deficiency (``turbo``/``jet`` are not monotonic in lightness and invent edges).
- depth error: ``viridis`` (same properties), so an error map is never mistaken for a depth map.
- no data (depth 0, error where the ground truth is 0): flat grey, far from every colour of both maps.
- segmentation: the ADE20K palette of mmsegmentation (``mmseg/datasets/ade.py``, ``ADE20KDataset``);
  ignored pixels (label 255) black, a colour the palette does not use.

matplotlib is used through its object API (``Figure`` + the Agg canvas): no GUI backend, no global
pyplot state shared between the demo's request handlers.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np

DEPTH_CMAP = "magma_r"
ERROR_CMAP = "viridis"
NO_DATA_RGB = (128, 128, 128)
IGNORE_INDEX = 255
IGNORE_RGB = (0, 0, 0)
REFER_RGB = (255, 40, 40)  # the referred object's mask
# Layout under an image, in points: tick labels + the x axis label, then a caption line.
AXIS_LABEL_PT, CAPTION_PT = 36, 18
LEGEND_ENTRIES = 20  # a legend lists at most this many classes (largest first), then "N more"

# ADE20K's 150 class colours, indexed by label after reduce_zero_label (0: wall ... 149: flag), as in
# mmsegmentation's ADE20KDataset (checked entry by entry against mmseg/datasets/ade.py). The table
# repeats one colour: road (6) and skyscraper (48) are both (140, 140, 140) there; kept as published
# so pictures match mmseg's and the papers'; legends tell the two apart by name.
ADE20K_PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),  # 0-5
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),  # 6-11
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),  # 12-17
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),  # 18-23
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),  # 24-29
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),  # 30-35
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),  # 36-41
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),  # 42-47
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),  # 48-53
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),  # 54-59
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),  # 60-65
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),  # 66-71
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),  # 72-77
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),  # 78-83
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),  # 84-89
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),  # 90-95
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),  # 96-101
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),  # 102-107
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),  # 108-113
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),  # 114-119
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),  # 120-125
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),  # 126-131
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),  # 132-137
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),  # 138-143
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),  # 144-149
], dtype=np.uint8)  # fmt: skip

RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class ColorScale:
    """How values became colours: ``cmap`` over ``[vmin, vmax]``; ``label`` names the quantity and its unit."""

    cmap: str
    vmin: float
    vmax: float
    label: str


@dataclasses.dataclass(frozen=True)
class Panel:
    """One picture in a figure: the pixels shown (uint8 HxWx3) and what makes them readable."""

    title: str
    pixels: np.ndarray
    scale: ColorScale | None = None  # drawn as a colour bar beside the image
    legend: tuple[tuple[str, RGB], ...] = ()  # drawn as colour patches under the image
    caption: str = ""  # drawn under the image (e.g. the referring sentence)


# --- colours ------------------------------------------------------------------------------------
def colorize(values: np.ndarray, scale: ColorScale, valid: np.ndarray | None = None) -> np.ndarray:
    """Float HxW -> uint8 HxWx3 through ``scale`` (clipped to its ends); pixels outside ``valid`` grey."""
    from matplotlib import colormaps

    span = max(scale.vmax - scale.vmin, 1e-12)
    norm = np.clip((np.asarray(values, dtype=np.float64) - scale.vmin) / span, 0.0, 1.0)
    rgb = (colormaps[scale.cmap](norm)[..., :3] * 255).round().astype(np.uint8)
    if valid is not None:
        rgb[~valid] = NO_DATA_RGB
    return rgb


def value_range(values: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """(min, max) over ``valid`` pixels, widened to 0.1 where they are (nearly) constant so a
    colour bar still has two distinct ends; (0, 1) when nothing is valid."""
    if not valid.any():
        return 0.0, 1.0
    lo, hi = float(values[valid].min()), float(values[valid].max())
    if hi - lo < 1e-6:
        lo, hi = max(lo - 0.05, 0.0), lo + 0.05
    return lo, hi


def _blend(image: np.ndarray, colors: np.ndarray, where: np.ndarray, alpha: float) -> np.ndarray:
    """``image`` with ``colors`` mixed in at ``alpha`` where ``where`` holds (both uint8 HxWx3)."""
    if image.shape[:2] != where.shape:
        raise ValueError(f"image {image.shape[:2]} and map {where.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out = image.astype(np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * colors[where].astype(np.float32)
    return out.round().astype(np.uint8)


# --- depth --------------------------------------------------------------------------------------
def depth_panel(depth_m: np.ndarray, title: str = "depth", vmin: float | None = None,
                vmax: float | None = None) -> Panel:
    """A depth map (float HxW metres, 0 = no depth) on ``[vmin, vmax]`` metres, by default the
    range of its valid pixels; the colour bar states the scale either way."""
    valid = depth_m > 0
    lo, hi = value_range(depth_m, valid)
    scale = ColorScale(DEPTH_CMAP, lo if vmin is None else vmin, hi if vmax is None else vmax, "depth (m)")
    legend = (("no depth (0 m)", NO_DATA_RGB),) if not valid.all() else ()
    return Panel(title, colorize(depth_m, scale, valid), scale, legend)


def error_panel(pred_m: np.ndarray, gt_m: np.ndarray, title: str = "|prediction − ground truth|") -> Panel:
    """Absolute depth error in metres on its own scale (0 to the largest error), where gt > 0."""
    if pred_m.shape != gt_m.shape:
        raise ValueError(f"prediction {pred_m.shape} and ground truth {gt_m.shape} differ in size")
    valid = gt_m > 0
    error = np.abs(pred_m - gt_m)
    scale = ColorScale(ERROR_CMAP, 0.0, value_range(error, valid)[1], "absolute error (m)")
    legend = (("no ground truth", NO_DATA_RGB),) if not valid.all() else ()
    return Panel(title, colorize(error, scale, valid), scale, legend)


# --- segmentation and referring -----------------------------------------------------------------
def image_panel(image: np.ndarray, title: str = "image") -> Panel:
    return Panel(title, np.asarray(image, dtype=np.uint8))


def seg_overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5,
                palette: np.ndarray = ADE20K_PALETTE) -> np.ndarray:
    """The image with each pixel's class colour mixed in at ``alpha``; ignored pixels (255) black."""
    known = label != IGNORE_INDEX
    if label[known].size and int(label[known].max()) >= len(palette):
        raise ValueError(f"label {int(label[known].max())} has no colour: the palette has {len(palette)}")
    colors = np.empty(label.shape + (3,), dtype=np.uint8)
    colors[known] = palette[label[known]]
    colors[~known] = IGNORE_RGB
    return _blend(image, colors, np.ones(label.shape, dtype=bool), alpha)


def class_legend(label: np.ndarray, names: Sequence[str], palette: np.ndarray = ADE20K_PALETTE,
                 limit: int = LEGEND_ENTRIES) -> tuple[tuple[str, RGB], ...]:
    """(name with its pixel share, colour) of the classes present in ``label``, largest first.

    At most ``limit`` classes are listed and the rest summed in one "N more" entry; ignored pixels
    get their own entry. A class id past ``names`` is named ``class <id>``.
    """
    ids, counts = np.unique(label, return_counts=True)
    total = label.size
    entries = []
    for k, n in sorted(zip(ids.tolist(), counts.tolist()), key=lambda kn: -kn[1]):
        if k == IGNORE_INDEX:
            continue
        name = names[k] if k < len(names) else f"class {k}"
        entries.append((f"{name} {n / total:.0%}", tuple(int(c) for c in palette[k])))
    if len(entries) > limit:
        rest = len(entries) - limit
        entries = entries[:limit] + [(f"{rest} more classes", (255, 255, 255))]
    ignored = int(counts[ids == IGNORE_INDEX].sum())
    if ignored:
        entries.append((f"ignored (255) {ignored / total:.0%}", IGNORE_RGB))
    return tuple(entries)


def seg_panel(image: np.ndarray, label: np.ndarray, names: Sequence[str], title: str = "segmentation",
              alpha: float = 0.5) -> Panel:
    """Class colours over the image with a legend of the classes present."""
    return Panel(title, seg_overlay(image, label, alpha), legend=class_legend(label, names))


def refer_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, color: RGB = REFER_RGB) -> np.ndarray:
    """The image with the mask's pixels (non-zero) tinted ``color`` at ``alpha``."""
    colors = np.broadcast_to(np.array(color, dtype=np.uint8), mask.shape + (3,))
    return _blend(image, colors, mask > 0, alpha)


def refer_panel(image: np.ndarray, mask: np.ndarray, sentence: str, title: str = "referred object",
                alpha: float = 0.5) -> Panel:
    """The mask over the image, captioned with the sentence it answers."""
    share = float((mask > 0).mean()) if mask.size else 0.0
    return Panel(title, refer_overlay(image, mask, alpha), legend=((f"mask {share:.0%}", REFER_RGB),),
                 caption=f"“{sentence}”")


# --- figures ------------------------------------------------------------------------------------
def render(panels: Sequence[Panel], panel_inches: float = 4.0, dpi: int = 100) -> np.ndarray:
    """The panels side by side in one figure (titles, pixel axes, colour bars, legends, captions):
    uint8 HxWx3, the same picture for the demo page, a PNG or TensorBoard."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy
    from mpl_toolkits.axes_grid1 import make_axes_locatable
    from PIL import Image

    if not panels:
        raise ValueError("render needs at least one panel")
    aspect = max(p.pixels.shape[0] / max(p.pixels.shape[1], 1) for p in panels)
    fig = Figure(figsize=(panel_inches * len(panels), panel_inches * min(aspect, 2.0) + 0.8), dpi=dpi)
    outside: list = []  # captions and legends under the images: inside the crop
    FigureCanvasAgg(fig)
    gap = 0.6 if any(p.scale for p in panels) else 0.3  # between images: y labels, colour bars and their labels
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"wspace": gap})[0]
    for ax, panel in zip(axes, panels):
        ax.imshow(panel.pixels, interpolation="nearest")
        ax.set_title(panel.title)
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
        if any(p.scale for p in panels):  # every image gives up the same width, so all are the same size
            bar = make_axes_locatable(ax).append_axes("right", size="5%", pad=0.08)  # exactly as tall as the image
            if panel.scale is None:
                bar.set_axis_off()
            else:
                s = panel.scale
                fig.colorbar(ScalarMappable(Normalize(s.vmin, s.vmax), s.cmap), cax=bar, label=s.label)
        offset = AXIS_LABEL_PT  # below the tick labels and the x axis label
        if panel.caption:
            outside.append(ax.annotate(panel.caption, xy=(0.5, 0), xycoords="axes fraction", xytext=(0, -offset),
                                     textcoords="offset points", ha="center", va="top"))
            offset += CAPTION_PT
        if panel.legend:
            handles = [Patch(facecolor=np.array(rgb) / 255, edgecolor="0.3", label=name) for name, rgb in panel.legend]
            anchor = offset_copy(ax.transAxes, fig=fig, y=-offset, units="points")
            outside.append(ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0),
                                   bbox_transform=anchor, ncol=2, fontsize="small", frameon=False, borderaxespad=0))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", bbox_extra_artists=outside, pad_inches=0.1)
    return np.asarray(Image.open(buffer).convert("RGB"))
