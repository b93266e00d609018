"""``shapes``: generated image QA whose answers live in a few small regions of a cluttered image.

Each item is one scene -- a handful of small, saturated, outlined shapes and one or two text plates on a
muted, cluttered, redundant background (periodic textures, gradients, or a procedural photo-like
landscape) -- and one short-answer question of one of five kinds:

============  =====================================================  ==================================
kind          question                                               answers
============  =====================================================  ==================================
``colour``    what colour is the star?                               red orange yellow green blue purple
``count``     how many circles are there?                            1 2 3 4 5
``position``  where is the red circle relative to the blue square?   left right above below
``exists``    is there a green triangle in the image?                yes no (exactly balanced)
``text``      what letter / number is written in the image?          e h k l p r t x / 2 ... 9
============  =====================================================  ==================================

The answer-relevant objects are small (12-24 px on a 224 px image, each well under one percent of the
pixels) and sit one per cell of an 8 x 8 grid of 28 px cells, at a random offset inside the cell
(:func:`grid_cells`): a cell is one merged Qwen2-VL token and one patch of testbed-llava's tower, so each
object lives in exactly one visual token of 64. A pruning policy that drops tokens at random loses
them; one that finds them keeps the accuracy. Every object's box is in ``item.metadata`` so tests can
check which tokens mattered, and :func:`scene_questions` lists every question a scene answers (training
asks several per image).

Determinism: item ``i`` of split ``s`` is drawn from its own generator seeded by
``(seed, SPLIT_OFFSET[s] + i)``; the offsets give each split a disjoint seed range, so the train,
validation and test sets never share a scene, and any item can be regenerated alone.

Backgrounds are procedural: none of the packages mmprune depends on ships a photograph (matplotlib's
``grace_hopper.jpg`` exists only with the optional ``plots`` extra), and a test set must not change with
what happens to be installed. The "photo" style is a 1/f-noise landscape (sky, horizon, textured ground)
with the statistics of natural images rather than a real photograph.

Example:
    >>> from mmprune.testbed.shapes import make_shapes
    >>> items = make_shapes("test", 5)
    >>> [it.kind for it in items]
    ['colour', 'count', 'position', 'exists', 'text']
    >>> items[0].image.size, items[3].answer
    ((224, 224), 'yes')
"""

from __future__ import annotations

import colorsys
import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "COLOURS",
    "DIGITS",
    "KINDS",
    "LETTERS",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "SPLIT_OFFSET",
    "Item",
    "contact_sheet",
    "item_rng",
    "make_background",
    "make_shapes",
    "question_words",
    "cell_of",
    "grid_cells",
    "relation",
    "render_shapes_item",
    "scene_questions",
]

KINDS = ("colour", "count", "position", "exists", "text")
SPLITS = ("train", "validation", "test")
# Disjoint seed ranges: a split holds at most 10**9 items, far more than anyone will generate.
SPLIT_OFFSET = {"train": 0, "validation": 10**9, "test": 2 * 10**9}
MAX_ITEMS = 10**9

# Saturated, well-separated hues; backgrounds are kept desaturated so these stay unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 30),
    "green": (35, 165, 60),
    "blue": (35, 85, 230),
    "purple": (145, 55, 195),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}  # "crosses"
RELATIONS = ("left", "right", "above", "below")
# Glyphs that stay distinct at 5x7 and do not collide with question words ("a") or digits ("o", "i").
LETTERS = ("E", "H", "K", "L", "P", "R", "T", "X")
DIGITS = ("2", "3", "4", "5", "6", "7", "8", "9")
COUNTS = ("1", "2", "3", "4", "5")

# The closed answer vocabulary (answers are lower-case, as the tokenizer lower-cases everything).
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "count": COUNTS,
    "position": RELATIONS,
    "exists": ("yes", "no"),
    "text": tuple(c.lower() for c in LETTERS) + DIGITS,
}

TEMPLATES = {
    "colour": "what colour is the {shape}?",
    "count": "how many {shapes} are there?",
    "position": "where is the {colour} {shape} relative to the {colour2} {shape2}?",
    "exists": "is there a {colour} {shape} in the image?",
    "text_letter": "what letter is written in the image?",
    "text_number": "what number is written in the image?",
}

_TAG = 0x5A4E  # stream tag so shapes and motion never share a generator state
CELL = 28  # layout cell in pixels (see grid_cells)
_VERSION = 2  # bump when the generator changes, so cached training data is not reused


@dataclass
class Item:
    """One QA item of the test-bed.

    ``image`` is set for image items, ``video`` (an mp4 path) for video items. ``metadata`` holds the
    ground truth scene: object boxes ``[x0, y0, x1, y1]`` in pixels, their roles, and
    ``relevant_boxes``, the regions the answer depends on.

    Example:
        >>> Item(id="x", question="what colour is the star?", answer="red", kind="colour").answer
        'red'
    """

    id: str
    question: str
    answer: str
    kind: str
    image: Image.Image | None = None
    video: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def item_rng(tag: int, seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of item ``index`` of ``split``: one stream per item, disjoint ranges per split.

    Example:
        >>> int(item_rng(1, 0, "test", 3).integers(10**6)) == int(item_rng(1, 0, "test", 3).integers(10**6))
        True
    """
    if split not in SPLIT_OFFSET:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= index < MAX_ITEMS:
        raise ValueError(f"index must be in [0, {MAX_ITEMS}), got {index}")
    return np.random.default_rng(np.random.SeedSequence([tag, int(seed), SPLIT_OFFSET[split] + int(index)]))


def question_words() -> set[str]:
    """Every word a ``shapes`` question or answer can contain (the tokenizer's vocabulary is built from it).

    Example:
        >>> {"circles", "relative", "yes"} <= question_words()
        True
    """
    words: set[str] = set()
    for template in TEMPLATES.values():
        words |= set(template.replace("?", " ").replace("{", " {").split())
    words = {w for w in words if not w.startswith("{")}
    words |= set(SHAPES) | set(PLURAL.values()) | set(COLOURS)
    for answers in ANSWERS.values():
        words |= set(answers)
    return words


# ----------------------------------------------------------------------------------------------------
# Backgrounds


def _muted(rng: np.random.Generator, s_max: float = 0.32, v: tuple[float, float] = (0.3, 0.9)) -> np.ndarray:
    """A desaturated colour: clutter must never read as one of the answer colours."""
    h, s, val = rng.random(), rng.uniform(0.03, s_max), rng.uniform(*v)
    return np.array(colorsys.hsv_to_rgb(h, s, val), dtype=np.float32)


def _pink_noise(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """1/f^beta noise in [0, 1]: the power spectrum of natural images (beta ~ 2)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))) / f ** (
        beta / 2
    )
    spectrum[0, 0] = 0.0
    field_ = np.fft.irfft2(spectrum, s=(h, w)).astype(np.float32)
    lo, hi = field_.min(), field_.max()
    return (field_ - lo) / max(hi - lo, 1e-6)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(4)
    period = rng.uniform(5.0, 18.0)
    if kind == 0:  # stripes at a random angle
        theta = rng.uniform(0, math.pi)
        p = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period)
    elif kind == 1:  # checkerboard
        cell = max(3, int(period))
        p = ((x // cell + y // cell) % 2).astype(np.float32)
    elif kind == 2:  # dot lattice
        cell = max(5, int(period))
        d = np.hypot((x % cell) - cell / 2, (y % cell) - cell / 2)
        p = (d < cell * rng.uniform(0.2, 0.4)).astype(np.float32)
    else:  # interfering waves
        p = 0.5 + 0.25 * (np.sin(x / period * 2.1) + np.sin(y / period * 1.7 + x / period * 0.6))
    c1, c2 = _muted(rng), _muted(rng)
    img = c1 * (1 - p[..., None]) + c2 * p[..., None]
    return img + 0.02 * rng.standard_normal(img.shape, dtype=np.float32)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.ogrid[0:size, 0:size]
    y, x = y.astype(np.float32) / size, x.astype(np.float32) / size
    if rng.random() < 0.5:
        theta = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(theta) + y * math.sin(theta)
    else:
        cx, cy = rng.uniform(0, 1, 2)
        t = np.hypot(x - cx, y - cy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c1, c2 = _muted(rng), _muted(rng)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    # A few large soft blobs: gradients alone are too clean to count as clutter.
    for _ in range(rng.integers(2, 5)):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.3)
        # separable Gaussian: an outer product instead of an exp over every pixel
        gy = np.exp(-((y - cy) ** 2) / (2 * r * r))
        gx = np.exp(-((x - cx) ** 2) / (2 * r * r))
        a = (gy * gx)[..., None] * np.float32(rng.uniform(0.2, 0.5))
        img = img * (1 - a) + _muted(rng) * a
    return img + 0.015 * rng.standard_normal(img.shape, dtype=np.float32)


def _photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural landscape: sky gradient, 1/f horizon, 1/f-textured ground."""
    ground = _pink_noise(rng, size, size, 2.0)
    detail = _pink_noise(rng, size, size, 1.0)
    horizon_line = _pink_noise(rng, 1, size, 3.0)[0]
    horizon = (rng.uniform(0.25, 0.6) + 0.15 * (horizon_line - 0.5)) * size
    y = np.arange(size, dtype=np.float32)[:, None]
    sky_mask = (y < horizon[None, :]).astype(np.float32)[..., None]
    sky_top, sky_bottom = _muted(rng, 0.3, (0.6, 0.95)), _muted(rng, 0.2, (0.7, 0.95))
    t = (y / size)[..., None]
    sky = sky_top * (1 - t) + sky_bottom * t
    sky = sky + 0.08 * (_pink_noise(rng, size, size, 2.5)[..., None] - 0.5)  # clouds
    dark, mid, light = (
        _muted(rng, 0.35, (0.2, 0.45)),
        _muted(rng, 0.35, (0.4, 0.65)),
        _muted(rng, 0.3, (0.6, 0.85)),
    )
    g = ground[..., None]
    land = np.where(g < 0.5, dark + (mid - dark) * (g / 0.5), mid + (light - mid) * ((g - 0.5) / 0.5))
    land = land + 0.12 * (detail[..., None] - 0.5)
    return sky * sky_mask + land * (1 - sky_mask)


def _clutter(rng: np.random.Generator, img: Image.Image) -> None:
    """Thin low-contrast scribbles and specks: clutter that is not a shape of the vocabulary."""
    draw = ImageDraw.Draw(img)
    size = img.size[0]
    for _ in range(rng.integers(4, 11)):
        pts = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(rng.integers(2, 4))]
        colour = tuple(int(c * 255) for c in _muted(rng, 0.2, (0.2, 0.9)))
        draw.line(pts, fill=colour, width=1)
    for _ in range(rng.integers(5, 16)):
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.5, 1.5)
        colour = tuple(int(c * 255) for c in _muted(rng, 0.2, (0.2, 0.9)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


BACKGROUND_STYLES = ("texture", "gradient", "photo")


def make_background(rng: np.random.Generator, size: int, style: str | None = None) -> tuple[Image.Image, str]:
    """A cluttered, redundant background of ``size`` x ``size`` pixels and the style it was drawn in.

    Example:
        >>> img, style = make_background(np.random.default_rng(0), 64, "photo")
        >>> img.size, style
        ((64, 64), 'photo')
    """
    style = style or BACKGROUND_STYLES[int(rng.integers(len(BACKGROUND_STYLES)))]
    arr = {"texture": _texture, "gradient": _gradient, "photo": _photo}[style](rng, size)
    img = Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")
    _clutter(rng, img)
    return img, style


# ----------------------------------------------------------------------------------------------------
# Sprites: shapes and glyphs, rendered once at 4x and downsampled (anti-aliased, deterministic)

_SS = 4


def _shape_polygon(shape: str, c: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(c, c - r), (c - r * 0.95, c + r * 0.8), (c + r * 0.95, c + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((c + rad * math.cos(ang), c + rad * math.sin(ang) * 1.05 + r * 0.05))
        return pts
    if shape == "cross":
        t = r * 0.36
        return [
            (c - t, c - r), (c + t, c - r), (c + t, c - t), (c + r, c - t), (c + r, c + t), (c + t, c + t),
            (c + t, c + r), (c - t, c + r), (c - t, c + t), (c - r, c + t), (c - r, c - t), (c - t, c - t),
        ]  # fmt: skip
    return None


@lru_cache(maxsize=4096)
def shape_sprite(shape: str, rgb: tuple[int, int, int], diameter: int) -> np.ndarray:
    """An anti-aliased RGBA sprite (``diameter`` x ``diameter``, uint8) of a filled, dark-outlined shape.

    Example:
        >>> shape_sprite("star", (215, 35, 35), 16).shape
        (16, 16, 4)
    """
    n = diameter * _SS
    im = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    c, r = n / 2, n / 2 - _SS * 0.6
    outline = tuple(int(v * 0.35) for v in rgb) + (255,)
    width = _SS  # a one-pixel outline at the final scale separates the shape from any background
    poly = _shape_polygon(shape, c, r)
    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=rgb + (255,), outline=outline, width=width)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([c - s, c - s, c + s, c + s], fill=rgb + (255,), outline=outline, width=width)
    elif poly is not None:
        draw.polygon(poly, fill=rgb + (255,), outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = im.resize((diameter, diameter), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8).copy()


# 5x7 bitmap glyphs: rendering text ourselves keeps images identical whatever fonts Pillow ships.
_GLYPHS = {
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "K": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "X": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}


def text_plate(char: str, scale: int, plate: tuple[int, int, int], ink: tuple[int, int, int]) -> np.ndarray:
    """An RGBA plate with ``char`` drawn as a ``scale``-times 5x7 bitmap glyph and a 2 px margin.

    Example:
        >>> text_plate("K", 3, (240, 240, 230), (20, 20, 20)).shape
        (25, 19, 4)
    """
    bits = np.array([[c == "1" for c in row] for row in _GLYPHS[char]], dtype=bool)
    glyph = np.kron(bits, np.ones((scale, scale), dtype=bool))
    m = 2
    h, w = glyph.shape[0] + 2 * m, glyph.shape[1] + 2 * m
    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = plate
    out[..., 3] = 255
    out[m : m + glyph.shape[0], m : m + glyph.shape[1], :3][glyph] = ink
    return out


def paste(canvas: np.ndarray, sprite: np.ndarray, x: int, y: int) -> None:
    """Alpha-blend an RGBA uint8 ``sprite`` onto a float32 RGB ``canvas`` (0-255) at top-left ``(x, y)``, in place.

    Example:
        >>> c = np.zeros((8, 8, 3), np.float32); paste(c, np.full((2, 2, 4), 255, np.uint8), 1, 1); float(c[1, 1, 0])
        255.0
    """
    h, w = sprite.shape[:2]
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + h, canvas.shape[0]), min(x + w, canvas.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    s = sprite[y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32)
    a = s[..., 3:] / 255.0
    region = canvas[y0:y1, x0:x1]
    region *= 1 - a
    region += s[..., :3] * a


# ----------------------------------------------------------------------------------------------------
# Scenes


def grid_cells(image_size: int) -> int:
    """Cells per side of the layout grid: objects sit one per cell of 28 px (at 224 px, 8 x 8 cells).

    28 px is one merged Qwen2-VL token (patch 14, 2x2 merge) and one patch of testbed-llava's
    patch-28 tower, so every object and text plate lies inside exactly one visual token: what a
    token shows is never split between two, and "which tokens matter" has an exact answer.

    Example:
        >>> grid_cells(224), grid_cells(112)
        (8, 4)
    """
    return max(2, image_size // CELL)


class _Placer:
    """Objects one per free grid cell, at a random offset inside it (1 px margin, so cells never touch)."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng, self.size = rng, size
        self.n = grid_cells(size)
        self.cell = size // self.n
        self.used: set[tuple[int, int]] = set()
        self.boxes: list[tuple[int, int, int, int]] = []

    def add_at(self, rc: tuple[int, int], w: int, h: int) -> tuple[int, int, int, int] | None:
        r, c = rc
        if rc in self.used or not (0 <= r < self.n and 0 <= c < self.n) or max(w, h) > self.cell - 2:
            return None
        x = c * self.cell + int(self.rng.integers(1, self.cell - w))
        y = r * self.cell + int(self.rng.integers(1, self.cell - h))
        self.used.add(rc)
        box = (x, y, x + w, y + h)
        self.boxes.append(box)
        return box

    def add(self, w: int, h: int) -> tuple[int, int, int, int] | None:
        free = [(r, c) for r in range(self.n) for c in range(self.n) if (r, c) not in self.used]
        if not free:
            return None
        return self.add_at(free[int(self.rng.integers(len(free)))], w, h)


def cell_of(box, cell: int) -> tuple[int, int]:
    """``(row, column)`` of the grid cell holding a box (its centre).

    Example:
        >>> cell_of([30, 60, 50, 80], 28)
        (2, 1)
    """
    return int((box[1] + box[3]) / 2 // cell), int((box[0] + box[2]) / 2 // cell)


def relation(a: tuple[int, int], b: tuple[int, int]) -> str | None:
    """Where cell ``a`` lies relative to cell ``b``, when one axis clearly dominates; else None.

    The main-axis offset must be at least twice the other one (adjacent diagonal cells are ambiguous
    and get None): the rule the ``position`` generator places pairs by.

    Example:
        >>> relation((2, 1), (2, 5)), relation((5, 3), (2, 4)), relation((1, 1), (2, 2))
        ('left', 'below', None)
    """
    dr, dc = a[0] - b[0], a[1] - b[1]
    if abs(dc) >= 1 and 2 * abs(dr) <= abs(dc):
        return "left" if dc < 0 else "right"
    if abs(dr) >= 1 and 2 * abs(dc) <= abs(dr):
        return "above" if dr < 0 else "below"
    return None


def _diameter(rng: np.random.Generator, size: int) -> int:
    # 12-24 px at 224 px (under a third of a 28 px cell's area at most, ~0.3% of the image at least):
    # small enough that a policy which drops tokens at random loses them. Scaled with the cell size.
    cell = size // grid_cells(size)
    return max(4, min(cell - 3, int(round(rng.uniform(12, 24) * cell / CELL))))


def _pick(rng: np.random.Generator, seq, exclude=()) -> Any:
    choices = [s for s in seq if s not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _scene_objects(rng: np.random.Generator, kind: str, sub: int) -> tuple[list[dict], str, str, dict]:
    """Objects (shape, colour, role), question, answer and the query's terms for one item, before placement."""
    colours, shapes = list(COLOURS), list(SHAPES)
    objs: list[dict] = []

    def add(shape, colour, role):
        objs.append({"shape": shape, "colour": colour, "role": role})

    if kind == "colour":
        shape, colour = _pick(rng, shapes), _pick(rng, colours)
        add(shape, colour, "target")
        for _ in range(rng.integers(2, 6)):  # other shapes only: the named shape must be unique
            add(_pick(rng, shapes, {shape}), _pick(rng, colours), "distractor")
        return objs, TEMPLATES["colour"].format(shape=shape), colour, {"shape": shape}
    if kind == "count":
        shape, k = _pick(rng, shapes), int(rng.integers(1, 6))
        for _ in range(k):
            add(shape, _pick(rng, colours), "target")
        for _ in range(rng.integers(1, 4)):
            add(_pick(rng, shapes, {shape}), _pick(rng, colours), "distractor")
        return objs, TEMPLATES["count"].format(shapes=PLURAL[shape]), str(k), {"shape": shape}
    if kind == "position":
        (s1, c1), (s2, c2) = _two_combos(rng)
        rel = _pick(rng, RELATIONS)
        add(s1, c1, "target")
        add(s2, c2, "reference")
        for _ in range(rng.integers(1, 5)):  # distractors never repeat a named combo
            while True:
                s, c = _pick(rng, shapes), _pick(rng, colours)
                if (s, c) not in {(s1, c1), (s2, c2)}:
                    break
            add(s, c, "distractor")
        q = TEMPLATES["position"].format(colour=c1, shape=s1, colour2=c2, shape2=s2)
        objs[0]["relation"] = rel
        return objs, q, rel, {"shape": s1, "colour": c1, "shape2": s2, "colour2": c2}
    if kind == "exists":
        shape, colour = _pick(rng, shapes), _pick(rng, colours)
        present = sub % 2 == 0
        n_other = int(rng.integers(2, 6))
        if present:
            add(shape, colour, "target")
        elif rng.random() < 0.7:
            # POPE-style adversarial negative: the shape or the colour is there, just not together.
            if rng.random() < 0.5:
                add(shape, _pick(rng, colours, {colour}), "lure")
            else:
                add(_pick(rng, shapes, {shape}), colour, "lure")
            n_other -= 1
        for _ in range(max(n_other, 1)):
            while True:
                s, c = _pick(rng, shapes), _pick(rng, colours)
                if (s, c) != (shape, colour):
                    break
            add(s, c, "distractor")
        question = TEMPLATES["exists"].format(colour=colour, shape=shape)
        return objs, question, "yes" if present else "no", {"shape": shape, "colour": colour}
    if kind == "text":
        for _ in range(rng.integers(2, 5)):
            add(_pick(rng, shapes), _pick(rng, colours), "distractor")
        if sub % 2 == 0:
            return objs, TEMPLATES["text_letter"], "letter", {}
        return objs, TEMPLATES["text_number"], "number", {}
    raise ValueError(f"unknown kind {kind!r}")


def _two_combos(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
    s1, c1 = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    while True:
        s2, c2 = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
        if (s2, c2) != (s1, c1):
            return (s1, c1), (s2, c2)


def _place_pair(placer: _Placer, d1: int, d2: int, rel: str) -> bool:
    """Place target and reference in two cells whose :func:`relation` is ``rel`` (a dominant axis)."""
    rng, n = placer.rng, placer.n
    for _ in range(200):
        main = int(rng.integers(1, n))
        perp = int(rng.integers(-(main // 2), main // 2 + 1))
        dr, dc = {"left": (perp, -main), "right": (perp, main), "above": (-main, perp), "below": (main, perp)}[rel]
        r2, c2 = int(rng.integers(n)), int(rng.integers(n))
        a, b = (r2 + dr, c2 + dc), (r2, c2)
        if not (0 <= a[0] < n and 0 <= a[1] < n) or relation(a, b) != rel:
            continue
        if placer.add_at(a, d1, d1) and placer.add_at(b, d2, d2):
            return True
        placer.used.difference_update({a, b})
        placer.boxes.clear()
    return False


def render_shapes_item(split: str, index: int, image_size: int = 224, seed: int = 0) -> Item:
    """Generate item ``index`` of ``split`` alone (what :func:`make_shapes` calls for each item).

    Example:
        >>> render_shapes_item("train", 7).kind
        'position'
    """
    rng = item_rng(_TAG, seed, split, index)
    kind, sub = KINDS[index % len(KINDS)], index // len(KINDS)
    for _attempt in range(50):
        objs, question, answer, query = _scene_objects(rng, kind, sub)
        bg, style = make_background(rng, image_size)
        placer = _Placer(rng, image_size)
        for o in objs:
            o["diameter"] = _diameter(rng, image_size)
        ok = True
        if kind == "position":
            ok = _place_pair(placer, objs[0]["diameter"], objs[1]["diameter"], objs[0]["relation"])
            for o, box in zip(objs[:2], placer.boxes):
                o["box"] = list(box)
        # Text plates first among the rest: they are larger and harder to fit.
        texts = []
        # A text question always shows one letter and one digit, so "which letter" needs reading;
        # other kinds show 0-2 plates as clutter that looks relevant.
        n_plates = 2 if kind == "text" else int(rng.integers(0, 3))
        chars = [_pick(rng, LETTERS), _pick(rng, DIGITS)]
        if rng.random() < 0.5:
            chars.reverse()
        for ch in chars[:n_plates]:
            scale = max(1, (placer.cell - 4) // 7)  # 5x7 glyph + 2 px margin inside one cell (3x at 224)
            plate = tuple(int(v * 255) for v in _muted(rng, 0.12, (0.85, 1.0)))
            ink = tuple(int(v * 255) for v in _muted(rng, 0.3, (0.0, 0.2)))
            sprite = text_plate(ch, scale, plate, ink)
            box = placer.add(sprite.shape[1], sprite.shape[0]) if ok else None
            if box is None:
                ok = False
                break
            texts.append({"char": ch.lower(), "box": list(box), "sprite": sprite})
        for o in objs:
            if "box" in o or not ok:
                continue
            box = placer.add(o["diameter"], o["diameter"])
            if box is None:
                ok = False
                break
            o["box"] = list(box)
        if ok:
            break
    else:  # pragma: no cover - 50 failed layouts would mean a broken size setting
        raise RuntimeError(f"could not lay out shapes item {split}/{index} at {image_size}px")

    if kind == "text":
        want = "letter" if answer == "letter" else "number"
        for t in texts:
            t["role"] = "target" if (t["char"].isdigit() == (want == "number")) else "distractor"
        answer = next(t["char"] for t in texts if t["role"] == "target")
    else:
        for t in texts:
            t["role"] = "distractor"

    canvas = np.asarray(bg, dtype=np.float32).copy()
    for o in objs:
        x0, y0 = o["box"][:2]
        paste(canvas, shape_sprite(o["shape"], COLOURS[o["colour"]], o["diameter"]), x0, y0)
    for t in texts:
        paste(canvas, t.pop("sprite"), *t["box"][:2])
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")

    objects = [{k: v for k, v in o.items() if k not in ("diameter", "relation")} for o in objs]
    if kind == "exists" and answer == "no":
        # To answer "no" every object sharing the colour or the shape must be inspected.
        qcolour, qshape = query["colour"], query["shape"]
        relevant = [o["box"] for o in objects if o["colour"] == qcolour or o["shape"] == qshape]
    else:
        relevant = [o["box"] for o in objects if o["role"] in ("target", "reference")]
        relevant += [t["box"] for t in texts if t["role"] == "target"]
    metadata = {
        "split": split,
        "index": index,
        "seed": seed,
        "image_size": image_size,
        "grid": placer.n,
        "background": style,
        "query": query,
        "objects": objects,
        "texts": texts,
        "relevant_boxes": relevant,
    }
    return Item(
        id=f"shapes-{split}-{seed}-{index:06d}",
        question=question,
        answer=answer,
        kind=kind,
        image=image,
        metadata=metadata,
    )


def scene_questions(metadata: dict) -> dict[str, list[tuple[str, str]]]:
    """Every question a scene answers unambiguously, by kind: ``{kind: [(question, answer), ...]}``.

    Training asks several of them about one image (the visual tokens are encoded once, and each
    answer adds supervision); the eval asks only the item's own question, which is always among them.
    ``exists`` lists every absent shape-colour pair as a "no" (samplers balance yes and no).

    Example:
        >>> it = render_shapes_item("test", 2)
        >>> (it.question, it.answer) in scene_questions(it.metadata)[it.kind]
        True
    """
    from collections import Counter

    objs, texts = metadata["objects"], metadata["texts"]
    cell = metadata["image_size"] // metadata["grid"]
    shapes = Counter(o["shape"] for o in objs)
    combos = Counter((o["shape"], o["colour"]) for o in objs)
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    for o in objs:
        if shapes[o["shape"]] == 1:
            out["colour"].append((TEMPLATES["colour"].format(shape=o["shape"]), o["colour"]))
    for shape, n in sorted(shapes.items()):
        if n <= len(COUNTS):
            out["count"].append((TEMPLATES["count"].format(shapes=PLURAL[shape]), str(n)))
    for shape in SHAPES:
        for colour in COLOURS:
            q = TEMPLATES["exists"].format(colour=colour, shape=shape)
            out["exists"].append((q, "yes" if combos[(shape, colour)] else "no"))
    unique = [o for o in objs if combos[(o["shape"], o["colour"])] == 1]
    for a in unique:
        for b in unique:
            rel = relation(cell_of(a["box"], cell), cell_of(b["box"], cell)) if a is not b else None
            if rel is not None:
                q = TEMPLATES["position"].format(colour=a["colour"], shape=a["shape"], colour2=b["colour"], shape2=b["shape"])
                out["position"].append((q, rel))
    letters = [t["char"] for t in texts if not t["char"].isdigit()]
    digits = [t["char"] for t in texts if t["char"].isdigit()]
    if len(letters) == 1:
        out["text"].append((TEMPLATES["text_letter"], letters[0]))
    if len(digits) == 1:
        out["text"].append((TEMPLATES["text_number"], digits[0]))
    return out


def make_shapes(split: str, n: int, image_size: int = 224, seed: int = 0, start: int = 0) -> list[Item]:
    """Items ``start .. start+n-1`` of ``split``; kinds cycle so any 5 consecutive items hold one of each.

    ``image_size`` 224 gives an 8 x 8 layout grid: 64 patches for testbed-llava's patch-28 CLIP tower,
    64 merged tokens for Qwen2-VL (patch 14, 2x2 merge). Other sizes get ``size // 28`` cells a side.

    Example:
        >>> items = make_shapes("validation", 10, image_size=112)
        >>> sorted({it.kind for it in items}) == sorted(KINDS)
        True
    """
    if n < 0 or start < 0:
        raise ValueError("n and start must be >= 0")
    return [render_shapes_item(split, i, image_size=image_size, seed=seed) for i in range(start, start + n)]


def image_hash(image: Image.Image) -> str:
    """A content hash of an image's pixels (used to prove splits never share a scene).

    Example:
        >>> image_hash(Image.new("RGB", (2, 2))) == image_hash(Image.new("RGB", (2, 2)))
        True
    """
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()


def contact_sheet(items: list[Item], cols: int = 5, scale: int = 1) -> Image.Image:
    """A grid of item images with their question and answer underneath, for looking at the data.

    Example:
        >>> contact_sheet(make_shapes("test", 2, image_size=112), cols=2).size[0]
        224
    """
    from PIL import ImageFont

    font = ImageFont.load_default()
    tile = items[0].image.size[0] * scale
    caption = 40
    rows = math.ceil(len(items) / cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, it in enumerate(items):
        x, y = (k % cols) * tile, (k // cols) * (tile + caption)
        sheet.paste(it.image.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        words, lines, line = it.question.split(), [], ""
        for w in words:  # wrap the question to the tile width
            if draw.textlength(line + " " + w, font=font) > tile - 4 and line:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line + f"  -> {it.answer}")
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines[:3]), fill="black", font=font, spacing=1)
    return sheet
