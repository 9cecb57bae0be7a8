"""LoRA adapters: which modules to target, injecting them with peft, and reading them back.

`rank` and `alpha` are this project's words (sd-scripts' `network_dim` / `network_alpha`); they
map to peft's `r` / `lora_alpha` here and nowhere else. The update of a module is
ΔW = (alpha / rank) · up @ down.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from sdlora.algos import DORA_PEFT_TENSORS, PEFT_TENSORS, UNET_CONVS, low_rank_delta

ADAPTER = "default"

# Module-name suffixes, matched by peft against the end of each module's path.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
# sd-scripts' default UNet targets: every Linear/1x1 conv inside the transformer blocks.
UNET_ALL_LINEAR = UNET_ATTENTION + UNET_FEED_FORWARD + ("proj_in", "proj_out")
TEXT_ENCODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")

UNET_TARGET_PRESETS = {
    "attention": UNET_ATTENTION,
    "attention+ff": UNET_ATTENTION + UNET_FEED_FORWARD,
    "all-linear": UNET_ALL_LINEAR,
}


@dataclass
class LoraModule:
    """One adapted module: ΔW = (alpha / rank) · up @ down, and any further tensors of its
    algo (see `sdlora.algos`)."""

    down: torch.Tensor
    """[rank, in] (conv: [rank, in, k, k])."""
    up: torch.Tensor
    """[out, rank] (conv: [out, rank, 1, 1])."""
    alpha: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further tensors by role: `dora_scale` [out, 1] (conv: [out, 1, 1, 1]) for DoRA."""

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.extra

    def delta(self) -> torch.Tensor:
        """The low-rank update, in float32, shaped like the module's weight (DoRA rescales
        the base weight plus this: `sdlora.algos.adapted_weight`)."""
        return low_rank_delta(self.down, self.up, self.alpha)


@dataclass
class Lora:
    """The canonical in-memory LoRA: modules by component and diffusers module path."""

    components: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    """{"unet" | "text_encoder" | "text_encoder_2": {module_path: LoraModule}}."""
    family: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    file_format: str | None = None
    """`kohya` or `diffusers` for a LoRA read from a file."""

    def modules(self):
        """(component, path, module) for every adapted module, in a stable order."""
        for component in sorted(self.components):
            for path in sorted(self.components[component]):
                yield component, path, self.components[component][path]

    def count(self, component: str) -> int:
        return len(self.components.get(component, {}))


def inject_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dora: bool = False,
) -> int:
    """Add trainable LoRA layers to `model`'s `targets` in place; freeze everything else.

    With `conv_rank` (LoCon) the UNet's convolutions (`sdlora.algos.UNET_CONVS`) are adapted
    too, at that rank and `conv_alpha`; with `dora`, each layer also learns DoRA's magnitude.
    The down matrices start random and the up matrices at zero, so the model's output is
    unchanged until the first step. Returns the number of trainable parameters.
    """
    options = {}
    if conv_rank is not None:
        targets = (*targets, *UNET_CONVS)
        options["rank_pattern"] = {_exact(c): conv_rank for c in UNET_CONVS}
        options["alpha_pattern"] = {_exact(c): conv_alpha for c in UNET_CONVS}
    if dora:
        options["use_dora"] = True
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True, **options
    )
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=ADAPTER)
    for layer in lora_layers(model).values():
        for param in _adapter_parameters(layer, ADAPTER):
            param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_parameters(layer: LoraLayer, adapter: str) -> list[torch.nn.Parameter]:
    """The parameters of `adapter` in `layer`: each algo tensor's peft module (see algos)."""
    attributes = [*PEFT_TENSORS.values(), *DORA_PEFT_TENSORS.values()]
    holders = [getattr(layer, a) for a in attributes]
    return [p for holder in holders if adapter in holder for p in holder[adapter].parameters()]


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """peft LoRA layers of `model` that hold at least one adapter, by module path."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and len(m.lora_A)
    }


def extract_lora(model: torch.nn.Module) -> dict[str, LoraModule]:
    """The current LoRA weights of `model` (detached float32 copies) by module path.

    Paths are canonical: a text encoder's are given without the `text_model.` level that
    transformers keeps in `CLIPTextModelWithProjection` but not in `CLIPTextModel`.
    """
    out = {}
    for name, layer in lora_layers(model).items():
        if ADAPTER not in layer.lora_A:
            continue
        up = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
        extra = {}
        if ADAPTER in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[ADAPTER].weight.detach().float().cpu()
            extra["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (up.dim() - 1)).clone()
        out[name.removeprefix("text_model.")] = LoraModule(
            down=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
            up=up,
            alpha=float(layer.lora_alpha[ADAPTER]),
            extra=extra,
        )
    return out


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of `model`."""
    return [p for p in model.parameters() if p.requires_grad]


def add_lora(model: torch.nn.Module, modules: dict[str, LoraModule], adapter: str) -> None:
    """Attach a LoRA read from a file to `model` as the named peft adapter (frozen).

    Each module keeps its own rank and alpha (peft's `rank_pattern` / `alpha_pattern`).
    """
    names = {name for name, _ in model.named_modules()}
    resolved = {resolve_path(names, path): module for path, module in modules.items()}
    rank = most_common([m.rank for m in resolved.values()])
    alpha = most_common([m.alpha for m in resolved.values()])
    dora = {m.dora for m in resolved.values()}
    if len(dora) > 1:
        raise ValueError("a LoRA with DoRA on some modules only")  # refused when read
    options = {"use_dora": True} if dora == {True} else {}
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(resolved),
        rank_pattern={_exact(p): m.rank for p, m in resolved.items() if m.rank != rank},
        alpha_pattern={_exact(p): m.alpha for p, m in resolved.items() if m.alpha != alpha},
        **options,
    )
    with warnings.catch_warnings():
        # peft warns on every adapter after the first; several LoRAs at once are the point.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(config, adapter_name=adapter)
    layers = lora_layers(model)
    with torch.no_grad():
        for path, module in resolved.items():
            layer = layers[path]
            down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            down.copy_(module.down.reshape(down.shape))
            up.copy_(module.up.reshape(up.shape))
            if module.dora:
                # peft set the magnitude from the base weight; the file's replaces it.
                magnitude = layer.lora_magnitude_vector[adapter].weight
                magnitude.copy_(module.extra["dora_scale"].reshape(magnitude.shape))
            for param in _adapter_parameters(layer, adapter):
                param.requires_grad_(False)


def random_lora(base, rank: int, alpha: float, std: float, seed: int = 0) -> Lora:
    """A LoRA on `base`'s UNet and text-encoder attention with its up matrices drawn from
    N(0, std) (std 0: the zeros of a fresh LoRA), for tests and benchmarks. Adds the layers to
    `base` in place."""
    torch.manual_seed(seed)
    models = {"unet": base.unet, **base.text_encoders}
    for name, model in models.items():
        inject_lora(
            model, rank, alpha, UNET_ATTENTION if name == "unet" else TEXT_ENCODER_ATTENTION
        )
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B[ADAPTER].weight, std=std)
    return Lora({name: extract_lora(model) for name, model in models.items()}, family=base.family)


def most_common(values: list):
    """The most frequent value (ties: the largest), the default rank or alpha of a LoRA."""
    return max(set(values), key=lambda v: (values.count(v), v))


def resolve_path(names: set[str], path: str) -> str:
    """The module path among a model's `names` of a canonical path (see `extract_lora`)."""
    for candidate in (path, "text_model." + path):
        if candidate in names:
            return candidate
    raise KeyError(path)


def _exact(path: str) -> str:
    """A peft pattern for this module path (peft anchors it at a name boundary and the end)."""
    return re.escape(path)
