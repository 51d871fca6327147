"""The shapes world's scenes: a deterministic generator and renderer of coloured shapes on a background.

A :class:`Scene` holds 1 to 6 non-overlapping coloured shapes (:data:`SHAPES` x :data:`COLOURS` x :data:`SIZES`) on
a plain, gradient or lightly noisy background (:data:`BACKGROUNDS`). Geometry is stored in image-relative units
(``0..1``), so :func:`render_scene` draws the same scene at any resolution (224 by default; 64 and 112 work too).
Object colours and background colours are far apart (more than the texture amplitude), so every pixel can be told
apart, and objects keep a gap of :data:`MIN_GAP` so counting is never ambiguous, even at 64 px.

Determinism: only :class:`random.Random` is used for sampling (its Mersenne Twister stream and string seeding via
SHA-512 are stable across Python versions and machines); numpy only does fixed arithmetic on the background. The
same seed gives the same scenes, questions and pixels; PNG bytes are identical for the same Pillow/zlib build.

Seed convention: scene ``i`` of a split is generated from ``random.Random(f"owl2-shapes/{split}/{seed}/{i}/scene")``
and its questions from the same string with ``/questions`` (see :func:`stream_rng`). ``split`` is ``"train"`` for
:func:`~owl2.experiments.shapes.sets.write_training_set` and ``"eval"`` for
:func:`~owl2.experiments.shapes.sets.write_eval_set`, so training and evaluation draw from separate streams and never
share a scene seed, whatever integer seeds are used for either.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# ------------------------------------------------------------------------------------------------------ vocabulary
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
"""Shapes whose silhouettes stay distinct at 64 px (a star or pentagon would blur into a circle when small)."""

PLURALS: dict[str, str] = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}

COLOURS: dict[str, RGB] = {
    "red": (215, 25, 35),
    "green": (40, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (250, 225, 25),
    "purple": (150, 50, 190),
    "orange": (240, 120, 15),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
"""Object colours, pairwise far apart (>= 100 in RGB distance) so no two can be confused."""

BACKGROUNDS: dict[str, RGB] = {
    "grey": (128, 128, 128),
    "beige": (215, 200, 165),
    "dark grey": (78, 78, 78),
}
"""Background colours; none is an object colour and all are > 80 away from every object colour even with texture."""

TEXTURES: tuple[str, ...] = ("plain", "gradient", "noise")
TEXTURE_AMPLITUDE = 10
"""Largest per-channel offset a texture adds to the background colour."""

SIZES: tuple[str, ...] = ("small", "large")
SIZE_EXTENT: dict[str, float] = {"small": 0.12, "large": 0.2}
"""Side of each size's bounding box, as a fraction of the image side (a 1.67 ratio keeps small/large obvious)."""

MIN_GAP = 0.07
"""Least distance between two objects' bounding boxes (fraction of the side): >= 2 clear pixels even at 64 px."""
MARGIN = 0.03
"""Least distance between an object and the image border."""

MIN_RENDER_SIZE = 48
"""Smallest rendering checked to keep every centre pixel and the gaps (below it a small cross's arms vanish)."""

MAX_OBJECTS = 8
"""Most objects :func:`generate_scene` accepts (more large objects would not reliably fit with the gap)."""

MAX_ZOOM = 4.0
"""Largest object scale :func:`generate_scene` accepts (a large object then spans 80 % of the side)."""

# -------------------------------------------------------------------------------------------------- data structures
@dataclass(frozen=True)
class ShapeObject:
    """One object: ``shape``/``colour``/``size`` names and its box, in image-relative units.

    ``x``/``y`` is the centre (``0..1``, ``y`` down, as in images) and ``extent`` the side of the square bounding box
    the shape fills.
    """

    shape: str
    colour: str
    size: str
    x: float
    y: float
    extent: float

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x, self.y)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in image-relative units."""
        half = self.extent / 2
        return (self.x - half, self.y - half, self.x + half, self.y + half)

    def pixel_box(self, size: int) -> tuple[int, int, int, int]:
        """Inclusive pixel box ``(x0, y0, x1, y1)`` of this object in a ``size`` x ``size`` rendering."""
        x0, y0, x1, y1 = self.bbox
        return (math.floor(x0 * size), math.floor(y0 * size), math.ceil(x1 * size) - 1, math.ceil(y1 * size) - 1)

    @property
    def description(self) -> str:
        """``"large red circle"``: the full noun phrase, as captions write it."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: its objects (in generation order), background colour name, texture and texture seed, and an id."""

    objects: tuple[ShapeObject, ...]
    background: str
    texture: str = "plain"
    texture_seed: int = 0
    id: str = "scene"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "background": self.background,
            "texture": self.texture,
            "texture_seed": self.texture_seed,
            "objects": [vars(o).copy() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        objects = tuple(ShapeObject(**o) for o in data["objects"])
        return cls(objects, data["background"], data.get("texture", "plain"), data.get("texture_seed", 0),
                   data.get("id", "scene"))


# ----------------------------------------------------------------------------------------------------------- seeds
def stream_rng(split: str, seed: int, index: int | str, part: str) -> random.Random:
    """The RNG of one stream: ``Random(f"owl2-shapes/{split}/{seed}/{index}/{part}")``.

    String seeds go through SHA-512 in :mod:`random`, so streams are independent and identical on every machine;
    a different ``split`` string keeps train and eval apart for any integer seeds.
    """
    return random.Random(f"owl2-shapes/{split}/{seed}/{index}/{part}")


def _as_rng(rng_or_seed: random.Random | int | str) -> random.Random:
    if isinstance(rng_or_seed, random.Random):
        return rng_or_seed
    return random.Random(rng_or_seed)


# ------------------------------------------------------------------------------------------------------ generation
def generate_scene(
    rng_or_seed: random.Random | int | str,
    *,
    min_objects: int = 1,
    max_objects: int = 6,
    scene_id: str = "scene",
    zoom: float = 1.0,
) -> Scene:
    """A random scene: ``min_objects..max_objects`` objects (uniform count), placed without overlap.

    ``zoom`` scales every object's size (and the gap between objects): values above 1 give the large, easy
    objects of a curriculum's first steps (one object up to zoom 4, three up to about 1.8). Small stays smaller than
    large, so the questions keep their answers.

    A :class:`random.Random` is advanced; an int or str seeds a fresh one. Positions are drawn on a 1/1000 grid
    (clean JSON, exact comparisons) by rejection sampling; a layout that cannot be completed is redrawn, so the
    result stays a function of the RNG state alone.
    """
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    if not 1.0 <= zoom <= MAX_ZOOM:
        raise ValueError(f"zoom must be in [1, {MAX_ZOOM}], got {zoom}")
    rng = _as_rng(rng_or_seed)
    count = rng.randint(min_objects, max_objects)
    background = rng.choice(list(BACKGROUNDS))
    texture = rng.choice(TEXTURES)
    texture_seed = rng.getrandbits(32)
    attributes = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES)) for _ in range(count)]
    for _ in range(1000):
        objects = _place(rng, attributes, zoom)
        if objects is not None:
            return Scene(tuple(objects), background, texture, texture_seed, scene_id)
    raise RuntimeError(f"could not place {count} objects at zoom {zoom}: fewer objects fit when they are larger")


def _place(rng: random.Random, attributes: Sequence[tuple[str, str, str]], zoom: float = 1.0
           ) -> list[ShapeObject] | None:
    """Positions for each ``(shape, colour, size)``, or ``None`` when one object found no room in 100 tries."""
    placed: list[ShapeObject] = []
    for shape, colour, size in attributes:
        extent = round(SIZE_EXTENT[size] * zoom, 3)
        low = math.ceil((MARGIN + extent / 2) * 1000)
        high = math.floor((1 - MARGIN - extent / 2) * 1000)
        for _ in range(100):
            candidate = ShapeObject(shape, colour, size, rng.randint(low, high) / 1000, rng.randint(low, high) / 1000,
                                    extent)
            if all(_gap(candidate, other) >= MIN_GAP * zoom for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def _gap(a: ShapeObject, b: ShapeObject) -> float:
    """Distance between two boxes along the axis where they are furthest apart (negative: they overlap)."""
    half = (a.extent + b.extent) / 2
    return max(abs(a.x - b.x) - half, abs(a.y - b.y) - half)


# ------------------------------------------------------------------------------------------------------- rendering
def render_scene(scene: Scene, size: int = 224, *, antialias: bool = False) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image (``size`` >= :data:`MIN_RENDER_SIZE`).

    Without ``antialias`` every object pixel has exactly its palette colour (what the pixel tests rely on); with it
    the scene is drawn at 4x and box-filtered down, which softens edges only.
    """
    if size < MIN_RENDER_SIZE:
        raise ValueError(f"size must be at least {MIN_RENDER_SIZE} px, got {size}")
    scale = 4 if antialias else 1
    canvas = size * scale
    image = _background(scene, canvas)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, canvas)
    if antialias:
        image = image.resize((size, size), Image.Resampling.BOX)
    return image


def _background(scene: Scene, size: int) -> Image.Image:
    """Background colour plus texture: plain, a linear gradient, or smooth noise from a coarse random grid."""
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    offset = np.zeros((size, size), dtype=np.float64)
    rng = random.Random(scene.texture_seed)
    if scene.texture == "gradient":
        ramp = np.linspace(TEXTURE_AMPLITUDE, -TEXTURE_AMPLITUDE, size)
        direction = rng.randrange(4)  # down, up, right, left
        ramp = ramp if direction % 2 == 0 else ramp[::-1]
        offset = np.broadcast_to(ramp[:, None] if direction < 2 else ramp[None, :], (size, size)).copy()
    elif scene.texture == "noise":
        cells = 6
        grid = np.array([[rng.uniform(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE) for _ in range(cells)]
                         for _ in range(cells)])
        # Separable linear interpolation of the coarse grid: smooth, and plain arithmetic (no resampler version drift).
        positions = np.linspace(0, cells - 1, size)
        rows = np.stack([np.interp(positions, np.arange(cells), grid[:, c]) for c in range(cells)], axis=1)
        offset = np.stack([np.interp(positions, np.arange(cells), rows[r]) for r in range(size)])
    elif scene.texture != "plain":
        raise ValueError(f"unknown texture {scene.texture!r}")
    pixels = np.clip(np.rint(base[None, None, :] + offset[:, :, None]), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, size: int) -> None:
    x0, y0, x1, y1 = obj.pixel_box(size)
    fill = COLOURS[obj.colour]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":  # pointing up, base along the bottom of the box
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif obj.shape == "cross":  # a plus sign with arms a third of the box wide
        arm = max(1, round((x1 - x0 + 1) / 3))
        a0 = round(cx - (arm - 1) / 2)
        b0 = round(cy - (arm - 1) / 2)
        draw.rectangle((x0, b0, x1, b0 + arm - 1), fill=fill)
        draw.rectangle((a0, y0, a0 + arm - 1, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _scene_for(split: str, seed: int, index: int, max_objects: int = 6, zoom: float = 1.0) -> Scene:
    return generate_scene(stream_rng(split, seed, index, "scene"), max_objects=max_objects,
                          scene_id=f"shapes-{split}-{seed}-{index:06d}", zoom=zoom)


def training_scene(seed: int, index: int, *, max_objects: int = 6, zoom: float = 1.0) -> Scene:
    """Scene ``index`` of :func:`write_training_set` with the same ``seed`` (and ``max_objects``/``zoom``): the
    description behind a training image, for labels the conversations do not carry."""
    return _scene_for("train", seed, index, max_objects, zoom)
