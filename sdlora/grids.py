"""A/B grids: one image per LoRA scale or per trigger word on/off, all from the same seed."""

from __future__ import annotations

from PIL import Image

from sdlora.errors import SdloraError
from sdlora.generate import Generator
from sdlora.prompts import parse_scale, with_triggers


def parse_grid(text: str) -> tuple[str, list[str]]:
    """`scales=0,0.5,1` or `trigger=on,off` as (axis, values), checked before a model loads."""
    axis, _, values = text.partition("=")
    cells = [v.strip() for v in values.split(",")]
    if axis == "scales":
        for value in cells:
            parse_scale(value, f"scales={value}")
    elif axis == "trigger":
        if not set(cells) <= {"on", "off"}:
            raise SdloraError(f"--grid trigger takes on and off, got {values!r}")
    else:
        raise SdloraError(f"--grid takes scales=... or trigger=..., got {axis!r}")
    return axis, cells


def grid_images(
    generator: Generator,
    axis: str,
    values: list[str],
    prompt: str,
    **render,
) -> tuple[list[Image.Image], list[str]]:
    """One image per value of `axis` (`scales` or `trigger`), all from the same seed."""
    images, labels = [], []
    base_scales = [s.scale for s in generator.loras]
    for value in values:
        cell_prompt = prompt
        if axis == "scales":
            scale = parse_scale(value, f"scales={value}")
            generator.set_scales([scale] * len(generator.loras))
            label = f"scale {scale:g}"
        elif axis == "trigger":
            if value not in ("on", "off"):
                raise SdloraError(f"--grid trigger takes on and off, got {value!r}")
            cell_prompt = with_triggers(prompt, generator.loras, "auto" if value == "on" else "off")
            label = f"trigger {value}"
        else:
            raise SdloraError(f"--grid takes scales=... or trigger=..., got {axis!r}")
        image = generator.render(cell_prompt, num=1, **render)[0]
        images.append(image)
        labels.append(f"{label}: {cell_prompt}")
    if axis == "scales":
        generator.set_scales(base_scales)
    return images, labels
