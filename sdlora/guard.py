"""The version guard: a LoRA meets a base only when both are of one family and shape.

Today A1111 drops mismatched keys silently, ComfyUI prints "lora key not loaded" and goes on,
and diffusers prints a wall of size mismatches. `check_compatible` refuses in plain words
instead; it warns, without refusing, where shapes cannot tell (SD 2.x 512-epsilon vs 768-v)
and where a file's family rests on metadata alone.
"""

from __future__ import annotations

import math
import warnings

import torch

from sdlora.errors import SdloraError
from sdlora.families import FAMILIES, detect_lora_family, same_architecture
from sdlora.lora import Lora, resolve_path
from sdlora.schedule import prediction_from_metadata

SHOW = 3


class IncompatibleLora(SdloraError):
    """A LoRA that would silently break on this base."""


def check_family(base_family: str, lora: Lora, lora_name: str = "this LoRA") -> list[str]:
    """Refuse a LoRA of another family; return warnings for near-misses and unsure files."""
    detection = detect_lora_family(lora)
    notes: list[str] = []
    if detection.family is None:
        notes.append(
            f"{lora_name}: its family cannot be told from its weights or metadata; "
            "checking module shapes only"
        )
        return notes
    if not same_architecture(detection.family, base_family):
        raise IncompatibleLora(
            f"{lora_name} was trained for {FAMILIES[detection.family].title}; "
            f"the base is {FAMILIES[base_family].title}. Use an {FAMILIES[detection.family].title} "
            "base, or a LoRA trained for this one"
        )
    if detection.family != base_family:
        notes.append(
            f"{lora_name} was trained for {FAMILIES[detection.family].title} and the base is "
            f"{FAMILIES[base_family].title}: the shapes match but the prediction types differ, "
            "so results may be washed out or noisy"
        )
    elif detection.ambiguous:
        notes.append(
            f"{lora_name}: family {detection.family} is read from "
            + ("metadata only" if "metadata only" in detection.evidence else "shapes alone")
        )
    return notes


def check_compatible(base, lora: Lora, lora_name: str = "this LoRA") -> list[str]:
    """Refuse `lora` on `base` (a `sdlora.models.Base`) unless family and every shape fit.

    Returns the warnings (also issued through `warnings.warn`); raises `IncompatibleLora`.
    """
    notes = check_family(base.family, lora, lora_name)
    components = {"unet": base.unet, **base.text_encoders}
    names = {c: {n for n, _ in m.named_modules()} for c, m in components.items()}
    missing, mismatched = [], []
    for component, path, module in lora.modules():
        model = components.get(component)
        weight = _weight(model, names[component], path) if model is not None else None
        if weight is None:
            missing.append(f"{component}:{path}")
            continue
        expected = module.shape
        actual = tuple(weight.shape)
        if weight.dim() == 4 and len(expected) == 2:  # a linear-shaped or flat conv update
            actual = (actual[0], math.prod(actual[1:]))
        if tuple(expected) != actual:
            mismatched.append(f"{component}:{path} (LoRA {list(expected)}, base {list(actual)})")
    if missing:
        raise IncompatibleLora(
            f"{lora_name} has {len(missing)} module(s) the base {base.name} lacks "
            f"(first: {', '.join(missing[:SHOW])}); it was made for another model"
        )
    if mismatched:
        raise IncompatibleLora(
            f"{lora_name} does not fit the base {base.name}: {len(mismatched)} module(s) differ "
            f"in shape (first: {', '.join(mismatched[:SHOW])})"
        )
    notes += check_prediction(base, lora, lora_name)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes


def check_prediction(base, lora: Lora, lora_name: str = "this LoRA") -> list[str]:
    """A note when the LoRA's metadata names another prediction type than the base's (same
    architecture, e.g. a v-prediction SDXL LoRA on an epsilon SDXL base): the weights load,
    but the LoRA pulls the base towards predicting the wrong target."""
    stated = prediction_from_metadata(lora.metadata)
    if stated is None or stated == base.prediction_type or base.family in ("sd2", "sd2-v"):
        return []  # SD 2.x's family is its prediction type: check_family says so already
    return [
        f"{lora_name} was trained on a {stated} base; {base.name} is {base.prediction_type}: "
        "results may be washed out or noisy (set the base's prediction type, e.g. "
        "model.prediction_type or --prediction-type, if the base is mislabelled)"
    ]


def _weight(model: torch.nn.Module, names: set[str], path: str) -> torch.Tensor | None:
    try:
        module = model.get_submodule(resolve_path(names, path))
    except KeyError:
        return None
    module = getattr(module, "base_layer", module)  # a module already wrapped by peft
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None
