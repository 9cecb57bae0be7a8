"""A LoRA from the difference of two checkpoints of one family (`sdlora extract`).

Per module, the difference of the weights (tuned - base) is cut to a low rank by SVD
(`sdlora.resize.factorize`). The modules are sd-scripts' LoRA targets: in the UNet every
Linear and 1x1 convolution of the transformer blocks, in the text encoders every Linear of
the encoder layers; with a conv rank, also the convolutions LoCon adapts
(`sdlora.algos.UNET_CONVS`). A module whose difference is ~0 is left out, so a text encoder
that was not trained adds nothing.
"""

from __future__ import annotations

import torch

from sdlora.algos import UNET_CONVS
from sdlora.errors import SdloraError
from sdlora.families import FAMILIES, same_architecture
from sdlora.lora import Lora, LoraModule
from sdlora.resize import Kept, Report, factorize

# A difference below this fraction of the weight's own norm counts as none (fp16 round-off
# of a re-saved checkpoint stays under it; a fine-tune's change is far above).
MIN_DIFFERENCE = 1e-4


def extract_modules(model: torch.nn.Module, component: str, conv: bool) -> dict[str, torch.Tensor]:
    """Weights of the modules extract targets in `model`, by canonical module path."""
    out = {}
    for name, module in model.named_modules():
        path = name.removeprefix("text_model.")
        if component == "unet":
            is_conv = isinstance(module, torch.nn.Conv2d)
            linear = ".attentions." in f".{path}" and (
                isinstance(module, torch.nn.Linear) or (is_conv and module.kernel_size == (1, 1))
            )
            wanted = linear or (conv and is_conv and path.rsplit(".", 1)[-1] in UNET_CONVS)
        else:
            wanted = isinstance(module, torch.nn.Linear) and path.startswith("encoder.layers.")
        if wanted:
            out[path] = module.weight
    return out


def extract_lora(
    base,
    tuned,
    rank: int,
    conv_rank: int | None = None,
    min_difference: float = MIN_DIFFERENCE,
) -> tuple[Lora, Report]:
    """The LoRA (rank `rank`, alpha = rank; convolutions at `conv_rank` when given) that
    moves `base` towards `tuned` (both `sdlora.models.Base`), with what each module kept."""
    if not same_architecture(base.family, tuned.family):
        raise SdloraError(
            f"the base {base.name} is {FAMILIES[base.family].title} and the tuned model "
            f"{tuned.name} is {FAMILIES[tuned.family].title}; extract needs two checkpoints "
            "of one family (the tuned one trained from the base)"
        )
    for flag, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise SdloraError(f"{flag} must be at least 1, got {value}")
    lora = Lora(family=tuned.family)
    report = Report()
    components = {"unet": (base.unet, tuned.unet)}
    for name, encoder in base.text_encoders.items():
        components[name] = (encoder, tuned.text_encoders.get(name))
    for component, (model_a, model_b) in components.items():
        conv = conv_rank is not None and component == "unet"
        weights_a = extract_modules(model_a, component, conv)
        weights_b = extract_modules(model_b, component, conv) if model_b is not None else {}
        for path, weight_a in weights_a.items():
            weight_b = weights_b.get(path)
            if weight_b is None or weight_b.shape != weight_a.shape:
                found = "none" if weight_b is None else list(weight_b.shape)
                raise SdloraError(
                    f"{base.name} and {tuned.name} differ in shape at {component}:{path} "
                    f"(base {list(weight_a.shape)}, tuned {found}); they are not one model "
                    "and its fine-tune"
                )
            delta = weight_b.detach().float() - weight_a.detach().float()
            norm = float(delta.norm())
            if norm <= min_difference * float(weight_a.detach().float().norm()):
                report.skipped.append(f"{component}:{path}")
                continue
            target = conv_rank if delta.dim() == 4 and delta.shape[2:] != (1, 1) else rank
            down, up, fraction = factorize(delta, target)
            r = down.shape[0]
            lora.components.setdefault(component, {})[path] = LoraModule(down, up, float(r))
            full = min(delta.flatten(1).shape)
            report.modules.append(Kept(component, path, r, full, fraction, norm))
    if not report.modules:
        raise SdloraError(
            f"{base.name} and {tuned.name} have the same weights in every module extract "
            "reads; there is no difference to extract"
        )
    return lora, report
