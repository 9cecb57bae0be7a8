"""Adapter algorithms: for each, its tensors in a kohya/LyCORIS file, its peft parameters and
its weight update, in one table that the writer, the readers, the guard and `generate` share.

A module record (`sdlora.lora.LoraModule`) holds `down`, `up` and `alpha` (every algo here is a
low-rank product) plus `extra`, the algo's further tensors by role (DoRA's magnitude). LoCon is
LoRA that also adapts the UNet's ResNet and resampler convolutions: the same tensors, a conv
`down` [rank, in, k, k] and a 1x1 `up` [out, rank, 1, 1], as sd-scripts and LyCORIS write it.

DoRA (`use_dora` in peft) keeps a magnitude per output channel: the adapted weight is
m · (W + ΔW) / ‖W + ΔW‖, the norm taken over each output channel's inputs. The file holds m as
`.dora_scale` shaped [out, 1] (conv: [out, 1, 1, 1]): the output axis peft trains on, which
ComfyUI and Forge recognise by its first dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def low_rank_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """ΔW = (alpha / rank) · up @ down in float32, shaped like the module's weight."""
    rank = down.shape[0]
    delta = (alpha / rank) * (up.float().flatten(1) @ down.float().flatten(1))
    return delta.reshape(up.shape[0], *down.shape[1:])


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DoRA's adapted weight m · (W + ΔW) / ‖W + ΔW‖ (norm per output channel), float32."""
    merged = weight.float() + delta
    norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    return scale.float().reshape(norm.shape) * merged / norm


@dataclass(frozen=True)
class Algo:
    name: str
    title: str
    network_module: str
    """`ss_network_module` of a file of this algo (what sd-scripts + LyCORIS write)."""
    convs: bool
    """Adapts the UNet's convolutions too (rank `conv_rank`, alpha `conv_alpha`)."""
    file_tensors: dict[str, str]
    """kohya/LyCORIS key suffix -> role in the module record, in the order written."""
    peft_tensors: dict[str, str]
    """role -> the peft layer attribute holding it (by adapter name)."""
    delta: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """(down, up, alpha) -> ΔW."""


FILE_TENSORS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
PEFT_TENSORS = {"down": "lora_A", "up": "lora_B"}
ALGOS = {
    "lora": Algo(
        "lora", "LoRA", "networks.lora", False, FILE_TENSORS, PEFT_TENSORS, low_rank_delta
    ),
    "locon": Algo(
        "locon", "LoCon", "lycoris.kohya", True, FILE_TENSORS, PEFT_TENSORS, low_rank_delta
    ),
}
# DoRA goes with either: one more tensor per module, and its own weight (`dora_weight`).
DORA_FILE_TENSORS = {".dora_scale": "dora_scale"}
DORA_PEFT_TENSORS = {"dora_scale": "lora_magnitude_vector"}
# The UNet convolutions LoCon adapts, as peft suffixes: the ResNet blocks' 3x3 convs and 1x1
# shortcut, and the down/upsamplers' conv (sd-scripts' and LyCORIS's ResnetBlock2D,
# Downsample2D and Upsample2D targets).
UNET_CONVS = ("conv1", "conv2", "conv_shortcut", "conv")


def adapted_weight(module, weight: torch.Tensor) -> torch.Tensor:
    """The weight a loader computes from base `weight` and a module record, float32."""
    delta = module.delta()
    if "dora_scale" in module.extra:
        return dora_weight(weight, delta, module.extra["dora_scale"])
    return weight.float() + delta


def network_module(algo: str, dora: bool) -> str:
    """`ss_network_module`: sd-scripts' own for plain LoRA, LyCORIS's otherwise."""
    return "lycoris.kohya" if dora else ALGOS[algo].network_module


def network_args(algo: str, conv_rank: int | None, conv_alpha: float | None, dora: bool) -> dict:
    """`ss_network_args` of a file, as sd-scripts records LyCORIS's `--network_args` (strings);
    empty for plain LoRA."""
    args = {}
    if algo != "lora" or dora:
        args["algo"] = algo
    if ALGOS[algo].convs:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = str(conv_alpha)
    if dora:
        args["dora_wd"] = "True"
    return args
