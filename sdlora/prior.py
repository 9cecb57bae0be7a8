"""Prior preservation: regularisation images the base model draws for itself.

A UNet LoRA acts on every prompt, not only on those with the trigger word, so a style learnt
from a handful of images leaks into everything the model draws. Prior preservation (DreamBooth)
counters this: before training, the frozen base renders the training captions *without* the
trigger; during training each step also fits those images under those captions, which pins the
LoRA to "change nothing" wherever the trigger is absent.

The images are kept as latents (the pipeline's own output, in the UNet's scaled latent space),
so no VAE round trip is needed.

What the LoRA fits on them (`train.prior_target`) is either the noise that was added, as on
the style images (DreamBooth), or the base model's own prediction for the same noisy latent
and caption (`base`). The noise target pins the LoRA to the base only on average over many
steps, so each step pulls it a random way; the base's prediction is what "change nothing"
means at every step, so its loss is zero exactly when the LoRA leaves the prompt alone. It
costs one more UNet forward pass (without gradients) per prior batch, and keeps the base's
text conditioning of the prior captions, computed once before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler

from sdlora.cache import TextCache
from sdlora.report import base_only, strip_trigger
from sdlora.schedule import guidance_rescale

if TYPE_CHECKING:
    from sdlora.config import Config


@dataclass
class PriorSet:
    """Base-generated latents and the captions they were drawn for."""

    latents: torch.Tensor  # (N, 4, h, w), scaled like training latents
    captions: list[str]
    base_text: TextCache | None = None
    """The base's text conditioning of the prior captions and the empty prompt, computed
    before training with the adapters off, for the `base` target; None for the noise target."""

    def batch(
        self, size: int, generator: torch.Generator, unconditional: float = 0.0
    ) -> tuple[torch.Tensor, list[str]]:
        """`size` random examples (with replacement), each captioned with the empty prompt
        instead of its own with probability `unconditional`."""
        idx = torch.randint(0, len(self.captions), (size,), generator=generator)
        captions = [self.captions[i] for i in idx.tolist()]
        if unconditional > 0:  # (no draw at 0: the stream stays as it was)
            empty = (torch.rand(size, generator=generator) < unconditional).tolist()
            captions = ["" if e else c for c, e in zip(captions, empty, strict=True)]
        return self.latents[idx], captions


def generate_prior(
    base,
    captions: list[str],
    trigger: str,
    count: int,
    seed: int,
    steps: int,
    cfg: float,
    size: int,
    batch: int = 16,
) -> PriorSet:
    """`count` latents from the frozen `base` for the training captions without `trigger`.

    Call before training (or with the adapters disabled): what is drawn is the base's prior.
    """
    prompts = sorted({strip_trigger(c, trigger) for c in captions})
    prompts = [prompts[i % len(prompts)] for i in range(count)]
    pipe = base.pipeline(DDIMScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    latents = []
    with torch.no_grad():
        for start in range(0, count, batch):
            chunk = prompts[start : start + batch]
            generators = [
                torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))
            ]
            out = pipe(
                chunk,
                num_inference_steps=steps,
                guidance_rescale=guidance_rescale(base.scheduler),
                guidance_scale=cfg,
                height=size,
                width=size,
                generator=generators,
                output_type="latent",
            )
            latents.append(out.images.cpu())
    return PriorSet(torch.cat(latents), prompts)


def draw_prior(base, config: Config, examples: list, encode) -> PriorSet:
    """`train.prior_images` images drawn by the base itself (adapters off) for the captions of
    the training `examples` without the trigger, and, for the `base` prior target, the base's
    text conditioning of those captions and the empty prompt (`encode`: captions to
    conditioning, as the run encodes them)."""
    with base_only(base):
        prior = generate_prior(
            base,
            [e.caption for e in examples],
            config.dataset.trigger,
            config.train.prior_images,
            seed=config.train.seed,
            steps=config.sample.steps,
            cfg=config.sample.cfg,
            size=config.dataset.resolution,
        )
        if config.train.prior_target == "base":  # filled now, while the adapters are off
            prior.base_text = TextCache(encode)
            prior.base_text(sorted({*prior.captions, ""}))
    return prior
