"""The Stable Diffusion families and how to recognise each from a base model's weights.

Cross-attention width is the surest sign (768 SD 1.x, 1024 SD 2.x, 2048 SDXL; the built-in
tiny models use 32 / 48 / 64). SD 2.x 512-epsilon and 768-v share every shape: the prediction
type comes only from the scheduler config, metadata or the user.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    """Our short name: sd1, sd2, sd2-v, sdxl."""
    title: str
    """How people call it, for messages."""
    prediction_type: str
    """epsilon or v_prediction."""
    resolution: int
    """Native training resolution."""
    ss_base_model_version: str
    """sd-scripts' `ss_base_model_version`."""
    architecture: str
    """ModelSpec `modelspec.architecture` of a LoRA for this family."""
    implementation: str
    """ModelSpec `modelspec.implementation`."""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "SD 1.x", "epsilon", 512, "sd_v1", "stable-diffusion-v1/lora", "diffusers"),
        Family(
            "sd2",
            "SD 2.x (512, epsilon)",
            "epsilon",
            512,
            "sd_v2",
            "stable-diffusion-v2-512/lora",
            "diffusers",
        ),
        Family(
            "sd2-v",
            "SD 2.x (768, v-prediction)",
            "v_prediction",
            768,
            "sd_v2_v",
            "stable-diffusion-v2-768-v/lora",
            "diffusers",
        ),
        Family(
            "sdxl",
            "SDXL",
            "epsilon",
            1024,
            "sdxl_base_v1-0",
            "stable-diffusion-xl-v1-base/lora",
            "https://github.com/Stability-AI/generative-models",
        ),
    )
}

# Cross-attention (text context) width -> family, ignoring the sd2 / sd2-v split.
# 32 / 48 / 64 are the built-in tiny models; 96 is the shipped micro model (SD 1.x-shaped).
CROSS_ATTENTION_WIDTHS = {
    768: "sd1",
    1024: "sd2",
    2048: "sdxl",
    32: "sd1",
    48: "sd2",
    64: "sdxl",
    96: "sd1",
}


def family_from_width(width: int, prediction_type: str = "epsilon") -> str | None:
    """Family for a cross-attention width, SD 2.x split by prediction type; None if unknown."""
    family = CROSS_ATTENTION_WIDTHS.get(width)
    if family == "sd2" and prediction_type == "v_prediction":
        return "sd2-v"
    return family


def family_from_diffusers_config(
    unet_config, has_text_encoder_2: bool, prediction_type: str
) -> str | None:
    """Family of a diffusers pipeline from its UNet config, text encoders and scheduler."""
    width = unet_config.get("cross_attention_dim")
    if isinstance(width, (list, tuple)):
        width = width[0]
    if has_text_encoder_2 or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return family_from_width(int(width), prediction_type) if width else None


def same_architecture(a: str, b: str) -> bool:
    """sd2 and sd2-v share every shape; other families differ."""
    return a == b or {a, b} == {"sd2", "sd2-v"}
