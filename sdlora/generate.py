"""Generating images from a base model with LoRAs applied, trigger words and PNG infotext.

Every LoRA passes the version guard before any weights of the base are loaded (family) and
before any image is computed (module shapes). Images carry A1111's `parameters` infotext, so
A1111's PNG Info and Civitai read prompt, settings and LoRA hashes back.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from sdlora.errors import SdloraError
from sdlora.export import DTYPES
from sdlora.guard import check_compatible, check_family, check_prediction
from sdlora.images import save_png
from sdlora.lora import Lora, add_lora
from sdlora.lorafile import read_lora, trigger_words
from sdlora.models import Base, base_family, load_base, set_schedule
from sdlora.schedule import (
    guidance_rescale,
    is_zero_terminal_snr,
    prediction_from_metadata,
    zero_snr_from_metadata,
)

# Sampler name -> (diffusers scheduler, extra config, A1111's name for the infotext).
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, "Euler a"),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "ddim": (DDIMScheduler, {}, "DDIM"),
    "unipc": (UniPCMultistepScheduler, {}, "UniPC"),
}
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
            return cls(Path(path), _scale(scale, text))
        return cls(Path(text))


def _scale(text: str, where: str) -> float:
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
        path = next((p for p in candidates if _is_file(p)), None)
        if path is None:
            where = f"in {lora_dir}" if lora_dir else "(pass --lora-dir to say where LoRAs are)"
            raise SdloraError(f"<lora:{name}> in the prompt names no LoRA file {where}")
        specs.append(LoraSpec(path, _scale(scale, m[0]) if scale else 1.0))
    clean = re.sub(r"\s*,?\s*$", "", PROMPT_LORA.sub("", prompt)).strip(" ,")
    return re.sub(r"\s{2,}", " ", clean), specs


def _is_file(path: Path) -> bool:
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


def check_sampler(name: str) -> None:
    """Refuse an unknown sampler name (before a base is loaded for it)."""
    if name not in SAMPLERS:
        raise SdloraError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_scheduler(name: str, base: Base):
    """The diffusers scheduler for sampler `name`, with the base's schedule and prediction."""
    check_sampler(name)
    cls, extra, _ = SAMPLERS[name]
    return cls.from_config({**base.scheduler.config, **extra})


@dataclass
class Generator:
    """A base with LoRAs attached as peft adapters, ready to render prompts."""

    base: Base
    loras: list[LoraSpec]
    fused: bool = False
    model_hash: str = ""
    """A1111's hash of a single-file base (first 10 hex digits of its sha256)."""

    @classmethod
    def load(
        cls,
        base: str | Base,
        loras: list[LoraSpec] | tuple[LoraSpec, ...] = (),
        fuse: bool = False,
        allow_pickle: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        prediction_type: str | None = None,
        zero_terminal_snr: bool = False,
    ) -> Generator:
        """Read and check every LoRA, load the base, attach the LoRAs (fused if asked), then
        move everything to `device` in `dtype` (see `placement`).

        The noise schedule is the base's, or `prediction_type` / `zero_terminal_snr` when
        given; a LoRA's metadata fills in what a base file cannot tell (see `match_schedule`).
        """
        target, torch_dtype = placement(device, dtype)
        loras = list(loras)
        family = base.family if isinstance(base, Base) else None
        for spec in loras:
            if not _is_file(spec.path):
                raise SdloraError(f"LoRA file {spec.path} does not exist")
            spec.lora = read_lora(spec.path, allow_pickle)
            family = family or base_family(base)
            for note in check_family(family, spec.lora, spec.name):  # before loading the base
                warnings.warn(note, stacklevel=2)
        if not isinstance(base, Base):
            base = load_base(base)
        match_schedule(base, [s.lora for s in loras], prediction_type, zero_terminal_snr)
        for i, spec in enumerate(loras):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # family notes were given above
                check_compatible(base, spec.lora, spec.name)
            for note in check_prediction(base, spec.lora, spec.name):
                warnings.warn(note, stacklevel=2)
            for component, model in {"unet": base.unet, **base.text_encoders}.items():
                if spec.lora.components.get(component):
                    add_lora(model, spec.lora.components[component], adapter_name(i))
        generator = cls(base, loras, model_hash=base_hash(base))
        generator.set_scales([s.scale for s in loras])
        if fuse and loras:
            generator.pipeline().fuse_lora(adapter_names=generator.adapters())  # in fp32
            generator.fused = True
        for model in (base.unet, *base.text_encoders.values()):
            model.to(target, torch_dtype)
        base.vae.to(target, vae_dtype(base, torch_dtype))
        return generator

    def adapters(self) -> list[str]:
        return [adapter_name(i) for i in range(len(self.loras))]

    def set_scales(self, scales: list[float]) -> None:
        """Set each LoRA's weight (not possible once fused)."""
        if self.fused:
            raise SdloraError("the LoRAs are fused into the weights; load again to change scales")
        for spec, scale in zip(self.loras, scales, strict=True):
            spec.scale = scale
        if self.loras:
            self.pipeline().set_adapters(self.adapters(), adapter_weights=scales)

    def pipeline(self, sampler: str = "ddim"):
        pipe = self.base.pipeline(make_scheduler(sampler, self.base))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def render(
        self,
        prompt: str,
        negative: str = "",
        steps: int = 20,
        cfg: float = 7.5,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        num: int = 1,
        sampler: str = "ddim",
        rescale: float | None = None,
    ) -> list[Image.Image]:
        """`num` images for `prompt`, seeds `seed`, `seed + 1`, ...; infotext in `image.info`.
        `rescale` is the guidance rescale φ (None: 0.7 with zero terminal SNR, else 0)."""
        pipe = self.pipeline(sampler)
        rescale = guidance_rescale(self.base.scheduler) if rescale is None else rescale
        # Native size: the UNet's latent size times the VAE's scale (x8 in SD, x4 micro).
        width, height = size or (self.base.unet.config.sample_size * pipe.vae_scale_factor,) * 2
        images = []
        for n in range(num):
            image = pipe(
                prompt,
                negative_prompt=negative or None,
                num_inference_steps=steps,
                guidance_scale=cfg,
                guidance_rescale=rescale,
                height=height,
                width=width,
                generator=torch.Generator().manual_seed(seed + n),
            ).images[0]
            image.info["parameters"] = infotext(
                prompt, negative, steps, SAMPLERS[sampler][2], cfg, seed + n, (width, height),
                self.base.name, self.model_hash, self.loras,
            )  # fmt: skip
            images.append(image)
        return images


def match_schedule(
    base: Base, loras: list[Lora], prediction_type: str | None, zero_terminal_snr: bool
) -> None:
    """Set the base's noise schedule for sampling: `prediction_type` when given, else the
    base's own, or, when the base cannot tell (a single file without ModelSpec metadata), the
    one its LoRAs were trained under; zero terminal SNR when asked, when the base has it, or
    when a LoRA was trained with it (the samplers then start from pure noise)."""
    stated = [p for p in (prediction_from_metadata(lora.metadata) for lora in loras) if p]
    if prediction_type is None and not base.prediction_stated and stated:
        prediction_type = stated[0]
    # A LoRA trained with zero terminal SNR tells of a v-prediction base trained so.
    zero_snr = zero_terminal_snr or (
        (prediction_type or base.prediction_type) == "v_prediction"
        and any(zero_snr_from_metadata(lora.metadata) for lora in loras)
    )
    if prediction_type not in (None, base.prediction_type) or (
        zero_snr and not is_zero_terminal_snr(base.scheduler)
    ):
        set_schedule(base, prediction_type, zero_snr)


def placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where and in what precision to generate: `auto` is CUDA in fp16 when there is a GPU,
    else the CPU in fp32. fp16 is refused on the CPU (slow, and not every kernel has it)."""
    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device not in ("cpu", "cuda"):
        raise SdloraError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cuda" and not cuda:
        raise SdloraError("device cuda was asked for but no CUDA device is available; use cpu")
    if dtype == "auto":
        dtype = "fp16" if device == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise SdloraError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if dtype == "fp16" and device == "cpu":
        raise SdloraError("fp16 generation needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.device(device), DTYPES[dtype]


def vae_dtype(base: Base, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows to NaN in half precision (its config's `force_upcast`): under fp16
    and bf16 it stays in float32, as diffusers' SDXL pipelines upcast it; the half-precision
    latents are cast up on the way in."""
    if dtype == torch.float32 or base.family != "sdxl" or not base.vae.config.get("force_upcast"):
        return dtype
    first = getattr(base.vae, "post_quant_conv", None) or base.vae.decoder
    first.register_forward_pre_hook(_to_float32)
    return torch.float32


def _to_float32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def adapter_name(i: int) -> str:
    return f"lora{i}"


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
    sampler: str = "ddim",
    trigger: str = "warn",
    lora_dir: str | Path | None = None,
    fuse: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
    rescale: float | None = None,
) -> list[Image.Image]:
    """Images for `prompt` from `base` with `loras` applied (PIL images, infotext attached).

    `<lora:NAME:SCALE>` tags in the prompt are resolved in `lora_dir`; `trigger="auto"` puts
    missing trigger words first. LoRAs are fused into the weights (fixed scales, faster).
    `device`/`dtype`: see `placement` (by default a GPU in fp16 when there is one).
    `prediction_type`, `zero_terminal_snr`, `rescale`: see `Generator.load` and `render`.
    """
    check_sampler(sampler)
    check_settings(steps, cfg, seed, num, size, MAX_PIXELS)
    prompt, tagged = prompt_loras(prompt, Path(lora_dir) if lora_dir else None)
    generator = Generator.load(
        base, [*loras, *tagged], fuse=fuse, device=device, dtype=dtype,
        prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr,
    )  # fmt: skip
    prompt = with_triggers(prompt, generator.loras, trigger)
    return generator.render(prompt, negative, steps, cfg, seed, size, num, sampler, rescale)


def parse_grid(text: str) -> tuple[str, list[str]]:
    """`scales=0,0.5,1` or `trigger=on,off` as (axis, values), checked before a model loads."""
    axis, _, values = text.partition("=")
    cells = [v.strip() for v in values.split(",")]
    if axis == "scales":
        for value in cells:
            _scale(value, f"scales={value}")
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
            scale = _scale(value, f"scales={value}")
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
    from sdlora.lorafile import sha256_after_header

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
