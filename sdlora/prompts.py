"""What goes into a generation and what comes out of it: LoRA specs (`FILE:SCALE`), A1111's
`<lora:NAME:SCALE>` prompt tags, trigger words and settings checks; then A1111's `parameters`
infotext and the PNGs that carry it, so A1111's PNG Info and Civitai read prompt, settings and
LoRA hashes back.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sdlora.errors import SdloraError
from sdlora.images import save_png
from sdlora.lora import Lora
from sdlora.lorafile import trigger_words
from sdlora.models import Base

PROMPT_LORA = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


@dataclass
class LoraSpec:
    """A LoRA file and the scale to apply it at."""

    path: Path
    scale: float = 1.0
    lora: Lora | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.stem

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`FILE` or `FILE:SCALE`."""
        path, sep, scale = text.rpartition(":")
        if sep and Path(path).suffix:
            return cls(Path(path), parse_scale(scale, text))
        return cls(Path(text))


def parse_scale(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SdloraError(
            f"LoRA scale {text!r} in {where!r} is not a finite number; "
            "write e.g. style.safetensors:0.8"
        )
    return value


def prompt_loras(prompt: str, lora_dir: Path | None) -> tuple[str, list[LoraSpec]]:
    """Take A1111's `<lora:NAME:SCALE>` tags out of `prompt`, resolving NAME in `lora_dir`.

    NAME is a file name in that folder, never a path: a prompt cannot reach other files.
    """
    specs = []
    for m in PROMPT_LORA.finditer(prompt):
        name, scale = m[1].strip(), m[2]
        if name in ("", ".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
            raise SdloraError(
                f"<lora:{name}> in the prompt is a path; tags take the name of a LoRA file in "
                "--lora-dir (e.g. <lora:style:0.8> for style.safetensors)"
            )
        candidates = [lora_dir / f"{name}{ext}" for ext in (".safetensors", "")] if lora_dir else []
        path = next((p for p in candidates if is_file(p)), None)
        if path is None:
            where = f"in {lora_dir}" if lora_dir else "(pass --lora-dir to say where LoRAs are)"
            raise SdloraError(f"<lora:{name}> in the prompt names no LoRA file {where}")
        specs.append(LoraSpec(path, parse_scale(scale, m[0]) if scale else 1.0))
    clean = re.sub(r"\s*,?\s*$", "", PROMPT_LORA.sub("", prompt)).strip(" ,")
    return re.sub(r"\s{2,}", " ", clean), specs


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system
        return False


SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_PIXELS = 4096 * 4096
MAX_STEPS = 1000  # the bases' training timesteps: samplers cannot take more
MAX_NUM = 10_000


def check_settings(
    steps: int, cfg: float, seed: int, num: int, size: tuple[int, int] | None, max_pixels: int
) -> None:
    """Refuse generation settings that cannot give images, before any model is loaded."""
    if not 1 <= steps <= MAX_STEPS:
        raise SdloraError(f"--steps must be from 1 to {MAX_STEPS}, got {steps}")
    if not 1 <= num <= MAX_NUM:
        raise SdloraError(f"--num must be from 1 to {MAX_NUM}, got {num}")
    if not math.isfinite(cfg):
        raise SdloraError(f"--cfg must be a finite number, got {cfg}")
    if not 0 <= seed <= SEED_MAX - (num - 1):
        raise SdloraError(
            f"--seed must be between 0 and 2**64-1 (with --num {num}: up to "
            f"{SEED_MAX - (num - 1)}), got {seed}"
        )
    if size is not None:
        width, height = size
        if width < 8 or height < 8 or width % 8 or height % 8:
            raise SdloraError(f"--size must be multiples of 8, got {width}x{height}")
        if width * height > max_pixels:
            raise SdloraError(
                f"--size {width}x{height} is {width * height} pixels, more than {max_pixels}; "
                "choose a smaller size or raise --max-pixels"
            )


def with_triggers(prompt: str, loras: list[LoraSpec], mode: str = "warn") -> str:
    """Apply the trigger-word policy: `auto` prepends missing trigger words; `warn` (default)
    warns when a prompt lacks every trigger word of a LoRA that has some; `off` does nothing."""
    lowered = prompt.lower()
    for spec in loras:
        words = trigger_words(spec.lora.metadata) if spec.lora else []
        missing = [w for w in words if w.lower() not in lowered]
        if not words or not missing:
            continue
        if mode == "auto":
            prompt = ", ".join(missing + ([prompt] if prompt else []))
            lowered = prompt.lower()
        elif mode == "warn" and len(missing) == len(words):
            warnings.warn(
                f"the prompt has none of {spec.name}'s trigger words ({', '.join(words)}); "
                "add one or pass --trigger auto",
                stacklevel=2,
            )
    return prompt


def infotext(prompt, negative, steps, sampler, cfg, seed, size, model, model_hash, loras) -> str:
    """A1111's `parameters` text: the prompt with a `<lora:NAME:SCALE>` tag per LoRA,
    `Negative prompt:`, then `Key: value` settings with `Lora hashes` (as A1111 writes them, so
    its PNG Info and "send to txt2img" reproduce the image)."""
    tags = [f"<lora:{s.name}:{s.scale:g}>" for s in loras if s.lora is not None]
    lines = [" ".join(([prompt] if prompt else []) + tags)]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    settings = [
        f"Steps: {steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {cfg:g}",
        f"Seed: {seed}",
        f"Size: {size[0]}x{size[1]}",
    ]
    if model_hash:
        settings.append(f"Model hash: {model_hash}")
    settings.append(f"Model: {Path(model).stem}")
    hashes = [
        f"{s.name}: {s.lora.metadata.get('sshs_model_hash', '')[:12] or _file_autov3(s.path)}"
        for s in loras
        if s.lora is not None
    ]
    if hashes:
        settings.append('Lora hashes: "' + ", ".join(hashes) + '"')
    lines.append(", ".join(settings))
    return "\n".join(lines)


def base_hash(base: Base) -> str:
    """A1111's model hash of a single-file base: first 10 hex digits of its sha256."""
    path = Path(base.name)
    if not path.is_file():
        return ""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def _file_autov3(path: Path) -> str:
    from sdlora.stfile import sha256_after_header

    return sha256_after_header(path.read_bytes())[:12]


def check_output_folder(out_dir: Path) -> None:
    """Refuse an output folder that is a file (before a model is loaded for it)."""
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise SdloraError(f"--out {out_dir} is a file; give a folder for the images")


def save_images(images: list[Image.Image], out_dir: Path, prefix: str = "image") -> list[Path]:
    """Write PNGs with their infotext to `out_dir`; existing files are never replaced."""
    paths, n = [], 0
    for image in images:
        while (out_dir / f"{prefix}_{n:05d}.png").exists():
            n += 1
        info = {"parameters": image.info.get("parameters", "")}
        paths.append(save_png(image, out_dir / f"{prefix}_{n:05d}.png", info))
    return paths
