"""Generating images from a base model with LoRAs applied: samplers, placement, `generate`.

Every LoRA passes the version guard before any weights of the base are loaded (family) and
before any image is computed (module shapes). Images carry A1111's `parameters` infotext
(`sdlora.prompts` writes it, with the prompt tags and trigger words); A/B grids are in
`sdlora.grids`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
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
from sdlora.lora import Lora, add_lora
from sdlora.lorafile import read_lora
from sdlora.models import Base, base_family, load_base, set_schedule
from sdlora.prompts import (
    MAX_PIXELS,
    LoraSpec,
    base_hash,
    check_settings,
    infotext,
    is_file,
    prompt_loras,
    with_triggers,
)
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
            if not is_file(spec.path):
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
