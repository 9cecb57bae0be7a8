"""The micro model's world: flat shapes on plain backgrounds, their captions, and a checker.

The micro model (`sdlora/micro.py`) is pretrained on images this module draws: one circle,
square or triangle of a named colour, on the left, in the middle or on the right of a plain
background of another named colour, captioned "a red circle on the left on a blue background".
Parts of a caption may be left out ("a red circle"); what is left out is drawn at random.

`check()` reads an image back without any neural network (background colour from the border,
shape colour from the pixels that differ from it, position from their centroid, shape from how
much of its bounding box it fills) and says which of the prompt's claims it agrees with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
"""Side of the micro model's images in pixels."""
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 50),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
# Shape centre x (in pixels) per position; the thirds of the image.
POSITION_X = {"left": 9, "middle": 16, "right": 23}
WORDS = tuple(COLOURS) + SHAPES + ("a", "on", "in", "the", "left", "middle", "right", "background")
"""Every word of every caption: the tokenizer's whole-word vocabulary."""
SUPERSAMPLE = 4  # drawn 4x larger and reduced, so edges are anti-aliased like a photo's


@dataclass(frozen=True)
class Scene:
    """What one image shows; None where the caption leaves it open."""

    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    background: str | None = None

    def caption(self) -> str:
        """`a red circle on the left on a blue background`, without the parts that are None."""
        words = ["a"]
        if self.colour:
            words.append(self.colour)
        words.append(self.shape or "shape")
        if self.position:
            words.append(POSITIONS[self.position])
        if self.background:
            words.append(f"on a {self.background} background")
        return " ".join(words)


def random_scene(rng: random.Random) -> Scene:
    """A fully specified scene: shape colour and background differ."""
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    return Scene(colour, rng.choice(SHAPES), rng.choice(list(POSITIONS)), background)


def partial(scene: Scene, rng: random.Random, drop_position=0.3, drop_background=0.3) -> Scene:
    """The same scene described with the position and/or background left out at random."""
    return Scene(
        scene.colour,
        scene.shape,
        None if rng.random() < drop_position else scene.position,
        None if rng.random() < drop_background else scene.background,
    )


def draw(scene: Scene, rng: random.Random, background: Image.Image | None = None) -> Image.Image:
    """A SIZE x SIZE picture of a fully specified `scene` (size and placement jittered).

    `background`, when given, replaces the plain background (the style sets paint on their own).
    """
    s = SUPERSAMPLE
    if background is None:
        canvas = Image.new("RGB", (SIZE * s, SIZE * s), COLOURS[scene.background])
    else:
        canvas = background.convert("RGB").resize((SIZE * s, SIZE * s), Image.Resampling.LANCZOS)
    side = rng.uniform(11, 14) * s
    cx = (POSITION_X[scene.position] + rng.uniform(-1.5, 1.5)) * s
    cy = (SIZE / 2 + rng.uniform(-4, 4)) * s
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    pen = ImageDraw.Draw(canvas)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif scene.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        x0, y0, x1, y1 = box
        pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return canvas.resize((SIZE, SIZE), Image.Resampling.BOX)


def parse(prompt: str) -> Scene:
    """The claims a prompt of the micro vocabulary makes (words it does not know are ignored)."""
    words = prompt.replace(",", " ").split()
    colour = shape = position = background = None
    for i, word in enumerate(words):
        if word in COLOURS:
            if i + 1 < len(words) and words[i + 1] == "background":
                background = word
            elif colour is None:
                colour = word
        elif word in SHAPES:
            shape = word
        elif word in POSITIONS:
            position = word
    return Scene(colour, shape, position, background)


def read(image: Image.Image) -> Scene:
    """What an image shows, read with plain pixel statistics (see the module docstring)."""
    px = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)  # (H, W, 3)
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3)])
    border = np.concatenate([border, px[:, :2].reshape(-1, 3), px[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    far = np.linalg.norm(px - bg_rgb, axis=-1) > 60
    if far.sum() < 4:
        return Scene(background=_nearest(bg_rgb))
    fg_rgb = np.median(px[far], axis=0)
    # A pixel belongs to the shape when it is nearer the shape's colour than the background's.
    mask = np.linalg.norm(px - fg_rgb, axis=-1) < np.linalg.norm(px - bg_rgb, axis=-1)
    ys, xs = np.nonzero(mask)
    cx = xs.mean()
    position = "left" if cx < 12.5 else "right" if cx > 19.5 else "middle"
    box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box_area
    shape = "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"
    return Scene(_nearest(fg_rgb), shape, position, _nearest(bg_rgb))


def check(prompt: str, image: Image.Image) -> dict[str, bool]:
    """Each claim of `prompt` (colour, shape, position, background) -> whether `image` agrees."""
    wanted, seen = parse(prompt), read(image)
    return {
        key: getattr(seen, key) == getattr(wanted, key)
        for key in ("colour", "shape", "position", "background")
        if getattr(wanted, key) is not None
    }


def _nearest(rgb) -> str:
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(table - np.asarray(rgb), axis=-1)))]


def check_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` full captions of the training vocabulary (colour, shape, position, background)."""
    rng = random.Random(seed)
    return [random_scene(rng).caption() for _ in range(count)]
