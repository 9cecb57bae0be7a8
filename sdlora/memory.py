"""How much GPU memory a training run is expected to take, before it starts: the frozen base in
the precision it is stored in, the LoRA and its gradients, the optimizer's state, and a rough
figure for the activations. An estimate for choosing settings, not a measurement.

Parameter counts are exact: the base's components are built on PyTorch's meta device (shapes,
no storage) from their configs and the LoRA is injected into them as training injects it. The
activations are the rough part: a per-family figure for one 512×512 image in half precision
without gradient checkpointing, scaled by pixels and batch size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GIB = 1024**3
# Activation memory of one 512x512 sample (64x64 latents), half precision, SDPA attention, no
# gradient checkpointing. Rough, not measured on a GPU here: in line with what sd-scripts users
# report (SD 1.5 at 512 about 6 GiB in all; SDXL at 1024 about 20 GiB without checkpointing)
# and with this project's CPU figure (SD 1.5 at 256 px in fp32: about 1.2 GB above the weights).
ACTIVATIONS_512 = {"sd1": 3 * GIB, "sd2": 3 * GIB, "sd2-v": 3 * GIB, "sdxl": 3 * GIB}
CHECKPOINTED = 0.25  # share of activations kept with gradient checkpointing
CUDA_RUNTIME = 0.5 * GIB  # the CUDA context and kernels' workspace, held whatever is trained
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}  # per trained parameter
PRECISION_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of a base and of the LoRA trained on it."""

    frozen: dict[str, int]
    """Per component (`unet`, `vae`, `text_encoder`, ...)."""
    trained: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    """The frozen base, in bytes."""
    adapter: int
    """The LoRA in float32 and its gradients."""
    optimizer: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.activations + self.runtime

    def text(self) -> str:
        def size(n: int) -> str:
            return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"

        return (
            f"≈ {self.total / GIB:.1f} GiB of GPU memory (estimate): base weights "
            f"{size(self.weights)}, LoRA + gradients {size(self.adapter)}, optimizer "
            f"{size(self.optimizer)}, activations {size(self.activations)} (rough), CUDA "
            f"runtime {size(self.runtime)}"
        )


def training_memory(
    params: Parameters,
    family: str,
    mixed_precision: str,
    optimizer: str,
    resolution: int,
    batch_size: int,
    gradient_checkpointing: bool,
) -> MemoryEstimate:
    """The expected peak GPU memory of a training step.

    The frozen base is stored in the mixed-precision dtype, except SDXL's VAE, which stays in
    float32 (see `runtime.cast_frozen`); the LoRA trains in float32 with a float32 gradient.
    """
    half = PRECISION_BYTES[mixed_precision]
    weights = sum(
        count * (4 if name == "vae" and family == "sdxl" else half)
        for name, count in params.frozen.items()
    )
    activations = ACTIVATIONS_512[family] * batch_size * (resolution / 512) ** 2
    activations *= (half / 2) * (CHECKPOINTED if gradient_checkpointing else 1.0)
    return MemoryEstimate(
        weights=weights,
        adapter=params.trained * 8,
        optimizer=params.trained * OPTIMIZER_BYTES[optimizer],
        activations=int(activations),
        runtime=int(CUDA_RUNTIME),
    )


@functools.lru_cache(maxsize=16)
def meta_parameters(
    family: str,
    rank: int,
    unet_targets: str,
    text_encoder: bool,
    conv_rank: int | None = None,
    dora: bool = False,
) -> Parameters:
    """Parameter counts of `family`'s real architecture (the shipped config folders) with a
    LoRA of `rank` on `unet_targets` (and the text encoders' attention when `text_encoder`),
    counted on the meta device: nothing is allocated, nothing is downloaded."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.lora import TEXT_ENCODER_ATTENTION, UNET_TARGET_PRESETS, inject_lora
    from sdlora.models import config_folder

    folder = config_folder(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = {"text_encoder": CLIPTextModel}
        if family == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection
        modules = {"unet": unet, "vae": vae}
        for name, cls in encoders.items():
            modules[name] = cls(CLIPTextConfig.from_pretrained(folder / name))
    frozen = {name: _count(module) for name, module in modules.items()}
    trained = inject_lora(unet, rank, rank, UNET_TARGET_PRESETS[unet_targets], conv_rank,
                          conv_rank, dora)  # fmt: skip
    if text_encoder:
        for name in encoders:
            trained += inject_lora(modules[name], rank, rank, TEXT_ENCODER_ATTENTION, dora=dora)
    return Parameters(frozen=frozen, trained=trained)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
