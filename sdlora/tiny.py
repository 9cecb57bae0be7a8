"""Tiny Stable-Diffusion-shaped models built offline from configs, for tests and smoke runs.

Each family keeps the real topology (block types, attention placement, SDXL's two text encoders,
pooled embeddings, time ids and deep transformer blocks) at widths small enough to train on a
CPU in seconds. Weights are random but deterministic from a seed. The cross-attention widths
(32 / 48 / 64) are distinct per family, so family detection works on these models the same way
it does on real checkpoints (768 / 1024 / 2048).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

TINY_FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
TINY_RESOLUTION = 64
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_tokenizer(words: list[str] | tuple[str, ...] = ()) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes, plus optional whole words (one token each)."""
    vocab: dict[str, int] = {}
    chars = list(bytes_to_unicode().values())
    merges = _merges_for(words)
    # Every merge result is a token: the word-final ones are the whole words.
    merged = [a + b for a, b in merges]
    for token in chars + [c + "</w>" for c in chars] + merged + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _merges_for(words) -> list[tuple[str, str]]:
    """BPE merges that turn each word into one token.

    Each word is first split by the merges learnt so far (as the tokenizer would), then its
    pieces are joined left to right by new merges. New merges rank after all earlier ones, so
    they never change how an earlier word is split.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        left = pieces[0]
        for right in pieces[1:]:
            merges.append((left, right))
            left = left + right
    return merges


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the best-ranked adjacent pair."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(_pairs(symbols))]
        best, i = min(pairs)
        if best == len(rank):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _pairs(symbols: list[str]):
    return zip(symbols[:-1], symbols[1:], strict=True)


def _text_encoder_config(
    tokenizer: CLIPTokenizer, hidden: int, layers: int, act: str
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    # Four blocks: three downsamplings, the x8 scale of every SD VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )


def _scheduler(prediction_type: str) -> DDPMScheduler:
    # The noise schedule every SD 1.x/2.x/XL checkpoint ships with.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _sd_unet(cross: int, linear_projection: bool, heads) -> UNet2DConditionModel:
    # SD 1.x/2.x topology: attention in down blocks 0-2, mid and up blocks 1-3.
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=cross,
        attention_head_dim=heads,
        use_linear_projection=linear_projection,
        norm_num_groups=8,
    )


def _sdxl_unet(cross: int, pooled: int) -> UNet2DConditionModel:
    # SDXL topology: no attention at the top level, transformer depth growing with depth.
    time_dim = 8
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 3),
        cross_attention_dim=cross,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
        norm_num_groups=8,
    )


def tiny_components(family: str = "sd1", seed: int = 0) -> dict:
    """The components of a tiny pipeline of `family`, deterministic from `seed`.

    Returns a dict with keys `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler` and, for
    SDXL, `text_encoder_2` and `tokenizer_2`.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny model for family {family!r}; choose from {TINY_FAMILIES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        parts: dict = {"tokenizer": tokenizer, "vae": _vae()}
        if family == "sd1":
            te = CLIPTextModel(_text_encoder_config(tokenizer, 32, 2, "quick_gelu"))
            parts.update(text_encoder=te, unet=_sd_unet(32, False, 4))
        elif family in ("sd2", "sd2-v"):
            te = CLIPTextModel(_text_encoder_config(tokenizer, 48, 3, "gelu"))
            parts.update(text_encoder=te, unet=_sd_unet(48, True, (2, 2, 4, 4)))
        else:
            te = CLIPTextModel(_text_encoder_config(tokenizer, 32, 2, "quick_gelu"))
            te2 = CLIPTextModelWithProjection(_text_encoder_config(tokenizer, 32, 3, "gelu"))
            parts.update(
                text_encoder=te,
                text_encoder_2=te2,
                tokenizer_2=tiny_tokenizer(),
                unet=_sdxl_unet(cross=32 + 32, pooled=32),
            )
    parts["scheduler"] = _scheduler("v_prediction" if family == "sd2-v" else "epsilon")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].eval()
    return parts
