"""Generating images from a base model with LoRAs applied, trigger words and PNG infotext."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors import safe_open

from sdlora.errors import SdloraError
from sdlora.images import save_png
from sdlora.models import Base, load_base


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the scale to apply it at."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`FILE` or `FILE:SCALE`."""
        path, sep, scale = text.rpartition(":")
        if sep and Path(path).suffix:
            try:
                return cls(Path(path), float(scale))
            except ValueError:
                raise SdloraError(
                    f"LoRA scale in {text!r} must be a number, e.g. style.safetensors:0.8"
                ) from None
        return cls(Path(text))


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (header only)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def trigger_words(metadata: dict[str, str]) -> list[str]:
    """Trigger words recorded in a LoRA's metadata (ModelSpec first, then sd-scripts tags)."""
    phrase = metadata.get("modelspec.trigger_phrase", "")
    words = [w.strip() for w in phrase.split(",") if w.strip()]
    return words


def generate(
    base: str | Base,
    loras: list[LoraSpec] | tuple[LoraSpec, ...] = (),
    prompt: str = "",
    negative: str = "",
    steps: int = 20,
    cfg: float = 7.5,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    num: int = 1,
) -> list[Image.Image]:
    """Images for `prompt` from `base` with `loras` applied; infotext in `image.info`."""
    if isinstance(base, str):
        base = load_base(base)
    for spec in loras:
        if not spec.path.is_file():
            raise SdloraError(f"LoRA file {spec.path} does not exist")
    pipe = base.pipeline(DDIMScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    names, hashes = [], []
    for i, spec in enumerate(loras):
        name = f"lora{i}_{spec.path.stem}"
        pipe.load_lora_weights(str(spec.path), adapter_name=name)
        names.append(name)
        model_hash = read_metadata(spec.path).get("sshs_model_hash", "")
        hashes.append(f"{spec.path.stem}: {model_hash[:12]}")
    if names:
        pipe.set_adapters(names, adapter_weights=[s.scale for s in loras])
    # The model's native size: the UNet's latent size times the VAE's scale (x8 in SD, x4 micro).
    width, height = size or (base.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    images = []
    for n in range(num):
        generator = torch.Generator().manual_seed(seed + n)
        image = pipe(
            prompt,
            negative_prompt=negative or None,
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=height,
            width=width,
            generator=generator,
        ).images[0]
        image.info["parameters"] = infotext(
            prompt, negative, steps, "DDIM", cfg, seed + n, (width, height), base.name, hashes
        )
        images.append(image)
    return images


def infotext(prompt, negative, steps, sampler, cfg, seed, size, model, lora_hashes) -> str:
    """A1111's `parameters` text: prompt, negative prompt, then `Key: value` settings."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    settings = [
        f"Steps: {steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {cfg}",
        f"Seed: {seed}",
        f"Size: {size[0]}x{size[1]}",
        f"Model: {model}",
    ]
    if lora_hashes:
        settings.append("Lora hashes: " + json.dumps(", ".join(lora_hashes)))
    lines.append(", ".join(settings))
    return "\n".join(lines)


def save_images(images: list[Image.Image], out_dir: Path, prefix: str = "image") -> list[Path]:
    """Write PNGs with their infotext to `out_dir`; existing files are never replaced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, n = [], 0
    for image in images:
        while (out_dir / f"{prefix}_{n:05d}.png").exists():
            n += 1
        path = save_png(
            image,
            out_dir / f"{prefix}_{n:05d}.png",
            {"parameters": image.info.get("parameters", "")},
        )
        paths.append(path)
    return paths
