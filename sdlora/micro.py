"""The micro model: a pretrained Stable Diffusion 1.x-shaped model small enough to ship and to
train a LoRA on with a CPU in minutes.

It has the real components (diffusers `AutoencoderKL` and `UNet2DConditionModel`, a transformers
`CLIPTextModel` and `CLIPTokenizer`) in SD 1.x's topology (three cross-attention down blocks and
a plain one, two layers per block, a final-layer-norm text encoder with quick-GELU, an epsilon
DDPM schedule with SD's scaled-linear betas), at widths that pretrain in under an hour on two CPU
cores. It draws the world of `sdlora/shapes.py`: coloured shapes on plain backgrounds.

Two choices differ from a real SD 1.x checkpoint, both for CPU speed:
- the VAE downsamples x4 (two downsamplings), not x8: 32 px images have 8 x 8 latents;
- the text context is 96 wide (SD 1.x: 768). 96 is mapped to `sd1` in
  `families.CROSS_ATTENTION_WIDTHS`, so the family is recognised from the weights as for a real
  checkpoint.

The weights live in `sdlora/weights/micro/` as a diffusers folder (fp16 safetensors), written by
`scripts/pretrain_micro.py` (see there to reproduce them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdlora import shapes
from sdlora.tiny import tiny_tokenizer

WEIGHTS = Path(__file__).resolve().parent / "weights" / "micro"
"""The shipped diffusers folder (model_index.json, unet/, vae/, text_encoder/, ...)."""
CROSS_ATTENTION_WIDTH = 96
RESOLUTION = shapes.SIZE
VAE_SCALE = 4
"""Pixels per latent cell: 32 px images, 8 x 8 latents."""


def tokenizer():
    """CLIP BPE tokenizer whose whole words are the micro world's vocabulary.

    Any other word (a trigger such as `zkstripes`) falls back to single-byte tokens, which no
    caption of the pretraining set contains: their embeddings are untrained, as a rare word's
    are in a real base.
    """
    return tiny_tokenizer(shapes.WORDS)


def text_encoder(vocab_size: int, bos: int, eos: int, pad: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=CROSS_ATTENTION_WIDTH,
            intermediate_size=CROSS_ATTENTION_WIDTH * 4,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=CROSS_ATTENTION_WIDTH,
            hidden_act="quick_gelu",
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def unet() -> UNet2DConditionModel:
    # SD 1.x topology: attention in down blocks 0-2, mid and up blocks 1-3.
    return UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_SCALE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 96, 96),
        layers_per_block=2,
        cross_attention_dim=CROSS_ATTENTION_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def scheduler() -> DDPMScheduler:
    # The noise schedule every SD 1.x checkpoint ships with.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def fresh_components(seed: int = 0) -> dict:
    """Randomly initialised components (the starting point of pretraining)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tokenizer()
        te = text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        return {
            "unet": unet(),
            "vae": vae(),
            "text_encoder": te,
            "tokenizer": tok,
            "scheduler": scheduler(),
        }


def available(folder: Path = WEIGHTS) -> bool:
    return (folder / "model_index.json").is_file()


def pipeline(components: dict):
    """A StableDiffusionPipeline over micro components (no safety checker: none exists)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def agreement(pipe, prompts: list[str], seed: int = 0, steps: int = 20, cfg: float = 5.0):
    """Generate one image per prompt (seeds seed, seed+1, ...) and check each against it.

    Returns (fraction of images agreeing with every claim, per-claim fractions, images).
    """
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad():
        for start in range(0, len(prompts), 16):
            chunk = prompts[start : start + 16]
            generators = [
                torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))
            ]
            images += pipe(
                chunk,
                num_inference_steps=steps,
                guidance_scale=cfg,
                height=RESOLUTION,
                width=RESOLUTION,
                generator=generators,
            ).images
    results = [shapes.check(p, image) for p, image in zip(prompts, images, strict=True)]
    claims = sorted({k for r in results for k in r})
    per_claim = {
        k: sum(r[k] for r in results if k in r) / sum(k in r for r in results) for k in claims
    }
    overall = sum(all(r.values()) for r in results) / len(results)
    return overall, per_claim, images
