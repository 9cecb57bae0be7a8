"""LoRA adapters: which modules to target, injecting them with peft, and reading them back.

`rank` and `alpha` are this project's words (sd-scripts' `network_dim` / `network_alpha`); they
map to peft's `r` / `lora_alpha` (LoHa/LoKr: `alpha`) here and nowhere else. The update of a
LoRA module is ΔW = (alpha / rank) · up @ down; LoHa's and LoKr's are in `sdlora.algos`.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import peft
import torch
from peft import LoraConfig
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from sdlora.algos import ALGOS, DORA_PEFT_TENSORS, UNET_CONVS

# peft's layer class of each module algo (see `sdlora.algos`).
LAYER_ALGOS = ((LoraLayer, "lora"), (LoHaLayer, "loha"), (LoKrLayer, "lokr"))

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
    """One adapted module: for LoRA ΔW = (alpha / rank) · up @ down; for LoHa and LoKr (`algo`)
    the tensors in `extra` and the ΔW of `sdlora.algos`."""

    down: torch.Tensor | None
    """[rank, in] (conv: [rank, in, k, k]); None for LoHa and LoKr."""
    up: torch.Tensor | None
    """[out, rank] (conv: [out, rank, 1, 1]); None for LoHa and LoKr."""
    alpha: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further tensors by role: `dora_scale` [out, 1] (conv: [out, 1, 1, 1]) for DoRA; LoHa's
    and LoKr's tensors by their LyCORIS names."""
    algo: str = "lora"
    """`lora` (LoCon's modules too), `loha` or `lokr`."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the module by role (alpha aside)."""
        own = {"down": self.down, "up": self.up} if self.algo == "lora" else {}
        return {**own, **self.extra}

    @property
    def rank(self) -> int | None:
        """The rank alpha divides by; None for a LoKr module of two whole factors."""
        return ALGOS[self.algo].rank(self.tensors())

    @property
    def scale(self) -> float:
        """The factor loaders multiply the update by: alpha / rank (1 without a rank)."""
        rank = self.rank
        return 1.0 if rank is None else self.alpha / rank

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.extra

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of `delta()`, worked out without computing it (a conv's may be flat)."""
        meta = {role: t.to("meta") for role, t in self.tensors().items()}
        return tuple(ALGOS[self.algo].delta(meta, self.alpha).shape)

    def delta(self) -> torch.Tensor:
        """The update in float32: shaped like the module's weight, or flat [out, in·k·k] for
        a conv of LoHa/LoKr without Tucker factors (DoRA rescales the base weight plus this:
        `sdlora.algos.adapted_weight`)."""
        return ALGOS[self.algo].delta(self.tensors(), self.alpha)


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
    algo: str = "lora",
    lokr_factor: int = -1,
    decompose_both: bool = False,
) -> int:
    """Add trainable adapter layers of `algo` (see `sdlora.algos`) to `model`'s `targets` in
    place; freeze everything else.

    With `conv_rank` the UNet's convolutions (`sdlora.algos.UNET_CONVS`) are adapted too, at
    that rank and `conv_alpha`; with `dora`, each layer also learns DoRA's magnitude. LoKr
    splits each dimension by `lokr_factor` (-1: as evenly as possible) and with
    `decompose_both` also makes its smaller factor low-rank (LyCORIS's `factor` and
    `decompose_both`). One factor of each update starts at zero (LoRA's up, LoHa's w2_a,
    LoKr's w1), so the model's output is unchanged until the first step. Returns the number of
    trainable parameters.
    """
    options = {}
    if conv_rank is not None:
        targets = (*targets, *UNET_CONVS)
        options["rank_pattern"] = {_exact(c): conv_rank for c in UNET_CONVS}
        options["alpha_pattern"] = {_exact(c): conv_alpha for c in UNET_CONVS}
    if dora:
        options["use_dora"] = True
    if algo == "lokr":
        options.update(decompose_factor=lokr_factor, decompose_both=decompose_both)
    config = _peft_config(algo, rank, alpha, list(targets), **options)
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=ADAPTER)
    for layer in lora_layers(model).values():
        for param in _adapter_parameters(layer, ADAPTER):
            param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_config(algo: str, rank: int, alpha: float, targets: list[str], **options):
    """The peft config of `algo` (peft names alpha `lora_alpha` for LoRA, `alpha` otherwise)."""
    if ALGOS[algo].module == "lora":
        return LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True, **options
        )
    return getattr(peft, ALGOS[algo].peft_config_name)(
        r=rank, alpha=alpha, target_modules=targets, init_weights=True, **options
    )


def layer_algo(layer: BaseTunerLayer) -> str:
    """The module algo (`lora`, `loha`, `lokr`) of a peft layer."""
    return next(algo for cls, algo in LAYER_ALGOS if isinstance(layer, cls))


def _peft_holders(layer: BaseTunerLayer) -> dict[str, str]:
    """role -> the peft attribute holding it, for `layer`'s algo."""
    algo = layer_algo(layer)
    holders = dict(ALGOS[algo].peft_tensors)
    return {**holders, **DORA_PEFT_TENSORS} if algo == "lora" else holders


def _adapter_parameters(layer: BaseTunerLayer, adapter: str) -> list[torch.nn.Parameter]:
    """The parameters of `adapter` in `layer`: each algo tensor's peft module (see algos)."""
    holders = [getattr(layer, a) for a in _peft_holders(layer).values()]
    found = [holder[adapter] for holder in holders if adapter in holder]
    return [
        p for f in found for p in ([f] if isinstance(f, torch.nn.Parameter) else f.parameters())
    ]


def lora_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """peft adapter layers (LoRA, LoHa, LoKr) of `model` that hold at least one adapter, by
    module path."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, tuple(cls for cls, _ in LAYER_ALGOS))
        and any(len(getattr(m, a)) for a in _peft_holders(m).values())
    }


def extract_lora(model: torch.nn.Module) -> dict[str, LoraModule]:
    """The current LoRA weights of `model` (detached float32 copies) by module path.

    Paths are canonical: a text encoder's are given without the `text_model.` level that
    transformers keeps in `CLIPTextModelWithProjection` but not in `CLIPTextModel`.
    """
    out = {}
    for name, layer in lora_layers(model).items():
        if layer_algo(layer) != "lora":
            if ADAPTER in layer._available_adapters:
                out[name.removeprefix("text_model.")] = _extract_lycoris(layer)
            continue
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


def _extract_lycoris(layer: BaseTunerLayer) -> LoraModule:
    """A LoHa or LoKr layer's module; a LoKr of two whole factors gets its scale baked into
    `lokr_w1`, since loaders apply none to it (see `sdlora.algos`)."""
    algo = layer_algo(layer)
    tensors = {
        role: getattr(layer, attr)[ADAPTER].detach().float().cpu().clone()
        for role, attr in ALGOS[algo].peft_tensors.items()
        if ADAPTER in getattr(layer, attr)
    }
    alpha, rank = float(layer.alpha[ADAPTER]), layer.r[ADAPTER]
    module = LoraModule(None, None, alpha, tensors, algo)
    if module.rank is None:
        tensors["lokr_w1"] *= alpha / rank
        module.alpha = float(rank)  # what LyCORIS writes for such a module
    return module


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of `model`."""
    return [p for p in model.parameters() if p.requires_grad]


def add_lora(model: torch.nn.Module, modules: dict[str, LoraModule], adapter: str) -> None:
    """Attach a LoRA read from a file to `model` as the named peft adapter (frozen).

    Each module keeps its own rank and alpha (peft's `rank_pattern` / `alpha_pattern`).
    """
    names = {name for name, _ in model.named_modules()}
    resolved = {resolve_path(names, path): module for path, module in modules.items()}
    algos = {m.algo for m in resolved.values()}
    if len(algos) > 1:
        raise ValueError("a LoRA of several algos")  # refused when read
    if algos != {"lora"}:
        _add_lycoris(model, resolved, algos.pop(), adapter)
        return
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


def _add_lycoris(model: torch.nn.Module, resolved: dict, algo: str, adapter: str) -> None:
    """Attach LoHa or LoKr modules (by resolved path) as a frozen peft adapter.

    peft builds each layer's tensors from one rank and factor; a file's may differ per module
    (LoKr's factor, whole or split factors, Tucker cores), so the file's own tensors replace
    them, and the layer's scale becomes the module's (peft's `set_scale` multiplies
    `alpha / r` by the LoRA's weight: alpha = the scale, r = 1).
    """
    config = _peft_config(algo, 1, 1.0, sorted(resolved))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        model.add_adapter(config, adapter_name=adapter)
    layers = lora_layers(model)
    for path, module in resolved.items():
        layer = layers[path]
        for attr in ALGOS[algo].peft_tensors.values():
            if adapter in getattr(layer, attr):
                del getattr(layer, attr)[adapter]
        device = layer.get_base_layer().weight.device
        for role, tensor in module.tensors().items():
            holder = getattr(layer, ALGOS[algo].peft_tensors[role])
            holder[adapter] = torch.nn.Parameter(tensor.to(device).clone(), requires_grad=False)
        layer.r[adapter], layer.alpha[adapter] = 1, module.scale
        layer.scaling[adapter] = module.scale


def copy_lycoris(layer: BaseTunerLayer, module: LoraModule, source: str) -> None:
    """Load a LoHa/LoKr module read from a file into a freshly injected trainable layer,
    its update unchanged (the file's scale may differ from the layer's)."""
    from sdlora.errors import SdloraError

    algo = layer_algo(layer)
    if module.algo != algo:
        title = ALGOS[module.algo].title
        raise SdloraError(f"{source} is a {title} file; set lora.algo to match")
    holders = ALGOS[algo].peft_tensors
    targets = {
        r: getattr(layer, a)[ADAPTER] for r, a in holders.items() if ADAPTER in getattr(layer, a)
    }
    ours = {role: tuple(t.shape) for role, t in targets.items()}
    theirs = {role: tuple(t.shape) for role, t in module.tensors().items()}
    if ours != theirs:
        raise SdloraError(
            f"{source} has other {ALGOS[algo].title} tensors than this run trains ({theirs} "
            f"against {ours}); set lora.rank, lora.conv_rank and the LoKr keys to match it"
        )
    ratio = module.scale / layer.scaling[ADAPTER]
    with torch.no_grad():
        for i, (role, param) in enumerate(targets.items()):
            # One factor carries the ratio of scales: each update is linear in it.
            param.copy_(module.tensors()[role] * (ratio if i == 0 else 1.0))


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


@contextmanager
def adapters_off(layers: list[BaseTunerLayer]):
    """The model of `layers` (its `lora_layers`) as its base inside the block: every adapter
    layer off, then on again (peft turns the adapters' requires_grad off and back on with
    them). Taking the layers, not the model, saves a walk over every module each time."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
