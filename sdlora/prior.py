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

from sdlora.report import strip_trigger
from sdlora.schedule import guidance_rescale

if TYPE_CHECKING:
    from sdlora.cache import TextCache


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
