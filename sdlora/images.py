"""Image grids and PNG text chunks."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from sdlora.export import write_atomic

LABEL_LINE = 12
MIN_CELL = 128


def grid(
    images: list[Image.Image], labels: list[str], columns: int | None = None, title: str = ""
) -> Image.Image:
    """Images side by side (wrapping after `columns`), each with its label underneath."""
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    scale = max(1, MIN_CELL // images[0].width)  # tiny samples are enlarged to stay legible
    cw, ch = images[0].width * scale, images[0].height * scale
    chars = max(8, cw // 6)
    wrapped = [textwrap.wrap(label, chars)[:4] or [""] for label in labels]
    label_h = LABEL_LINE * max(len(w) for w in wrapped) + 4
    top = LABEL_LINE + 4 if title else 0
    canvas = Image.new("RGB", (columns * cw, top + rows * (ch + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % columns) * cw, top + (i // columns) * (ch + label_h)
        canvas.paste(image.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + ch + 2 + j * LABEL_LINE), line, fill="black", font=font)
    return canvas


def save_grid(
    images, labels, path: Path, title: str = "", columns: int | None = None, text=None
) -> Path:
    """A grid saved as a PNG, with optional text chunks (e.g. A1111's `parameters`)."""
    return save_png(grid(images, labels, columns, title), path, text)


def save_png(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> Path:
    """Save a PNG atomically, with optional text chunks (e.g. A1111's `parameters`)."""

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return write_atomic(path, buffer.getvalue())


def save_loss_curve(losses: list[float], path: Path, size=(640, 320)) -> Path:
    """A plot of the loss per step (light) and its moving average (dark), as a PNG."""
    width, height = size
    margin = 40
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.rectangle((margin, 10, width - 10, height - margin), outline="black")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        window = max(1, len(losses) // 20)
        windows = [losses[max(0, i - window + 1) : i + 1] for i in range(len(losses))]
        smooth = [sum(w) / len(w) for w in windows]

        def point(i, value):
            x = margin + (width - 10 - margin) * (i / max(1, len(losses) - 1))
            y = height - margin - (height - margin - 10) * ((value - low) / span)
            return x, y

        for values, colour in ((losses, (170, 190, 230)), (smooth, (20, 60, 160))):
            draw.line([point(i, v) for i, v in enumerate(values)], fill=colour, width=1)
        draw.text((2, 10), f"{high:.3g}", fill="black", font=font)
        draw.text((2, height - margin - 10), f"{low:.3g}", fill="black", font=font)
        draw.text((margin, height - margin + 8), "step 1", fill="black", font=font)
        draw.text((width - 80, height - margin + 8), f"step {len(losses)}", fill="black", font=font)
    draw.text((width // 2 - 20, height - 16), "loss", fill="black", font=font)
    return save_png(canvas, path)
