"""The Stable Diffusion families and how to recognise each from a base model's weights.

Cross-attention width is the surest sign (768 SD 1.x, 1024 SD 2.x, 2048 SDXL; the built-in
tiny models use 32 / 48 / 64). SD 2.x 512-epsilon and 768-v share every shape: the prediction
type comes only from the scheduler config, metadata or the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREDICTION_TYPES = ("epsilon", "v_prediction")


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


@dataclass
class Detection:
    """What a file says about its family, and how sure that is."""

    family: str | None
    evidence: list[str]
    ambiguous: bool = False
    """True when structure could not decide and metadata (or nothing) did."""


# Text-encoder hidden width -> family (the first text encoder for SDXL).
TEXT_ENCODER_WIDTHS = {768: "sd1", 1024: "sd2", 32: "sd1", 48: "sd2", 96: "sd1"}  # 96: micro
METADATA_FAMILIES = {
    "sd_v1": "sd1", "sd_v2": "sd2", "sd_v2_v": "sd2-v", "sdxl_base_v1-0": "sdxl",
    "stable-diffusion-v1/lora": "sd1", "stable-diffusion-v2-512/lora": "sd2",
    "stable-diffusion-v2-768-v/lora": "sd2-v", "stable-diffusion-xl-v1-base/lora": "sdxl",
}  # fmt: skip


# Base models by the names Civitai files them under -> family. The SDXL community bases
# (Pony, Illustrious, NoobAI) are SDXL fine-tunes: same architecture, so the same family.
BASE_LABELS = {
    "SD 1.4": "sd1", "SD 1.5": "sd1", "SD 2.0": "sd2", "SD 2.1": "sd2",
    "SD 2.0 768": "sd2-v", "SD 2.1 768": "sd2-v", "SDXL 1.0": "sdxl",
    "Pony": "sdxl", "Illustrious": "sdxl", "NoobAI": "sdxl",
}  # fmt: skip
# The Civitai base-model name of a family when no label says more.
FAMILY_LABELS = {"sd1": "SD 1.5", "sd2": "SD 2.1", "sd2-v": "SD 2.1 768", "sdxl": "SDXL 1.0"}
LABEL_KEY = "ss_base_model_label"
"""Metadata key of the base-model label (sd-scripts and ModelSpec define none)."""


def known_label(label: str) -> str | None:
    """`label` spelt as Civitai does (`pony` -> `Pony`), or None when it is not one of its."""
    wanted = label.strip().casefold().replace("-", " ")
    return next((k for k in BASE_LABELS if k.casefold() == wanted), None)


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """Family named by sd-scripts' or ModelSpec metadata (or a base-model label), if any."""
    label = known_label(metadata.get(LABEL_KEY, ""))
    for key in ("modelspec.architecture", "ss_base_model_version"):
        family = METADATA_FAMILIES.get(metadata.get(key, ""))
        if family:
            if family == "sd2" and metadata.get("modelspec.prediction_type") == "v":
                return "sd2-v"
            return family
    if metadata.get("ss_v2") == "True":
        return "sd2-v" if metadata.get("ss_v_parameterization") == "True" else "sd2"
    return BASE_LABELS[label] if label else None


def detect_lora_family(lora) -> Detection:
    """Family of a canonical LoRA: structure first (widths, encoders, topology), metadata second."""
    evidence: list[str] = []
    structural: str | None = None
    unet = lora.components.get("unet", {})
    if "text_encoder_2" in lora.components:
        structural = "sdxl"
        evidence.append("has a second text encoder")
    for path, module in unet.items():
        if re.search(r"attn2\.to_[kv]$", path):
            width = module.shape[1]
            family = CROSS_ATTENTION_WIDTHS.get(width)
            evidence.append(f"cross-attention input width {width}")
            structural = structural or family
            break
    if structural is None and unet:
        if any(
            re.search(r"transformer_blocks\.[1-9]", p) or p.startswith("up_blocks.0.attentions")
            for p in unet
        ):
            structural = "sdxl"
            evidence.append("SDXL block topology")
    te = lora.components.get("text_encoder", {})
    if structural is None and te:
        q = next((m for p, m in te.items() if p.endswith("q_proj")), None)
        if q is not None and q.shape[1] in TEXT_ENCODER_WIDTHS:
            structural = TEXT_ENCODER_WIDTHS[q.shape[1]]
            evidence.append(f"text-encoder width {q.shape[1]}")
    from_meta = family_from_metadata(lora.metadata)
    if structural is None:
        if from_meta:
            evidence.append("metadata only")
        return Detection(from_meta, evidence, ambiguous=True)
    if structural == "sd2" and from_meta == "sd2-v":
        return Detection("sd2-v", evidence + ["v-prediction from metadata"])
    if structural == "sd2" and from_meta != "sd2":
        # SD 2.x 512 and 768-v share every shape: without metadata this is a guess.
        return Detection("sd2", evidence + ["prediction type unknown"], ambiguous=from_meta is None)
    return Detection(structural, evidence)
