"""Write the example style sets in this folder (deterministic; re-run to rebuild them).

`stripes/`: 12 images of simple shapes painted in one style: wide diagonal stripes in a
magenta / teal / gold palette. Each image has a caption naming its subject only; the trigger
word (`zkstripes`) is added by sdlora at training time.

`bands/`: 12 images (32 px) for the shipped micro model, in its vocabulary (`sdlora/shapes.py`):
a white, black or blue shape on the left, in the middle or on the right, over wide diagonal
bands of magenta, teal and orange instead of a plain background. Bands are at least two latent
cells (8 px) across, so the micro VAE keeps them. Trigger word `zkbands` (configs/demo.toml).

    python datasets_examples/make_examples.py
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from sdlora import shapes

SIZE = 96
PALETTE = [(208, 48, 138), (26, 154, 154), (242, 193, 46)]
SUBJECT_COLOURS = {"white": (250, 250, 250), "black": (20, 20, 20), "navy": (24, 32, 96)}
SHAPES = ("circle", "square", "triangle")


def stripes(size: int, width: int, offset: int) -> Image.Image:
    """Diagonal bands cycling through the palette, `width` pixels wide."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = PALETTE[((x + y + offset) // width) % len(PALETTE)]
    return img


def draw_shape(img: Image.Image, shape: str, colour, box) -> None:
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def make_stripes(folder: Path, count: int = 12, seed: int = 7) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        colour_name = list(SUBJECT_COLOURS)[(i // len(SHAPES)) % len(SUBJECT_COLOURS)]
        img = stripes(SIZE, width=rng.choice((14, 16, 18)), offset=rng.randrange(48))
        side = rng.randrange(36, 56)
        x0, y0 = rng.randrange(8, SIZE - side - 8), rng.randrange(8, SIZE - side - 8)
        draw_shape(img, shape, SUBJECT_COLOURS[colour_name], (x0, y0, x0 + side, y0 + side))
        name = f"{i:02d}_{colour_name}_{shape}"
        img.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {colour_name} {shape}\n", encoding="utf-8")


BANDS_PALETTE = [(210, 50, 150), (20, 150, 150), (245, 140, 30)]
BANDS_SUBJECTS = ("white", "black", "blue")


def bands(size: int, width: float, offset: int) -> Image.Image:
    """Diagonal bands cycling through BANDS_PALETTE, `width` pixels wide along x."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = BANDS_PALETTE[int((x + y + offset) // width) % len(BANDS_PALETTE)]
    return img


def make_bands(folder: Path, count: int = 12, seed: int = 11) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scale = shapes.SUPERSAMPLE  # bands drawn at the size shapes are drawn at
    positions = list(shapes.POSITIONS)
    for i in range(count):
        scene = shapes.Scene(
            colour=BANDS_SUBJECTS[(i // len(SHAPES)) % len(BANDS_SUBJECTS)],
            shape=SHAPES[i % len(SHAPES)],
            position=positions[(i + i // len(SHAPES)) % len(positions)],
        )
        background = bands(
            shapes.SIZE * scale, rng.uniform(11, 13) * scale, rng.randrange(40 * scale)
        )
        image = shapes.draw(scene, rng, background=background)
        name = f"{i:02d}_{scene.colour}_{scene.shape}_{scene.position}"
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(scene.caption() + "\n", encoding="utf-8")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent
    make_stripes(root / "stripes")
    make_bands(root / "bands")
