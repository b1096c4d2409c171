"""Seeded synthetic scenes and one-word questions for the pocket benchmark LVLM.

Every sample is a 336x336 RGB image (a 24x24 grid of 14-pixel patches, i.e. the 576 visual tokens of
LLaVA-1.5) showing a few coloured shapes and one small numbered tag on a textured background, together
with a question whose answer is a single word from :data:`ANSWERS`.

Scene contract (what makes every question have exactly one correct answer):

* within a scene every object has a different shape *and* a different colour, so "the circle" and
  "the red object" each name at most one object;
* ``count`` asks for the number of shapes (the tag is not a shape);
* ``exists`` asks about a colour-shape pair; absent pairs are asked exactly as often as present ones;
* ``where`` is only asked about an object whose centre lies clearly in one of the four side regions of
  the image (the offset from the image centre is dominated by one axis, see :func:`direction_of`);
  every scene contains at least one such object;
* ``detail`` asks for the digit printed on the small white tag: a 5x7 bitmap glyph scaled by
  :data:`GLYPH_SCALE` (15x21 pixels) on a 28x28 card aligned to the patch grid, i.e. exactly 4 of the
  576 visual tokens, which aggressive pruning can drop.

Rendering choices that make the scenes learnable by a small ViT trained for about an hour on 2 CPU
cores (each was measured: without it, patch-level shape accuracy stayed at chance in stage A):
shapes have a dark 2-pixel outline, radii come from a small discrete set (:data:`SMALL_RADII`,
:data:`REGULAR_RADII`, a third of the objects are small) and centres lie on a half-patch lattice, so
patch tokens see a finite set of outline fragments. Colours are jittered, backgrounds vary.

Splits never overlap: the random stream of a sample is derived from ``(split id, seed, index)`` through
:class:`numpy.random.SeedSequence`, and the split id is part of the entropy, so the three splits draw from
disjoint seed spaces.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANSWERS",
    "ANSWERS_BY_TYPE",
    "COLORS",
    "COUNT_WORDS",
    "DIGITS",
    "DIRECTIONS",
    "GLYPH_SCALE",
    "GRID",
    "IMAGE_SIZE",
    "LATTICE",
    "MAX_OBJECTS",
    "OUTLINE_WIDTH",
    "PATCH_SIZE",
    "QUESTION_TYPES",
    "REGULAR_RADII",
    "SHAPES",
    "SMALL_RADII",
    "SPLITS",
    "TAG_SIZE",
    "TEMPLATES",
    "VOCAB",
    "Question",
    "Sample",
    "Scene",
    "SceneObject",
    "Tag",
    "ask",
    "direction_of",
    "draw_object",
    "image_digest",
    "make_all_questions",
    "make_sample",
    "make_scene",
    "make_split",
    "patch_labels",
    "sample_rng",
    "tag_size",
    "training_questions",
]

IMAGE_SIZE: int = 336
"""Side of the square images in pixels (LLaVA-1.5 input size)."""

PATCH_SIZE: int = 14
"""Patch side of the vision tower; ``IMAGE_SIZE // PATCH_SIZE = 24`` patches per side."""

GRID: int = IMAGE_SIZE // PATCH_SIZE

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Distinct, arbitrary constants mixed into every sample's seed: the split is part of the entropy, so
# no (split, seed, index) triple of one split can reproduce the random stream of another split.
_SPLIT_IDS: dict[str, int] = {"train": 0x7A11, "validation": 0x5A1D, "test": 0x7E57}

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "where", "detail")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 175, 55),
    "blue": (40, 80, 235),
    "yellow": (240, 225, 30),
    "purple": (150, 50, 205),
    "orange": (255, 140, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))

MAX_OBJECTS: int = len(COUNT_WORDS)

ANSWERS: tuple[str, ...] = (
    *COLORS.keys(),
    *SHAPES,
    *COUNT_WORDS,
    "yes",
    "no",
    *DIRECTIONS,
    *DIGITS,
)
"""The closed answer vocabulary: every :attr:`Sample.answer` is one of these words."""

ANSWERS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS.keys()),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "exists": ("yes", "no"),
    "where": DIRECTIONS,
    "detail": DIGITS,
}

# Question templates. Placeholders: {shape}, {color}. The vocabulary below is derived from them.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {shape}?",),
    "shape": ("what shape is the {color} object?",),
    "count": ("how many shapes are there?",),
    "exists": ("is there a {color} {shape}?",),
    "where": ("where is the {shape}?", "where is the {color} object?"),
    "detail": ("what number is on the tag?",),
}

GLYPH_SCALE: int = 3
"""Pixels per cell of the 5x7 digit bitmaps: glyphs are 15x21 px."""

TAG_SIZE: int = 2 * PATCH_SIZE
"""Side of the square tag card in pixels; the card is aligned to the patch grid (2x2 patches)."""
_WORD_RE = re.compile(r"\w+|[^\w\s]+")

# A 5x7 bitmap per digit ('#' = ink). Drawn by hand for this module.
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}


def _words(text: str) -> list[str]:
    """Split lower-cased text like the tokenizer's ``Whitespace`` pre-tokenizer (``\\w+|[^\\w\\s]+``)."""
    return _WORD_RE.findall(text.lower())


def _build_vocab() -> tuple[str, ...]:
    words: set[str] = set(ANSWERS)
    for templates in TEMPLATES.values():
        for template in templates:
            filled = template.replace("{shape}", SHAPES[0]).replace("{color}", next(iter(COLORS)))
            words.update(_words(filled))
    return tuple(sorted(words))


VOCAB: tuple[str, ...] = _build_vocab()
"""Every word that can appear in a question or an answer (lower case, punctuation as separate words)."""


@dataclass(frozen=True)
class SceneObject:
    """One coloured shape of a scene.

    Attributes
    ----------
    shape : str
        One of :data:`SHAPES`.
    color : str
        One of the keys of :data:`COLORS`.
    cx, cy : float
        Centre in pixels (x to the right, y downwards).
    radius : float
        Radius of the circumscribed circle in pixels.
    rgb : tuple[int, int, int]
        The jittered fill colour actually drawn.
    """

    shape: str
    color: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def small(self) -> bool:
        """Whether the object is about two patches wide or less (one of :data:`SMALL_RADII`)."""
        return self.radius <= max(SMALL_RADII)


@dataclass(frozen=True)
class Tag:
    """The small white tag with a printed digit (the ``detail`` question target).

    Attributes
    ----------
    digit : str
        One of :data:`DIGITS`.
    x0, y0, x1, y1 : int
        Pixel box of the white card, ``x1``/``y1`` exclusive.
    """

    digit: str
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class Scene:
    """A rendered scene without a question.

    Attributes
    ----------
    image : PIL.Image.Image
        RGB image of size ``IMAGE_SIZE x IMAGE_SIZE``.
    objects : list[SceneObject]
        The shapes, 1 to :data:`MAX_OBJECTS` of them, with unique shapes and unique colours.
    tag : Tag
        The numbered tag.
    """

    image: Image.Image
    objects: list[SceneObject]
    tag: Tag


@dataclass(frozen=True)
class Question:
    """A question about a scene.

    Attributes
    ----------
    question : str
        Question text, e.g. ``"what color is the circle?"``.
    answer : str
        One word of :data:`ANSWERS`.
    qtype : str
        One of :data:`QUESTION_TYPES`.
    """

    question: str
    answer: str
    qtype: str


@dataclass(frozen=True)
class Sample:
    """One benchmark item: an image, a question and its one-word answer.

    Attributes
    ----------
    image : PIL.Image.Image
        RGB image, 336x336.
    question : str
        Question text (no prompt template; see :func:`visiondrop.testbed.build_prompt`).
    answer : str
        The single correct answer, a word of :data:`ANSWERS`.
    qtype : str
        One of :data:`QUESTION_TYPES`.
    objects : list[SceneObject]
        Scene shapes (for analysis, e.g. which tokens cover the queried object).
    tag : Tag
        The numbered tag of the scene.
    split : str
        Split the sample belongs to.
    index : int
        Index within the split.
    """

    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list[SceneObject] = field(default_factory=list)
    tag: Tag | None = None
    split: str = "test"
    index: int = 0

    @property
    def scene(self) -> Scene:
        """The sample's scene (image, objects, tag), e.g. for :func:`patch_labels`."""
        return Scene(image=self.image, objects=self.objects, tag=self.tag)


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def sample_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """Random generator of one sample.

    Parameters
    ----------
    split : str
        One of :data:`SPLITS`.
    index : int
        Non-negative sample index.
    seed : int, optional
        Non-negative dataset seed; different seeds give different datasets of the same split.

    Returns
    -------
    numpy.random.Generator
        A PCG64 generator seeded from ``(split id, seed, index)``.

    Raises
    ------
    ValueError
        If ``split`` is unknown or ``index``/``seed`` is negative.
    """
    _check_split(split)
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([_SPLIT_IDS[split], seed, index]))


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator) -> np.ndarray:
    """A muted, textured background (gradient + optional stripes/checks + noise).

    Returns
    -------
    numpy.ndarray
        ``(IMAGE_SIZE, IMAGE_SIZE, 3)`` float32 array in [0, 255].
    """
    size = IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # Low-saturation base colours (grey with a slight tint) keep the saturated objects salient.
    grey_a, grey_b = rng.uniform(70, 170, size=2)
    tint_a = rng.uniform(-12, 12, size=3)
    tint_b = rng.uniform(-12, 12, size=3)
    col_a = grey_a + tint_a
    col_b = grey_b + tint_b
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy).astype(np.float32)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = col_a[None, None, :] * (1 - t[..., None]) + col_b[None, None, :] * t[..., None]

    kind = rng.integers(0, 3)
    if kind == 0:  # stripes
        freq = rng.uniform(6, 20)
        phi = rng.uniform(0, 2 * math.pi)
        s_angle = rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * freq * (np.cos(s_angle) * xx + np.sin(s_angle) * yy) + phi)
        img = img + rng.uniform(8, 18) * wave[..., None]
    elif kind == 1:  # soft checkerboard
        cells = rng.integers(4, 12)
        check = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 2 - 1
        img = img + rng.uniform(6, 14) * check[..., None]
    # kind == 2: plain gradient (noise below still makes it textured)

    img = img + rng.normal(0.0, rng.uniform(5, 12), size=img.shape)
    return np.clip(img, 0, 255).astype(np.float32)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape, or ``None`` for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r / math.sqrt(2.0)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a))) for a in (90, 210, 330)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = math.radians(90 + 36 * k)
            pts.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.32 * r
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


OUTLINE_WIDTH: int = 2
"""Width in pixels of the dark outline around every shape."""


def draw_object(
    draw: ImageDraw.ImageDraw,
    obj: SceneObject,
    fill: int | tuple[int, int, int],
    outline: int | tuple[int, int, int] | None = None,
) -> None:
    """Draw one object onto ``draw`` (used for both the image and the label masks).

    Parameters
    ----------
    draw : PIL.ImageDraw.ImageDraw
        Target canvas.
    obj : SceneObject
        Object to draw.
    fill : int or tuple[int, int, int]
        Fill value (an RGB colour for images, an integer label for ``"L"`` masks).
    outline : int or tuple[int, int, int], optional
        Colour of the :data:`OUTLINE_WIDTH`-pixel outline; ``fill`` when ``None`` (masks).
    """
    line = fill if outline is None else outline
    poly = _shape_polygon(obj.shape, obj.cx, obj.cy, obj.radius)
    if poly is None:
        r = obj.radius * 0.92  # a circle of the same circumradius looks larger than the polygons
        draw.ellipse(
            [obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r], fill=fill, outline=line, width=OUTLINE_WIDTH
        )
    else:
        draw.polygon(poly, fill=fill, outline=line, width=OUTLINE_WIDTH)


def _draw_tag(draw: ImageDraw.ImageDraw, tag: Tag, rng: np.random.Generator) -> None:
    paper = int(rng.integers(225, 256))
    ink = int(rng.integers(0, 50))
    draw.rectangle([tag.x0, tag.y0, tag.x1 - 1, tag.y1 - 1], fill=(paper, paper, paper))
    s = GLYPH_SCALE
    # Glyph roughly centred on the card, jittered by a pixel so it is not pixel-identical every time.
    off_x = (TAG_SIZE - 5 * s) // 2 + int(rng.integers(-1, 2))
    off_y = (TAG_SIZE - 7 * s) // 2 + int(rng.integers(0, 2))
    for row, line in enumerate(_GLYPHS[tag.digit]):
        for col, cell in enumerate(line):
            if cell == "#":
                x = tag.x0 + off_x + col * s
                y = tag.y0 + off_y + row * s
                draw.rectangle([x, y, x + s - 1, y + s - 1], fill=(ink, ink, ink))


def tag_size() -> tuple[int, int]:
    """Width and height in pixels of the tag card (2x2 patches)."""
    return TAG_SIZE, TAG_SIZE


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


def direction_of(cx: float, cy: float) -> str | None:
    """Unambiguous side region of a point, or ``None`` when it is not clearly on one side.

    The offset from the image centre is normalised by half the image size; a point is on a side when
    the dominant axis offset is at least 0.35 and at least twice the other axis offset. Points near the
    centre or near a diagonal have no direction, so ``where`` questions are never asked about them.

    Parameters
    ----------
    cx, cy : float
        Point in pixels (y downwards).

    Returns
    -------
    str or None
        ``"left"``, ``"right"``, ``"top"``, ``"bottom"`` or ``None``.
    """
    half = IMAGE_SIZE / 2
    dx, dy = (cx - half) / half, (cy - half) / half
    if abs(dx) >= 0.35 and abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 0.35 and abs(dy) >= 2 * abs(dx):
        return "top" if dy < 0 else "bottom"
    return None


SMALL_RADII: tuple[int, ...] = (10, 12)
"""Radii (px) of small objects: 20-24 px wide, i.e. about 2x2 patches."""

REGULAR_RADII: tuple[int, ...] = (16, 20, 24)
"""Radii (px) of regular objects: 32-48 px wide, i.e. 3-4 patches."""

LATTICE: int = PATCH_SIZE // 2
"""Object centres lie on this lattice (patch centres and patch corners)."""


def _sample_radius(rng: np.random.Generator) -> float:
    # About a third of the objects are small (they are what pruning loses). Sizes are discrete and
    # centres are snapped to the half-patch lattice, so each patch token sees one of a finite set of
    # outline fragments: a small ViT trained for minutes on CPU cannot learn translation-invariant
    # shape recognition (patch-level shape accuracy stayed at chance with continuous positions), but
    # learns these fragments quickly, like the grid-aligned digits.
    if rng.random() < 0.3:
        return float(SMALL_RADII[int(rng.integers(0, len(SMALL_RADII)))])
    return float(REGULAR_RADII[int(rng.integers(0, len(REGULAR_RADII)))])


def _snap(v: float, r: float) -> float:
    """Snap a coordinate to the lattice while keeping the object inside the image."""
    lo = math.ceil((r + 2) / LATTICE) * LATTICE
    hi = math.floor((IMAGE_SIZE - r - 2) / LATTICE) * LATTICE
    return float(min(max(round(v / LATTICE) * LATTICE, lo), hi))


def _anchor_position(rng: np.random.Generator, r: float, direction: str) -> tuple[float, float]:
    """A centre clearly inside the side region ``direction`` for an object of radius ``r``."""
    half = IMAGE_SIZE / 2
    margin = (r + 4) / half
    along = rng.uniform(0.42, max(0.43, 1.0 - margin))
    across = rng.uniform(-0.4, 0.4) * along
    sign = -1.0 if direction in ("left", "top") else 1.0
    if direction in ("left", "right"):
        dx, dy = sign * along, across
    else:
        dx, dy = across, sign * along
    return half + dx * half, half + dy * half


def _overlaps(cx: float, cy: float, r: float, placed: list[tuple[float, float, float]]) -> bool:
    return any(math.hypot(cx - px, cy - py) < r + pr + 6 for px, py, pr in placed)


def make_scene(
    split: str, index: int, seed: int = 0, max_objects: int = MAX_OBJECTS
) -> tuple[Scene, np.random.Generator]:
    """Render the scene of sample ``index`` of ``split``.

    Parameters
    ----------
    split : str
        One of :data:`SPLITS`.
    index : int
        Sample index (>= 0).
    seed : int, optional
        Dataset seed (>= 0).
    max_objects : int, optional
        Upper bound of the uniformly drawn number of shapes (training curricula use small values;
        benchmark samples always use :data:`MAX_OBJECTS`).

    Returns
    -------
    scene : Scene
        The rendered scene.
    rng : numpy.random.Generator
        The sample's generator, advanced past the scene; question sampling continues from it so that
        the whole sample is a function of ``(split, index, seed)``.
    """
    rng = sample_rng(split, index, seed)
    size = IMAGE_SIZE
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
    n_objects = int(rng.integers(1, max_objects + 1))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_objects]]
    color_names = list(COLORS)
    colors = [color_names[i] for i in rng.permutation(len(color_names))[:n_objects]]

    placed: list[tuple[float, float, float]] = []
    objects: list[SceneObject] = []
    # The first object is the "anchor": placed clearly on one side so a `where` question always exists.
    anchor_dir = DIRECTIONS[int(rng.integers(0, len(DIRECTIONS)))]
    for k in range(n_objects):
        for _attempt in range(200):
            r = _sample_radius(rng)
            if k == 0:
                cx, cy = _anchor_position(rng, r, anchor_dir)
            else:
                cx = float(rng.uniform(r + 4, size - r - 4))
                cy = float(rng.uniform(r + 4, size - r - 4))
            cx, cy = _snap(cx, r), _snap(cy, r)
            if k == 0 and direction_of(cx, cy) != anchor_dir:
                continue
            if not _overlaps(cx, cy, r, placed):
                break
        else:  # pragma: no cover - 200 failures for <= 5 objects on 336 px essentially never happen
            raise RuntimeError(f"could not place object {k} of sample {split}/{index}")
        base = np.array(COLORS[colors[k]], dtype=np.float64)
        rgb = tuple(int(v) for v in np.clip(base + rng.uniform(-18, 18, size=3), 0, 255))
        placed.append((cx, cy, r))
        objects.append(SceneObject(shapes[k], colors[k], float(cx), float(cy), float(r), rgb))

    # The tag card sits on the patch grid: exactly 2x2 patches (4 of the 576 visual tokens), so each
    # of its tokens always sees the same quarter of the glyph (learnable by a small ViT on CPU), and
    # dropping those 4 tokens removes the detail entirely.
    cells = GRID - TAG_SIZE // PATCH_SIZE + 1
    tag_r = math.hypot(TAG_SIZE, TAG_SIZE) / 2
    for _attempt in range(500):
        x0 = int(rng.integers(0, cells)) * PATCH_SIZE
        y0 = int(rng.integers(0, cells)) * PATCH_SIZE
        if not _overlaps(x0 + TAG_SIZE / 2, y0 + TAG_SIZE / 2, tag_r, placed):
            break
    else:  # pragma: no cover
        raise RuntimeError(f"could not place the tag of sample {split}/{index}")
    tag = Tag(DIGITS[int(rng.integers(0, 10))], x0, y0, x0 + TAG_SIZE, y0 + TAG_SIZE)

    image = Image.fromarray(_background(rng).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        # A dark outline (like a cartoon) gives every shape the same colour-independent edge signal,
        # which is what makes patch-level shape recognition learnable in a CPU budget.
        dark = int(rng.integers(10, 45))
        draw_object(draw, obj, obj.rgb, outline=(dark, dark, dark))
    _draw_tag(draw, tag, rng)
    return Scene(image=image, objects=objects, tag=tag), rng


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------


def ask(scene: Scene, qtype: str, rng: np.random.Generator, exists_answer: bool | None = None) -> Question:
    """Sample a question of type ``qtype`` about ``scene``.

    Parameters
    ----------
    scene : Scene
        The scene.
    qtype : str
        One of :data:`QUESTION_TYPES`.
    rng : numpy.random.Generator
        Source of randomness (the sample's generator).
    exists_answer : bool, optional
        For ``exists`` questions, force a present (``True``) or absent (``False``) pair; random 50/50
        when ``None``.

    Returns
    -------
    Question
        The question, its unique answer and its type.

    Raises
    ------
    ValueError
        If ``qtype`` is unknown.
    """
    objs = scene.objects
    templates = TEMPLATES.get(qtype)
    if templates is None:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    template = templates[int(rng.integers(0, len(templates)))]
    if qtype == "color":
        obj = objs[int(rng.integers(0, len(objs)))]
        return Question(template.format(shape=obj.shape), obj.color, qtype)
    if qtype == "shape":
        obj = objs[int(rng.integers(0, len(objs)))]
        return Question(template.format(color=obj.color), obj.shape, qtype)
    if qtype == "count":
        return Question(template, COUNT_WORDS[len(objs) - 1], qtype)
    if qtype == "exists":
        present = bool(rng.random() < 0.5) if exists_answer is None else exists_answer
        pairs = {(o.color, o.shape) for o in objs}
        if present:
            color, shape = sorted(pairs)[int(rng.integers(0, len(pairs)))]
        else:
            absent = sorted((c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs)
            color, shape = absent[int(rng.integers(0, len(absent)))]
        return Question(template.format(color=color, shape=shape), "yes" if present else "no", qtype)
    if qtype == "where":
        candidates = [o for o in objs if direction_of(o.cx, o.cy) is not None]
        obj = candidates[int(rng.integers(0, len(candidates)))]
        direction = direction_of(obj.cx, obj.cy)
        assert direction is not None  # guaranteed by the anchor placement
        return Question(template.format(shape=obj.shape, color=obj.color), direction, qtype)
    # detail
    return Question(template, scene.tag.digit, qtype)


def training_questions(scene: Scene, rng: np.random.Generator, max_where: int = 2) -> list[Question]:
    """Many questions about one scene (training only: the image is encoded once for all of them).

    Parameters
    ----------
    scene : Scene
        The scene.
    rng : numpy.random.Generator
        Source of randomness.
    max_where : int, optional
        At most this many ``where`` questions (about different eligible objects).

    Returns
    -------
    list[Question]
        The colour and the shape question of every object, ``where`` questions, one present and one
        absent ``exists`` pair, ``count`` and ``detail``: at most ``2 * 5 + 2 + 2 + 2 = 16`` questions.
    """
    questions: list[Question] = []
    for obj in scene.objects:
        t_color = TEMPLATES["color"][int(rng.integers(0, len(TEMPLATES["color"])))]
        t_shape = TEMPLATES["shape"][int(rng.integers(0, len(TEMPLATES["shape"])))]
        questions.append(Question(t_color.format(shape=obj.shape), obj.color, "color"))
        questions.append(Question(t_shape.format(color=obj.color), obj.shape, "shape"))
    eligible = [o for o in scene.objects if direction_of(o.cx, o.cy) is not None]
    for k in rng.permutation(len(eligible))[:max_where]:
        obj = eligible[int(k)]
        template = TEMPLATES["where"][int(rng.integers(0, len(TEMPLATES["where"])))]
        direction = direction_of(obj.cx, obj.cy)
        assert direction is not None
        questions.append(Question(template.format(shape=obj.shape, color=obj.color), direction, "where"))
    questions.append(ask(scene, "exists", rng, exists_answer=True))
    questions.append(ask(scene, "exists", rng, exists_answer=False))
    questions.append(ask(scene, "count", rng))
    questions.append(ask(scene, "detail", rng))
    return questions


def make_sample(split: str, index: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``split``: deterministic in ``(split, index, seed)``.

    The question type cycles through :data:`QUESTION_TYPES` with the index (``index % 6``), so any run of
    six consecutive indices holds one question of each type; ``exists`` questions alternate between a
    present and an absent pair (``(index // 6) % 2``), so yes/no is balanced exactly.

    Parameters
    ----------
    split : str
        ``"train"``, ``"validation"`` or ``"test"``.
    index : int
        Sample index (>= 0).
    seed : int, optional
        Dataset seed (>= 0).

    Returns
    -------
    Sample
        Image, question, answer and scene metadata.

    Raises
    ------
    ValueError
        If ``split`` is unknown or ``index``/``seed`` is negative.
    """
    scene, rng = make_scene(split, index, seed)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    exists_answer = (index // len(QUESTION_TYPES)) % 2 == 0
    q = ask(scene, qtype, rng, exists_answer=exists_answer)
    return Sample(
        image=scene.image,
        question=q.question,
        answer=q.answer,
        qtype=q.qtype,
        objects=list(scene.objects),
        tag=scene.tag,
        split=split,
        index=index,
    )


def make_split(split: str, n: int, seed: int = 0, start: int = 0) -> list[Sample]:
    """The first ``n`` samples (from ``start``) of ``split``.

    Parameters
    ----------
    split : str
        One of :data:`SPLITS`.
    n : int
        Number of samples (>= 0).
    seed : int, optional
        Dataset seed.
    start : int, optional
        First index.

    Returns
    -------
    list[Sample]
        ``[make_sample(split, i, seed) for i in range(start, start + n)]``.

    Raises
    ------
    ValueError
        If ``split`` is unknown or ``n`` is negative.
    """
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return [make_sample(split, i, seed) for i in range(start, start + n)]


def make_all_questions(
    split: str, index: int, seed: int = 0, max_objects: int = MAX_OBJECTS
) -> tuple[Scene, list[Question]]:
    """A scene with one question of every type (used for training: one image, six targets).

    Parameters
    ----------
    split : str
        One of :data:`SPLITS`.
    index : int
        Scene index (>= 0).
    seed : int, optional
        Dataset seed.
    max_objects : int, optional
        Passed to :func:`make_scene`.

    Returns
    -------
    scene : Scene
        Identical to the scene of ``make_sample(split, index, seed)`` when ``max_objects`` is the default.
    questions : list[Question]
        One question per entry of :data:`QUESTION_TYPES`, in that order; ``exists`` is yes/no at random.
    """
    scene, rng = make_scene(split, index, seed, max_objects)
    return scene, [ask(scene, qtype, rng) for qtype in QUESTION_TYPES]


def patch_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Per-patch labels of a scene on the 24x24 patch grid (for auxiliary vision training).

    A patch takes the label of the object covering most of its pixels when that object covers at least
    15% of the patch; the tag labels the patches it covers by at least 15% with its digit.

    Parameters
    ----------
    scene : Scene
        The scene.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``"color"``: ``(GRID, GRID)`` int64, 0 = none, ``1 + colour index``;
        ``"shape"``: ``(GRID, GRID)`` int64, 0 = none, ``1 + shape index``;
        ``"digit"``: ``(GRID, GRID)`` int64, 0 = none, ``1 + digit``;
        ``"center"``: ``(GRID, GRID)`` int64, 1 on the patch holding an object's centre.
    """
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for k, obj in enumerate(scene.objects):
        draw_object(draw, obj, k + 1)
    tag_id = len(scene.objects) + 1
    t = scene.tag
    draw.rectangle([t.x0, t.y0, t.x1 - 1, t.y1 - 1], fill=tag_id)
    ids = np.asarray(mask, dtype=np.int64).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3)
    n_ids = tag_id + 1
    # Histogram of ids per patch in one bincount: bin = patch index * n_ids + id.
    patch_index = np.arange(GRID * GRID, dtype=np.int64).reshape(GRID, GRID, 1, 1)
    flat = (patch_index * n_ids + ids).reshape(-1)
    counts = np.bincount(flat, minlength=GRID * GRID * n_ids).reshape(GRID, GRID, n_ids)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    covered = counts.max(-1) >= 0.15 * PATCH_SIZE * PATCH_SIZE
    best = np.where(covered, best, 0)

    color_names = list(COLORS)
    color_lut = np.zeros(tag_id + 1, dtype=np.int64)
    shape_lut = np.zeros(tag_id + 1, dtype=np.int64)
    digit_lut = np.zeros(tag_id + 1, dtype=np.int64)
    for k, obj in enumerate(scene.objects):
        color_lut[k + 1] = 1 + color_names.index(obj.color)
        shape_lut[k + 1] = 1 + SHAPES.index(obj.shape)
    digit_lut[tag_id] = 1 + int(t.digit)
    center = np.zeros((GRID, GRID), dtype=np.int64)
    for obj in scene.objects:
        center[min(int(obj.cy) // PATCH_SIZE, GRID - 1), min(int(obj.cx) // PATCH_SIZE, GRID - 1)] = 1
    return {"color": color_lut[best], "shape": shape_lut[best], "digit": digit_lut[best], "center": center}


def image_digest(image: Image.Image) -> str:
    """SHA-256 of the raw pixels of an image (used to check that splits never share an image)."""
    return hashlib.sha256(image.tobytes()).hexdigest()
