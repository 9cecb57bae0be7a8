"""Module names: diffusers paths ⇄ kohya names, and SAI (LDM) UNet blocks ⇄ diffusers blocks.

A kohya name is `prefix + "_" + path.replace(".", "_")`. Going back needs to know which
underscores belong to a word (`down_blocks`, `to_q`, `self_attn`): `COMPOUND_WORDS` lists them.
SAI/LDM UNet names count blocks flat: diffusers `down_blocks.i.attentions.j` is
`input_blocks.(3i+j+1).1`, `up_blocks.i.attentions.j` is `output_blocks.(3i+j).1`, and
`mid_block.attentions.0` is `middle_block.1` (the same numbering in SD 1.x, 2.x and SDXL).
"""

from __future__ import annotations

import re

KOHYA_PREFIXES = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
# Every kohya prefix a reader accepts, longest first so `lora_te1` wins over `lora_te`.
PREFIX_COMPONENTS = {
    "lora_unet": "unet",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te": "text_encoder",
    # LyCORIS's own wrapper (`create_lycoris`, as SimpleTuner trains and saves with it) names
    # the modules of the one model it wraps, the UNet, by their diffusers paths.
    "lycoris": "unet",
}

# Words of module paths that contain an underscore, longest first.
COMPOUND_WORDS = sorted(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "time_emb_proj",
        "conv_shortcut",
        "text_model",
        "input_blocks",
        "middle_block",
        "output_blocks",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "conv_in",
        "conv_out",
        "final_layer_norm",
        "layer_norm1",
        "layer_norm2",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
        "add_k_proj",
        "add_v_proj",
        "conv_norm_out",
        "token_embedding",
        "position_embedding",
        "text_projection",
    ],
    key=lambda w: -w.count("_"),
)
# diffusers ResNet layers -> their LDM names inside a block.
RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
LDM_TO_RESNET = {v: k for k, v in RESNET_TO_LDM.items()}


def kohya_prefixes(family: str) -> dict[str, str]:
    """Component -> kohya key prefix for `family`."""
    return KOHYA_PREFIXES["sdxl" if family == "sdxl" else "sd"]


def kohya_name(component: str, path: str, family: str) -> str:
    """The kohya module name sd-scripts writes for a diffusers module path."""
    if component == "unet" and family == "sdxl":
        path = diffusers_to_sai(path)
    elif component != "unet" and not path.startswith("text_model."):
        path = "text_model." + path
    return kohya_prefixes(family)[component] + "_" + path.replace(".", "_")


def split_kohya_name(name: str) -> tuple[str, str] | None:
    """(component, diffusers module path) of a kohya module name, or None if not kohya."""
    for prefix, component in PREFIX_COMPONENTS.items():
        if name.startswith(prefix + "_"):
            path = underscores_to_path(name[len(prefix) + 1 :])
            if component == "unet":
                path = sai_to_diffusers(path)
            else:
                path = path.removeprefix("text_model.")
            return component, path
    return None


def underscores_to_path(name: str) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`."""
    tokens = name.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for word in COMPOUND_WORDS:
            n = word.count("_") + 1
            if "_".join(tokens[i : i + n]) == word:
                parts.append(word)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def diffusers_to_sai(path: str) -> str:
    """Map a diffusers UNet module path to SAI (LDM) block names."""
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", path):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.0.{RESNET_TO_LDM[m[3]]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$", path):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.0.{RESNET_TO_LDM[m[3]]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)$", path):
        return f"middle_block.{2 * int(m[1])}.{RESNET_TO_LDM[m[2]]}"
    # Resamplers (LoCon): SDXL's upsampling blocks all have attentions, so theirs is the 3rd.
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", path):
        return f"input_blocks.{3 * int(m[1]) + 3}.0.op"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", path):
        return f"output_blocks.{3 * int(m[1]) + 2}.2.conv"
    raise ValueError(f"no SAI name for UNet module {path!r}")


def sai_to_diffusers(path: str) -> str:
    """Map SAI (LDM) UNet block names back to diffusers paths; other paths pass through."""
    if m := re.match(r"input_blocks\.(\d+)\.0\.op$", path):
        return f"down_blocks.{int(m[1]) // 3 - 1}.downsamplers.0.conv"
    if m := re.match(r"output_blocks\.(\d+)\.2\.conv$", path):
        return f"up_blocks.{int(m[1]) // 3}.upsamplers.0.conv"
    if m := re.match(r"input_blocks\.(\d+)\.([01])\.(.*)", path):
        n = int(m[1]) - 1
        if m[2] == "1":
            return f"down_blocks.{n // 3}.attentions.{n % 3}.{m[3]}"
        return f"down_blocks.{n // 3}.resnets.{n % 3}.{LDM_TO_RESNET.get(m[3], m[3])}"
    if m := re.match(r"output_blocks\.(\d+)\.([01])\.(.*)", path):
        n = int(m[1])
        if m[2] == "1":
            return f"up_blocks.{n // 3}.attentions.{n % 3}.{m[3]}"
        return f"up_blocks.{n // 3}.resnets.{n % 3}.{LDM_TO_RESNET.get(m[3], m[3])}"
    if m := re.match(r"middle_block\.1\.(.*)", path):
        return f"mid_block.attentions.0.{m[1]}"
    if m := re.match(r"middle_block\.([02])\.(.*)", path):
        return f"mid_block.resnets.{int(m[1]) // 2}.{LDM_TO_RESNET.get(m[2], m[2])}"
    return path
