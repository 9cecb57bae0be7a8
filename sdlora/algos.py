"""Adapter algorithms: for each, its tensors in a kohya/LyCORIS file, its peft parameters and
its weight update, in one table that the writer, the readers, the guard and `generate` share.

A module record (`sdlora.lora.LoraModule`) names its algo (`lora`, `loha` or `lokr`) and holds
its tensors by role: `down` and `up` for LoRA, the LyCORIS names (`hada_w1_a`, `lokr_w1`, ...)
for the others, in `extra` with DoRA's magnitude. LoCon is LoRA that also adapts the UNet's
ResNet and resampler convolutions: the same tensors, a conv `down` [rank, in, k, k] and a 1x1
`up` [out, rank, 1, 1], as sd-scripts and LyCORIS write it. LoHa and LoKr adapt the same
modules as LoCon (linear layers at `rank`/`alpha`, convolutions at `conv_rank`/`conv_alpha`):

- LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank, the rank that of `hada_w1_b`. A conv
  module's `w1_b` is [rank, in·k·k]; with Tucker factors `hada_t1`/`hada_t2` [rank, rank, k, k]
  the `w*_a` are [rank, out] and the `w*_b` [rank, in] (LyCORIS's and peft's layout).
- LoKr: ΔW = w1 ⊗ w2, each factor whole or a product `_a @ _b` (w2 also Tucker with `lokr_t2`).
  Its scale is alpha / rank when a factor is a product (the rank of `lokr_w1_b`, else of
  `lokr_w2_b`, as ComfyUI and LyCORIS read it), and 1 when both are whole: loaders ignore alpha
  then, so a trained scale is baked into `lokr_w1`.

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


def _tucker(core: torch.Tensor, out_mode: torch.Tensor, in_mode: torch.Tensor) -> torch.Tensor:
    """A conv weight [out, in, k, k] from a Tucker core [r, r, k, k] and modes [r, out], [r, in]."""
    modes = (core.float(), out_mode.float(), in_mode.float())
    return torch.einsum("i j k l, i p, j r -> p r k l", *modes)


def loha_delta(t: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """LoHa's ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank (conv: flat [out, in·k·k]
    unless Tucker factors give [out, in, k, k])."""
    if "hada_t1" in t:
        w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1 = t["hada_w1_a"].float() @ t["hada_w1_b"].float()
        w2 = t["hada_w2_a"].float() @ t["hada_w2_b"].float()
    return w1 * w2 * (alpha / loha_rank(t))


def loha_rank(t: dict[str, torch.Tensor]) -> int:
    return t["hada_w1_b"].shape[0]


def lokr_delta(t: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """LoKr's ΔW = w1 ⊗ w2 · scale (see the module docstring for the scale)."""
    w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    rank = lokr_rank(t)
    return torch.kron(w1.contiguous(), w2.contiguous()) * (1.0 if rank is None else alpha / rank)


def lokr_rank(t: dict[str, torch.Tensor]) -> int | None:
    """The rank of LoKr's decomposed factor (w2's when both are), None when both are whole."""
    if "lokr_w2_b" in t:
        return t["lokr_w2_b"].shape[0]
    return t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None


def lora_delta(t: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    return low_rank_delta(t["down"], t["up"], alpha)


@dataclass(frozen=True)
class Algo:
    name: str
    title: str
    convs: bool
    """Adapts the UNet's convolutions too (rank `conv_rank`, alpha `conv_alpha`)."""
    network_module: str
    """`ss_network_module` of a file of this algo (what sd-scripts + LyCORIS write)."""
    file_tensors: dict[str, str]
    """kohya/LyCORIS key suffix -> role in the module record, in the order written."""
    peft_tensors: dict[str, str]
    """role -> the peft layer attribute holding it (by adapter name)."""
    delta: Callable[[dict[str, torch.Tensor], float], torch.Tensor]
    """(tensors by role, alpha) -> ΔW in float32 (a conv's may be flat: reshape to the weight)."""
    rank: Callable[[dict[str, torch.Tensor]], int | None]
    """The rank alpha is divided by (None: the update is not scaled)."""
    module: str
    """The algo of its modules: `lora` for LoCon, whose modules are LoRA's."""
    peft_config_name: str
    """The name of the peft config class that trains it (peft is imported when it is needed,
    not with the config: `sdlora --help` and the studio start seconds sooner)."""
    required: tuple[str, ...]
    """Roles every module of the algo has (further ones are alternatives or optional)."""


FILE_TENSORS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
PEFT_TENSORS = {"down": "lora_A", "up": "lora_B"}
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _lycoris_table(roles: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """File suffixes and peft attributes of a LyCORIS algo: both spell each tensor's role."""
    return {**{"." + r: r for r in roles}, ".alpha": "alpha"}, {r: r for r in roles}


def _lora_rank(t: dict[str, torch.Tensor]) -> int:
    return t["down"].shape[0]


LORA = ("networks.lora", FILE_TENSORS, PEFT_TENSORS, lora_delta, _lora_rank, "lora", "LoraConfig")
ALGOS = {
    "lora": Algo("lora", "LoRA", False, *LORA, ("down", "up")),
    "locon": Algo("locon", "LoCon", True, "lycoris.kohya", *LORA[1:], ("down", "up")),
    "loha": Algo(
        "loha", "LoHa", True, "lycoris.kohya", *_lycoris_table(LOHA_ROLES), loha_delta,
        loha_rank, "loha", "LoHaConfig", LOHA_ROLES[:4],
    ),
    "lokr": Algo(
        "lokr", "LoKr", True, "lycoris.kohya", *_lycoris_table(LOKR_ROLES), lokr_delta,
        lokr_rank, "lokr", "LoKrConfig", (),
    ),
}  # fmt: skip
# DoRA goes with either: one more tensor per module, and its own weight (`dora_weight`).
DORA_FILE_TENSORS = {".dora_scale": "dora_scale"}
DORA_PEFT_TENSORS = {"dora_scale": "lora_magnitude_vector"}
# The UNet convolutions LoCon adapts, as peft suffixes: the ResNet blocks' 3x3 convs and 1x1
# shortcut, and the down/upsamplers' conv (sd-scripts' and LyCORIS's ResnetBlock2D,
# Downsample2D and Upsample2D targets).
UNET_CONVS = ("conv1", "conv2", "conv_shortcut", "conv")


def adapted_weight(module, weight: torch.Tensor) -> torch.Tensor:
    """The weight a loader computes from base `weight` and a module record, float32."""
    delta = module.delta().reshape(weight.shape)
    if "dora_scale" in module.extra:
        return dora_weight(weight, delta, module.extra["dora_scale"])
    return weight.float() + delta


def network_module(algo: str, dora: bool) -> str:
    """`ss_network_module`: sd-scripts' own for plain LoRA, LyCORIS's otherwise."""
    return "lycoris.kohya" if dora else ALGOS[algo].network_module


def network_args(
    algo: str,
    conv_rank: int | None,
    conv_alpha: float | None,
    dora: bool,
    lokr_factor: int = -1,
    decompose_both: bool = False,
) -> dict:
    """`ss_network_args` of a file, as sd-scripts records LyCORIS's `--network_args` (strings);
    empty for plain LoRA."""
    args = {}
    if algo != "lora" or dora:
        args["algo"] = algo
    if ALGOS[algo].convs:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = str(conv_alpha)
    if algo == "lokr":
        args["factor"] = str(lokr_factor)
        args["decompose_both"] = str(decompose_both)
    if dora:
        args["dora_wd"] = "True"
    return args
