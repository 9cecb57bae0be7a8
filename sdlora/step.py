"""One training step: batches of cached latents and captions -> diffusion loss -> gradients ->
one optimizer update.

The maths of the loss is `diffusion_loss()`; `Stepper` holds what every step needs (the models
as accelerate prepared them, the caches, the random streams) so the loop in `train.py` reads as
one call per step.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from sdlora.cache import LatentCache, TextCache
from sdlora.captions import augment_caption
from sdlora.checkpoint import Rngs
from sdlora.config import DatasetConfig, TrainConfig
from sdlora.dataset import Scan
from sdlora.errors import SdloraError
from sdlora.lora import adapters_off, lora_layers
from sdlora.masks import load_mask
from sdlora.models import Base
from sdlora.prior import PriorSet
from sdlora.runtime import out_of_memory_advice, training_autocast


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,  # (B, 4, H/8, W/8), already scaled
    text: torch.Tensor,  # (B, 77, cross_attention_dim)
    noise: torch.Tensor,  # like latents
    timesteps: torch.Tensor,  # (B,) ints in [0, num_train_timesteps)
    added_cond: dict | None = None,  # SDXL: pooled text embeddings and time ids
    min_snr_gamma: float | None = None,
    loss: str = "mse",
    huber_c: float = 0.1,
    debiased: bool = False,
    mask: torch.Tensor | None = None,  # (B, 1, H/8, W/8) in [0, 1]
) -> torch.Tensor:
    """Error between the UNet's prediction and its target (ε or v), averaged over the batch.

    `loss` is `mse`, or the pseudo-Huber `huber` / `smooth_l1` of `elementwise_loss`. With
    `min_snr_gamma`, each sample's error is weighted by min(SNR, γ) / SNR (ε) or
    min(SNR, γ) / (SNR + 1) (v), so easy low-noise steps stop dominating (Hang et al. 2023).
    With `debiased`, by 1 / √SNR (ε) or 1 / (SNR + 1) (v), SNR capped at 1000, as sd-scripts'
    debiased estimation. With `mask`, each element's error is multiplied by the mask (masked
    loss: 0 where the image does not count), then averaged as before, as sd-scripts does.
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = loss_target(noise_scheduler, latents, noise, timesteps, noisy)
    pred = unet(noisy, timesteps, text, added_cond_kwargs=added_cond).sample
    return prediction_loss(pred, target, noise_scheduler, timesteps, min_snr_gamma, loss,
                           huber_c, debiased, mask)  # fmt: skip


def loss_target(noise_scheduler, latents, noise, timesteps, noisy, target_unet=None):
    """What the UNet should predict for `noisy`: `target_unet(noisy, timesteps)` when given
    (it runs first: it switches the adapters off and on again), else v or ε."""
    if target_unet is not None:
        return target_unet(noisy, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def prediction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    noise_scheduler,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None = None,
    loss: str = "mse",
    huber_c: float = 0.1,
    debiased: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`diffusion_loss` from the UNet's prediction `pred` (B, C, h, w) and its `target`."""
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    error = elementwise_loss(pred.float(), target.float(), loss, huber_c)
    if mask is not None:
        error = error * mask
    error = error.mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma or debiased:
        snr = compute_snr(noise_scheduler, timesteps)  # (B,)
    if min_snr_gamma:
        error = error * snr.clamp(max=min_snr_gamma) / (snr + 1 if v_prediction else snr)
    if debiased:
        snr = snr.clamp(max=MAX_SNR)
        error = error * (1 / (snr + 1) if v_prediction else snr.rsqrt())
    return error.mean()


MAX_SNR = 1000.0
"""SNR cap of the debiased weighting (SNR is infinite at timestep 0), sd-scripts' value."""


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss: str = "mse", huber_c: float = 0.1
) -> torch.Tensor:
    """Per-element loss. `huber`: 2c(√(d² + c²) − c), quadratic for errors below c and linear
    above, so a few badly predicted pixels pull less; `smooth_l1`: the same divided by c
    (sd-scripts' two pseudo-Huber losses, with a constant c)."""
    if loss == "mse":
        return (pred - target) ** 2
    pseudo_huber = torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c
    if loss == "huber":
        return 2 * huber_c * pseudo_huber
    if loss == "smooth_l1":
        return 2 * pseudo_huber
    raise ValueError(f"unknown loss {loss!r}")


def make_noise(
    shape,
    generator: torch.Generator,
    offset: float = 0.0,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> torch.Tensor:
    """Gaussian noise; with `offset`, plus a per-channel constant that lets the model learn
    overall brightness (offset noise); with `multires_iterations`, plus noise drawn at
    coarser and coarser sizes (see `multires_noise`)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise += offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    if multires_iterations:
        noise = multires_noise(noise, generator, multires_iterations, multires_discount)
    return noise


def multires_noise(
    noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, as sd-scripts: to `noise` (B, C, h, w) add, for
    level i = 0, 1, ..., noise drawn at a size divided by r^i (r random in [2, 4), sizes
    shrinking cumulatively), upsampled bilinearly and weighted discount^i, then rescale to
    unit standard deviation. Low-frequency noise lets training move large areas of colour and
    light, which plain noise hardly does."""
    batch, channels, height, width = noise.shape
    noise, h, w = noise.clone(), height, width
    for level in range(iterations):
        r = 2 + 2 * float(torch.rand((), generator=generator))
        h, w = max(1, int(h / r**level)), max(1, int(w / r**level))
        coarse = torch.randn(batch, channels, h, w, generator=generator)
        noise += F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if h == 1 or w == 1:
            break  # the coarsest size: one value across the image
    return noise / noise.std()


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def encode_text(
    base: Base,
    captions: list[str],
    device,
    encoders: dict[str, torch.nn.Module] | None = None,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning (B, 77, width) and, for SDXL, pooled embeddings (B, width_2).

    `encoders` replaces the base's text encoders by name (the training wrappers accelerate
    made); `clip_skip` N takes the N-th layer from the end, then the final layer norm, as
    A1111 and sd-scripts do (SD 1.x/2.x; SDXL always conditions on the penultimate layers).
    """
    encoders = {**base.text_encoders, **(encoders or {})}
    ids = tokenize(base.tokenizer, captions).to(device)
    if base.family != "sdxl":
        if not clip_skip or clip_skip == 1:
            return encoders["text_encoder"](ids)[0], None
        hidden = encoders["text_encoder"](ids, output_hidden_states=True).hidden_states
        return base.text_encoder.final_layer_norm(hidden[-clip_skip]), None
    ids_2 = tokenize(base.tokenizer_2, captions).to(device)
    # SDXL conditions on both encoders' penultimate layers, side by side.
    out_1 = encoders["text_encoder"](ids, output_hidden_states=True)
    out_2 = encoders["text_encoder_2"](ids_2, output_hidden_states=True)
    text = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return text, out_2.text_embeds


def added_cond(base: Base, pooled, geometry: list[tuple], device) -> dict | None:
    """SDXL's extra conditioning: pooled text and, per image, original (h, w), crop
    (top, left) and target (h, w) = its bucket. None for the other families."""
    if base.family != "sdxl":
        return None
    ids = torch.tensor(geometry, dtype=pooled.dtype)
    return {"text_embeds": pooled, "time_ids": ids.to(device)}


def vae_scale(base: Base) -> int:
    """Pixels per latent cell: the VAE halves the size once per block after the first."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


@dataclass
class Batch:
    """One batch as the loss takes it: latents of one bucket, this step's caption variants."""

    latents: torch.Tensor  # (B, 4, H/8, W/8)
    captions: list[str]
    geometry: list[tuple]  # SDXL size conditioning, see added_cond
    names: list[str]  # file names, for error messages
    masks: torch.Tensor | None = None  # (B, 1, H/8, W/8) when an example has a loss mask


@dataclass
class Part:
    """Images of one UNet pass with their own loss: the style batch, or prior images."""

    latents: torch.Tensor  # (B, 4, h, w) on the device
    text: torch.Tensor  # (B, 77, width)
    noise: torch.Tensor
    timesteps: torch.Tensor  # (B,)
    cond: dict | None  # SDXL's added conditioning
    options: dict  # prediction_loss's loss options
    weight: float = 1.0
    target_unet: object = None  # the base's prediction, for the prior's `base` target
    names: list[str] = field(default_factory=list)  # for error messages


def assemble_batch(
    scan: Scan, idx: list[int], latents: LatentCache, c_data: DatasetConfig, rng
) -> Batch:
    """Examples `idx` with this step's flips, crops and caption augmentation."""
    rows, captions, geometry, masks = [], [], [], []
    for i in idx:
        example = scan.examples[i]
        flip = c_data.flip and rng.random() < 0.5
        latent, crop = latents.get(example, flip, c_data.crop, rng)
        rows.append(latent)
        grid = latent.shape[-2:]
        masks.append(
            load_mask(example.mask, example.size, example.bucket, crop, flip, grid)
            if example.mask
            else torch.ones(1, *grid)
        )
        captions.append(
            augment_caption(
                example.caption,
                rng,
                keep_tokens=c_data.keep_tokens,
                shuffle=c_data.shuffle_tags,
                tag_dropout=c_data.tag_dropout,
                caption_dropout=c_data.caption_dropout,
            )
        )
        width, height = example.size
        geometry.append((height, width, *crop, example.bucket[1], example.bucket[0]))
    names = [scan.examples[i].path.name for i in idx]
    masked = any(scan.examples[i].mask for i in idx)
    return Batch(torch.cat(rows), captions, geometry, names, torch.stack(masks) if masked else None)


class Stepper:
    """Forward and backward passes and the optimizer update of a run.

    `trained` holds the trained models by component (`unet`, and the text encoders when
    trained) as accelerate prepared them (wrapped for several processes); gradients are
    synchronised across processes only on the last backward pass before an update, as
    accelerate's `accumulate` does. `ema` (a `LoraEma`, or None) is updated after every
    optimizer step.
    """

    def __init__(
        self,
        base: Base,
        accelerator,
        trained: dict[str, torch.nn.Module],
        text_for: TextCache,
        prior: PriorSet | None,
        rngs: Rngs,
        c_train: TrainConfig,
        ema=None,
    ):
        self.base, self.accelerator, self.ema = base, accelerator, ema
        self.unet = trained["unet"]
        self.text_for, self.prior, self.rngs, self.c_train = text_for, prior, rngs, c_train
        self.models = list(trained.values())
        self.device = accelerator.device
        self.unet_layers = list(lora_layers(base.unet).values())  # for the base's prediction

    def forward_backward(self, batches: list[Batch], step: int) -> float:
        """Loss over `batches` (the step's gradient-accumulation batches), gradients summed
        into the LoRA parameters; returns the mean loss of this process. With prior
        preservation each batch also fits as many prior images: on the CPU in the same UNet
        pass when their sizes match (one pass of 2B images costs little more than one of B
        there), on a GPU in a backward pass of its own (the peak memory of one batch)."""
        kinds = ("style", "prior") if self.prior is not None else ("style",)
        passes = []  # (batch, the parts of one UNet pass)
        for batch in batches:
            joint = self.device.type == "cpu" and self._prior_fits(batch)
            passes += [(batch, kinds)] if joint else [(batch, (kind,)) for kind in kinds]
        total = 0.0
        for n, (batch, pass_kinds) in enumerate(passes):
            with (
                self._sync(last=n == len(passes) - 1),
                training_autocast(self.accelerator, self.models),
                out_of_memory_advice(step),
            ):
                parts = [self._part(kind, batch) for kind in pass_kinds]
                loss = self._loss(parts)
                self.accelerator.backward(loss / len(batches))
            total += loss.item() / len(batches)
            if not math.isfinite(total):
                names = [name for part in parts for name in part.names]
                raise SdloraError(
                    f"loss became {total} at step {step} (batch: {', '.join(names)}); "
                    "nothing was saved from this step. Lower train.lr or use "
                    "train.mixed_precision=no, then resume from the last checkpoint"
                )
        return total

    def update(self, optimizer, lr_schedule, trainable: list[torch.Tensor]) -> float:
        """One optimizer step on the synchronised gradients, clipped to `train.max_grad_norm`
        (0: not clipped); returns their norm before clipping."""
        limit = self.c_train.max_grad_norm if self.c_train.max_grad_norm > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(trainable, limit)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step()
        return float(grad_norm)

    def _prior_fits(self, batch: Batch) -> bool:
        """Whether prior images can share `batch`'s UNet pass: there are some, of its size."""
        return self.prior is not None and self.prior.latents.shape[1:] == batch.latents.shape[1:]

    def _part(self, kind: str, batch: Batch) -> Part:
        if kind == "style":
            return self._style_part(batch)
        return self._prior_part(len(batch.names))

    def _loss(self, parts: list[Part]) -> torch.Tensor:
        """The parts' weighted losses, summed, from one UNet call on all their images."""
        scheduler = self.base.scheduler
        noisy = [scheduler.add_noise(p.latents, p.noise, p.timesteps) for p in parts]
        targets = [  # before the call: a base target switches the adapters off and on
            loss_target(scheduler, p.latents, p.noise, p.timesteps, x, p.target_unet)
            for p, x in zip(parts, noisy, strict=True)
        ]
        cond = None
        if parts[0].cond is not None:  # SDXL: pooled text and time ids, side by side
            cond = {k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond}
        timesteps = torch.cat([p.timesteps for p in parts])
        noisy = torch.cat([x.to(parts[0].latents.dtype) for x in noisy])
        text = torch.cat([p.text for p in parts])
        pred = self.unet(noisy, timesteps, text, added_cond_kwargs=cond).sample
        preds = pred.split([len(p.timesteps) for p in parts])
        return sum(
            p.weight * prediction_loss(y, t, scheduler, p.timesteps, **p.options)
            for p, y, t in zip(parts, preds, targets, strict=True)
        )

    def _style_part(self, batch: Batch) -> Part:
        text, pooled = self.text_for(batch.captions)
        latents = batch.latents.to(self.device)  # (B, 4, H/8, W/8), one bucket
        c = self.c_train
        noise = make_noise(latents.shape, self.rngs.noise, c.noise_offset,
                           c.multires_noise_iterations, c.multires_noise_discount)  # fmt: skip
        steps = self.base.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(batch.names),), generator=self.rngs.noise)
        options = dict(
            min_snr_gamma=c.min_snr_gamma, loss=c.loss, huber_c=c.huber_c,
            debiased=c.debiased_estimation,
            mask=batch.masks.to(self.device) if batch.masks is not None else None,
        )  # fmt: skip
        return Part(latents, text, noise.to(self.device), timesteps.to(self.device),
                    added_cond(self.base, pooled, batch.geometry, self.device), options,
                    names=batch.names)  # fmt: skip

    def _prior_part(self, size: int) -> Part:
        """`size` base-drawn prior images under their own captions (or the empty prompt),
        weighted by `train.prior_weight`; their target is the noise or the base's prediction."""
        generator = self.rngs.prior
        latents, captions = self.prior.batch(size, generator, self.c_train.prior_unconditional)
        latents = latents.to(self.device)  # (B, 4, h, w)
        text, pooled = self.text_for(captions)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = self.base.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (size,), generator=generator).to(self.device)
        h, w = (side * vae_scale(self.base) for side in latents.shape[-2:])
        geometry = [(h, w, 0, 0, h, w)] * size
        cond = added_cond(self.base, pooled, geometry, self.device)
        target_unet = None
        if self.prior.base_text is not None:
            base_text, base_pooled = self.prior.base_text(captions)
            base_cond = added_cond(self.base, base_pooled, geometry, self.device)

            def target_unet(noisy, t):  # the base's prediction: every adapter off
                with torch.no_grad(), adapters_off(self.unet_layers):
                    out = self.base.unet(noisy, t, base_text.to(self.device),
                                         added_cond_kwargs=base_cond).sample  # fmt: skip
                return out

        options = dict(loss=self.c_train.loss, huber_c=self.c_train.huber_c)
        names = [f"prior image ({c or 'empty prompt'})" for c in captions]
        return Part(latents, text, noise, timesteps, cond, options, self.c_train.prior_weight,
                    target_unet, names)  # fmt: skip

    def _sync(self, last: bool):
        """No gradient synchronisation across processes except on the last backward pass."""
        stack = ExitStack()
        if not last:
            for model in self.models:
                stack.enter_context(self.accelerator.no_sync(model))
        return stack


def quality_metadata(c_train: TrainConfig) -> dict[str, str]:
    """The `ss_*` training fields (without prefix) of the loss and noise options, under
    sd-scripts' names where it has them."""
    return {
        "loss_type": {"mse": "l2"}.get(c_train.loss, c_train.loss),
        "huber_c": str(c_train.huber_c),
        "debiased_estimation": str(c_train.debiased_estimation),
        "ema_decay": str(c_train.ema_decay),
        "multires_noise_iterations": str(c_train.multires_noise_iterations or "None"),
        "multires_noise_discount": str(c_train.multires_noise_discount),
    }
