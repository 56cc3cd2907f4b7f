"""The embedded data set: procedurally generated captioned scenes (no download).

Each image holds 2-3 objects (shape, colour, size) placed in cells of a 3 x 3 grid on a dark
background; its five captions name the objects in varied words and orders, so telling
images apart needs the binding of words to image regions (a "red circle and blue square"
scene differs from a "blue circle and red square" one only in which colour goes with which
shape). Generation is deterministic: scene ``i`` of a split depends only on
``(seed, split, i)``.

Extension point (region models such as TERAN): :attr:`Scene.objects` lists each object's
attributes and its box in normalised ``(x0, y0, x1, y1)`` coordinates, so region features and
boxes can be derived from a scene without a detector (see :func:`object_boxes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 210, 220),
}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SPLITS = {"train": 0, "val": 1, "test": 2}

SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box", "square"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
LEADS = ("", "a picture of", "an image showing", "there is", "we can see", "this scene has")
JOINS = ("and", "and", "as well as", "next to", "with")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; ``box`` is ``(x0, y0, x1, y1)`` in [0, 1] image coordinates."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    box: tuple[float, float, float, float]

    @property
    def position(self) -> str:
        """Grid cell in words: "top left", "center", "bottom", ..."""
        row, col = ROWS[self.row], COLS[self.col]
        if row == "middle":
            return col
        return row if col == "center" else f"{row} {col}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int
    captions: tuple[str, ...]


def _position_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    pos = obj.position
    if pos == "center":
        return str(rng.choice(["in the center", "in the middle", "at the center"]))
    if " " in pos:
        return str(rng.choice([f"in the {pos}", f"at the {pos}"]))
    if pos in ("left", "right"):
        return str(rng.choice([f"on the {pos}", f"at the {pos}"]))
    return str(rng.choice([f"at the {pos}", f"near the {pos}"]))


def _object_phrase(obj: SceneObject, rng: np.random.Generator, with_size: bool,
                   with_position: bool) -> str:
    words = []
    if with_size:
        words.append(str(rng.choice(SIZE_WORDS[obj.size])))
    words += [obj.colour, str(rng.choice(SHAPE_WORDS[obj.shape]))]
    phrase = " ".join(words)
    phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    if with_position:
        phrase += " " + _position_phrase(obj, rng)
    return phrase


def make_caption(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> str:
    """One caption naming every object (colour and shape always; size and place mostly)."""
    order = rng.permutation(len(objects))
    with_size = rng.random() < 0.8
    with_position = rng.random() < 0.7
    phrases = [_object_phrase(objects[k], rng, with_size, with_position) for k in order]
    if len(phrases) > 2 and rng.random() < 0.5:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        body = phrases[0]
        for phrase in phrases[1:]:
            body += f" {rng.choice(JOINS)} {phrase}"
    lead = str(rng.choice(LEADS))
    return f"{lead} {body}".strip()


def generate_scene(seed: int, split: str, index: int, min_objects: int = 2,
                   max_objects: int = 3, captions: int = 5) -> Scene:
    """Scene ``index`` of ``split`` (deterministic in ``(seed, split, index)``)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=count, replace=False)
    colour_names = list(COLOURS)
    objects = []
    for cell in cells:
        size = SIZES[int(rng.integers(2))]
        half = (0.13 if size == "large" else 0.08) + rng.uniform(-0.01, 0.01)
        row, col = divmod(int(cell), 3)
        cx = (col + 0.5) / 3 + rng.uniform(-0.03, 0.03)
        cy = (row + 0.5) / 3 + rng.uniform(-0.03, 0.03)
        objects.append(SceneObject(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=colour_names[int(rng.integers(len(colour_names)))],
            size=size, row=row, col=col,
            box=(cx - half, cy - half, cx + half, cy + half),
        ))
    objs = tuple(objects)
    texts = tuple(make_caption(objs, rng) for _ in range(captions))
    return Scene(objects=objs, background=int(rng.integers(0, 60)), captions=texts)


def render(scene: Scene, size: int) -> Image.Image:
    """The scene drawn as an RGB ``size`` x ``size`` image."""
    image = Image.new("RGB", (size, size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = (c * size for c in obj.box)
        colour = COLOURS[obj.colour]
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0 + 0.1 * r, y0 + 0.1 * r, x1 - 0.1 * r, y1 - 0.1 * r), fill=colour)
        elif obj.shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
        elif obj.shape == "diamond":
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
        else:
            w = max(1.0, r * 0.35)
            draw.rectangle((x0, cy - w, x1, cy + w), fill=colour)
            draw.rectangle((cx - w, y0, cx + w, y1), fill=colour)
    return image


def object_boxes(scene: Scene) -> np.ndarray:
    """``[n_objects, 4]`` float32 boxes ``(x0, y0, x1, y1)`` in [0, 1], in scene order."""
    return np.asarray([obj.box for obj in scene.objects], dtype=np.float32).reshape(-1, 4)


def vocabulary() -> list[str]:
    """Every word a caption can hold (the tokenizer's vocabulary), sorted."""
    words = set(SHAPES) | set(COLOURS) | set(ROWS) | set(COLS) | {","}
    for group in (SHAPE_WORDS, SIZE_WORDS):
        for names in group.values():
            for name in names:
                words.update(name.split())
    for text in LEADS + JOINS:
        words.update(text.split())
    words.update("a an in the at on near of".split())
    return sorted(words)

