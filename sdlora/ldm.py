"""Diffusers components -> the original single-file layout A1111, Forge and ComfyUI load.

SD 1.x/2.x use the LDM layout (`model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.`), SDXL the SGM/SAI one (`conditioner.embedders.0/1.`). The names are
the inverse of what diffusers' `from_single_file` reads (`loaders/single_file_utils.py`);
OpenCLIP encoders (SD 2.x, SDXL's second) keep q/k/v fused in one `in_proj` tensor and
their text projection transposed. Tensors are renamed, never copied, except where the
original layout has another shape.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
import torch

from sdlora.errors import SdloraError
from sdlora.families import FAMILIES
from sdlora.schedule import MODELSPEC_PREDICTION

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family's text encoders sit and whether they are OpenAI CLIP or OpenCLIP.
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.text_model.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sd2-v": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {
        "text_encoder": ("clip", "conditioner.embedders.0.transformer.text_model."),
        "text_encoder_2": ("openclip", "conditioner.embedders.1.model."),
    },
}
# ModelSpec architectures of full checkpoints (LoRAs add `/lora`).
CHECKPOINT_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}  # fmt: skip
VAE_ATTENTION = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
}  # fmt: skip
OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}  # fmt: skip
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
SKIPPED = ("position_ids",)  # buffers every loader rebuilds itself


def unet_to_ldm(state: dict, layers_per_block: int, n_levels: int) -> dict:
    """A diffusers UNet state dict under LDM/SGM names (`input_blocks`, `middle_block`, ...).

    Each level holds `layers_per_block` resnet(+attention) input blocks and a downsampler
    block; each output level `layers_per_block + 1` blocks, the last one with the upsampler.
    """
    step = layers_per_block + 1
    renames = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }  # fmt: skip
    for i in range(n_levels):
        for j in range(layers_per_block):
            renames[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{step * i + j + 1}.0"
            renames[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{step * i + j + 1}.1"
        renames[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{step * (i + 1)}.0.op"
        for j in range(step):
            renames[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{step * i + j}.0"
            renames[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{step * i + j}.1"
        has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        renames[f"up_blocks.{i}.upsamplers.0"] = (
            f"output_blocks.{step * i + layers_per_block}.{2 if has_attention else 1}"
        )
    out = {}
    for key, value in state.items():
        new = _rename(key, renames)
        if ".resnets." in key:
            for a, b in UNET_RESNET.items():
                new = new.replace(f".{a}.", f".{b}.")
        if new == key:
            raise SdloraError(f"the UNet tensor {key} has no name in the original layout")
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(state: dict, n_levels: int) -> dict:
    """A diffusers VAE state dict under LDM names (decoder levels counted from the bottom)."""
    renames = {
        "encoder.mid_block.resnets.0": "encoder.mid.block_1",
        "encoder.mid_block.resnets.1": "encoder.mid.block_2",
        "encoder.mid_block.attentions.0": "encoder.mid.attn_1",
        "decoder.mid_block.resnets.0": "decoder.mid.block_1",
        "decoder.mid_block.resnets.1": "decoder.mid.block_2",
        "decoder.mid_block.attentions.0": "decoder.mid.attn_1",
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for i in range(n_levels):
        up = n_levels - 1 - i
        renames[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        renames[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        renames[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{up}.block"
        renames[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{up}.upsample"
    out = {}
    for key, value in state.items():
        new = _rename(key, renames).replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new:
            for a, b in VAE_ATTENTION.items():
                new = new.replace(f".attn_1.{a}.", f".attn_1.{b}.")
            if value.dim() == 2:  # the original VAE attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """An OpenAI CLIP text encoder: the transformers names under `prefix`."""
    return {
        prefix + key: value
        for key, value in _text_model(state).items()
        if not key.endswith(SKIPPED) and not key.startswith("text_projection")
    }


def openclip_to_ldm(state: dict, prefix: str) -> dict:
    """An OpenCLIP text encoder: `transformer.resblocks.N` with fused q/k/v (`in_proj`),
    `text_projection` as the matrix OpenCLIP multiplies by (the transposed linear weight)."""
    state = _text_model(state)
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            for a, b in OPENCLIP_LAYER.items():
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
    for a, b in OPENCLIP_TOP.items():
        out[prefix + b] = state[a]
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T
    covered = {f"encoder.layers.{n}." for n in layers}
    left = [
        k
        for k in state
        if not k.endswith(SKIPPED)
        and k not in OPENCLIP_TOP
        and k != "text_projection.weight"
        and not any(k.startswith(c) for c in covered)
    ]
    if left:
        raise SdloraError(f"the text-encoder tensors {left[:3]} have no OpenCLIP name")
    return out


def to_single_file(family: str, components: dict) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a pipeline's `unet`, `vae` and text encoders."""
    unet, vae = components["unet"], components["vae"]
    state = unet_to_ldm(
        unet.state_dict(), unet.config.layers_per_block, len(unet.config.block_out_channels)
    )
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    for name, (kind, prefix) in TEXT_ENCODERS[family].items():
        convert = clip_to_ldm if kind == "clip" else openclip_to_ldm
        state.update(convert(components[name].state_dict(), prefix))
    return {k: v.contiguous() for k, v in state.items()}


def checkpoint_metadata(
    family: str, title: str, base_name: str, loras: list[tuple[str, float, str]]
) -> dict[str, str]:
    """ModelSpec metadata of a merged checkpoint; `loras` are (name, scale, AutoV3 hash)."""
    resolution = FAMILIES[family].resolution
    merged = ", ".join(f"{name} x{scale:g}" for name, scale, _ in loras)
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": CHECKPOINT_ARCHITECTURES[family],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.description": f"Merged by sdlora from its base and the LoRAs {merged}",
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v"
        if FAMILIES[family].prediction_type == "v_prediction"
        else "epsilon",
        "modelspec.merged_from": ", ".join([base_name, *(name for name, _, _ in loras)]),
        "sdlora_merged_loras": json.dumps(
            [{"name": n, "scale": s, "sshs_model_hash": h} for n, s, h in loras]
        ),
    }


def save_merged(path: str | Path, generator, dtype: str = "fp16") -> Path:
    """Write a `Generator` whose LoRAs are fused as one original-layout checkpoint with
    ModelSpec metadata naming the LoRAs; the file appears whole or not at all."""
    from sdlora.export import DTYPES
    from sdlora.stfile import sha256_after_header

    path = Path(path)
    base = generator.base
    loras = [
        (s.name, s.scale, s.lora.metadata.get("sshs_model_hash")
         or sha256_after_header(s.path.read_bytes()))
        for s in generator.loras
    ]  # fmt: skip
    metadata = checkpoint_metadata(base.family, path.stem, Path(base.name).stem, loras)
    # The base's own prediction type: an SDXL or SD 1.x base may be v-prediction too.
    metadata["modelspec.prediction_type"] = MODELSPEC_PREDICTION[base.prediction_type]
    parts = {"unet": base.unet, "vae": base.vae, **base.text_encoders}
    state = {k: v.to(DTYPES[dtype]) for k, v in to_single_file(base.family, parts).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Through a file beside the target: a checkpoint is gigabytes, too big to hold as bytes.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(state, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _rename(key: str, renames: dict) -> str:
    for old in sorted(renames, key=len, reverse=True):
        if key.startswith(old + "."):
            return renames[old] + key[len(old) :]
    return key


def _text_model(state: dict) -> dict:
    """Names under the `text_model` level, which transformers 5 dropped from CLIPTextModel."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}
