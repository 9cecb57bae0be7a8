"""The training loop: a frozen base, LoRA layers on its attention, a diffusion loss.

`train()` reads top to bottom: data, base, adapters, latent cache, optimizer, loop, save.
The per-step maths is `diffusion_loss()`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from sdlora import export
from sdlora.buckets import bucket_batches
from sdlora.cache import LatentCache, TextCache
from sdlora.captions import augment_caption
from sdlora.config import Config, DatasetConfig, config_to_toml, load_config
from sdlora.dataset import (
    Problem,
    Scan,
    epoch_plan,
    folder_counts,
    scan_folder,
    summarise_problems,
    tag_frequency,
)
from sdlora.decode import parse_colour
from sdlora.errors import SdloraError
from sdlora.images import save_grid
from sdlora.lora import (
    TEXT_ENCODER_ATTENTION,
    UNET_TARGET_PRESETS,
    Lora,
    extract_lora,
    inject_lora,
    lora_parameters,
)
from sdlora.models import Base, load_base
from sdlora.prior import PriorSet, generate_prior
from sdlora.report import decode_latents, learning_report, set_adapters, summary


@dataclass
class TrainResult:
    """What a finished run wrote."""

    run_dir: Path
    lora_path: Path
    base: Base
    """The base with the trained LoRA layers in place (ready for more sampling)."""
    samples: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    learning: dict | None = None
    """The learning report (learning_report.json), when one was made."""


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,  # (B, 4, H/8, W/8), already scaled
    text: torch.Tensor,  # (B, 77, cross_attention_dim)
    noise: torch.Tensor,  # like latents
    timesteps: torch.Tensor,  # (B,) ints in [0, num_train_timesteps)
    added_cond: dict | None = None,  # SDXL: pooled text embeddings and time ids
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and its target (ε or v)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text, added_cond_kwargs=added_cond).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float())


def prior_loss(base: Base, prior: PriorSet, text_for, size: int, generator, device):
    """`diffusion_loss` on `size` base-drawn prior images under their own captions."""
    latents, captions = prior.batch(size, generator)
    latents = latents.to(device)  # (B, 4, h, w)
    text, pooled = text_for(captions)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    steps = base.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (size,), generator=generator).to(device)
    h, w = (side * vae_scale(base) for side in latents.shape[-2:])
    added = _added_cond(base, pooled, [(h, w, 0, 0, h, w)] * size, device)
    return diffusion_loss(base.unet, base.scheduler, latents, text, noise, timesteps, added)


def train(
    config: Config | str | Path, overrides: tuple[str, ...] = (), progress: bool = True
) -> TrainResult:
    """Train a style LoRA as `config` says; returns the paths written."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    c_data, c_lora, c_train, c_out = config.dataset, config.lora, config.train, config.output
    run_dir = Path(c_out.dir)
    lora_path = run_dir / f"{c_out.name}.safetensors"
    if lora_path.exists() and not c_out.overwrite:
        raise SdloraError(
            f"{lora_path} already exists; choose another output.dir or output.name, "
            "or set output.overwrite=true"
        )

    # Data first: every file decoded, a bad folder fails before any model loads.
    scan = scan_dataset(c_data)
    scan.require_examples()
    print(f"sdlora: {scan.root}: {len(scan.examples)} usable images, {len(scan.skipped)} skipped")
    for line in summarise_problems(scan):
        print(f"  {line}")
    print(f"  {epoch_plan(scan, c_train.steps, c_train.batch_size, c_train.grad_accum)}")
    print(f"  buckets: {', '.join(f'{b} ({n})' for b, n in scan.bucket_counts().items())}")

    # Devices and precision.
    if c_train.device == "cuda" and not torch.cuda.is_available():
        raise SdloraError("train.device is cuda but no CUDA device is available; use cpu or auto")
    if c_train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SdloraError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    accelerator = Accelerator(
        mixed_precision=c_train.mixed_precision,
        cpu=c_train.device == "cpu",
        gradient_accumulation_steps=c_train.grad_accum,
    )
    device = accelerator.device

    # The frozen base, with LoRA layers on its attention.
    base = load_base(
        config.model.base,
        config.model.family,
        seed=c_train.seed,
        config_dir=config.model.config_dir,
        allow_pickle=config.model.allow_pickle,
    )
    torch.manual_seed(c_train.seed)
    inject_lora(base.unet, c_lora.rank, c_lora.alpha, UNET_TARGET_PRESETS[c_lora.unet_targets])
    train_te = c_lora.text_encoder and (
        c_train.text_encoder_lr is None or c_train.text_encoder_lr > 0
    )
    for encoder in base.text_encoders.values():
        if train_te:
            inject_lora(encoder, c_lora.rank, c_lora.alpha, TEXT_ENCODER_ATTENTION)
        else:
            encoder.requires_grad_(False)
    base.vae.requires_grad_(False)
    for module in (base.unet, base.vae, *base.text_encoders.values()):
        module.to(device)
    check_resolution(base, c_data.resolution)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_to_toml(config), encoding="utf-8")
    print(f"sdlora: training {base.family} LoRA on {len(scan.examples)} images -> {run_dir}")

    # Frozen models' outputs are computed once: latents per image and flip, text per caption.
    cache_dir = Path(c_data.cache_dir) if c_data.cache_dir else None
    latents = LatentCache(base.vae, scan, device, cache_dir, enabled=c_data.cache_latents)
    if c_data.crop == "center":
        latents.fill(scan.examples, (False, True) if c_data.flip else (False,))
    text_for = TextCache(lambda captions: encode_text(base, captions, device), not train_te)

    # Prior preservation: the base's own images for the captions without the trigger.
    prior = None
    if c_train.prior_images:
        set_adapters(base, False)
        prior = generate_prior(
            base,
            [e.caption for e in scan.examples],
            c_data.trigger,
            c_train.prior_images,
            seed=c_train.seed,
            steps=config.sample.steps,
            cfg=config.sample.cfg,
            size=c_data.resolution,
        )
        set_adapters(base, True)
        print(f"  prior preservation: {len(prior.captions)} images drawn by the base")
    prior_gen = torch.Generator().manual_seed(c_train.seed + 2)

    # Optimizer and learning-rate schedule.
    groups = [{"params": lora_parameters(base.unet), "lr": c_train.lr}]
    if train_te:
        te_lr = c_train.text_encoder_lr if c_train.text_encoder_lr is not None else c_train.lr
        te_params = [p for e in base.text_encoders.values() for p in lora_parameters(e)]
        groups.append({"params": te_params, "lr": te_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=c_train.weight_decay)
    lr_schedule = get_scheduler(
        c_train.lr_scheduler,
        optimizer,
        num_warmup_steps=c_train.warmup_steps,
        num_training_steps=c_train.steps,
    )
    trainable = [base.unet, *(base.text_encoders.values() if train_te else ())]
    prepared = accelerator.prepare(*trainable, optimizer, lr_schedule)
    optimizer, lr_schedule = prepared[-2], prepared[-1]

    # Sampling, logs, the loop.
    samples = [sample(base, config, run_dir, step=0, device=device)]
    log_path = run_dir / "log.jsonl"
    writer = _tensorboard(run_dir / "logs")
    data_gen = torch.Generator().manual_seed(c_train.seed)
    noise_gen = torch.Generator().manual_seed(c_train.seed + 1)
    order = bucket_batches(
        [e.bucket for e in scan.examples],
        [e.repeats for e in scan.examples],
        c_train.batch_size,
        data_gen,
    )
    augment_rng = random.Random(c_train.seed)  # flips, random crops, caption variants
    losses: list[float] = []
    started = time.time()
    bar = tqdm(total=c_train.steps, desc="train", unit="step", disable=not progress)
    for module in trainable:
        module.train()
    with log_path.open("w", encoding="utf-8") as log:
        for step in range(1, c_train.steps + 1):
            step_loss = 0.0
            for _ in range(c_train.grad_accum):
                idx = next(order)
                with accelerator.accumulate(*trainable):
                    batch_latents, captions, geometry = _batch(
                        scan, idx, latents, c_data, augment_rng
                    )
                    batch_latents = batch_latents.to(device)  # (B, 4, H/8, W/8), one bucket
                    text, pooled = text_for(captions)
                    noise = torch.randn(batch_latents.shape, generator=noise_gen).to(device)
                    timesteps = torch.randint(
                        0,
                        base.scheduler.config.num_train_timesteps,
                        (len(idx),),
                        generator=noise_gen,
                    ).to(device)
                    with accelerator.autocast():
                        loss = diffusion_loss(
                            base.unet,
                            base.scheduler,
                            batch_latents,
                            text,
                            noise,
                            timesteps,
                            _added_cond(base, pooled, geometry, device),
                        )
                        if prior is not None:
                            loss = loss + c_train.prior_weight * prior_loss(
                                base, prior, text_for, len(idx), prior_gen, device
                            )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and c_train.max_grad_norm > 0:
                        params = [p for g in optimizer.param_groups for p in g["params"]]
                        accelerator.clip_grad_norm_(params, c_train.max_grad_norm)
                    optimizer.step()
                    lr_schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.item() / c_train.grad_accum
            if not torch.isfinite(torch.tensor(step_loss)):
                names = ", ".join(scan.examples[i].path.name for i in idx)
                raise SdloraError(
                    f"loss became {step_loss} at step {step} (batch: {names}); "
                    "lower train.lr or use train.mixed_precision=no"
                )
            losses.append(step_loss)
            lr = lr_schedule.get_last_lr()[0]
            if step % c_train.log_every == 0 or step == c_train.steps:
                log.write(json.dumps({"step": step, "loss": step_loss, "lr": lr}) + "\n")
                writer.add_scalar("train/loss", step_loss, step)
                writer.add_scalar("train/lr", lr, step)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            bar.update(1)
            if config.sample.every and step % config.sample.every == 0 and step < c_train.steps:
                samples.append(sample(base, config, run_dir, step=step, device=device))
    bar.close()
    writer.close()
    wall = time.time() - started

    # The LoRA file first, then the last samples.
    lora = collect_lora(base, accelerator)
    metadata = export.build_metadata(
        family=base.family,
        title=c_out.name,
        rank=c_lora.rank,
        alpha=c_lora.alpha,
        trigger_words=[c_data.trigger],
        resolution=c_data.resolution,
        base_name=base.name,
        tag_frequency=tag_frequency(scan),
        training=training_metadata(config, scan, started, train_te),
    )
    export.save_kohya(lora_path, lora, base.family, metadata, dtype=c_out.dtype)
    samples.append(sample(base, config, run_dir, step=c_train.steps, device=device))

    # Did it learn the style, and only behind the trigger? (learning_report.json, ab_grid.png)
    learning = None
    if config.sample.report_images:
        style = [decode_latents(base, latents.get(e)[0].to(device))[0] for e in scan.examples]
        learning = learning_report(
            base,
            style,
            [e.caption for e in scan.examples],
            c_data.trigger,
            run_dir,
            images=config.sample.report_images,
            seed=config.sample.seed + 1000,
            steps=config.sample.steps,
            cfg=config.sample.cfg,
            size=c_data.resolution,
        )
        print(summary(learning))
    report = {
        "steps": c_train.steps,
        "wall_time_s": round(wall, 3),
        "samples_per_s": round(c_train.steps * c_train.batch_size * c_train.grad_accum / wall, 3),
        "final_loss": losses[-1],
        "lora": str(lora_path),
        "images": len(scan.examples),
        "skipped": [{"file": str(p.path), "reason": p.reason} for p in scan.skipped],
        "warnings": [{"file": str(p.path), "reason": p.reason} for p in scan.warnings],
    }
    (run_dir / "run.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return TrainResult(run_dir, lora_path, base, samples, losses, scan.skipped, learning)


def vae_scale(base: Base) -> int:
    """Pixels per latent cell: the VAE halves the size once per block after the first."""
    return 2 ** (len(base.vae.config.block_out_channels) - 1)


def check_resolution(base: Base, resolution: int) -> None:
    """Refuse a training size the VAE and the UNet's down blocks cannot divide evenly."""
    multiple = vae_scale(base) * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise SdloraError(
            f"dataset.resolution {resolution} does not suit {base.name}: it must be a multiple "
            f"of {multiple} (64 for Stable Diffusion checkpoints)"
        )


def scan_dataset(c_data: DatasetConfig) -> Scan:
    """The preflight scan of `dataset.path` with the config's settings."""
    return scan_folder(
        c_data.path,
        c_data.trigger,
        resolution=c_data.resolution,
        caption_ext=c_data.caption_ext,
        caption_template=c_data.caption_template,
        repeats=c_data.repeats,
        buckets=c_data.buckets,
        small_images=c_data.small_images,
        background=parse_colour(c_data.background),
        max_pixels=c_data.max_pixels,
    )


def _batch(scan: Scan, idx: list[int], latents: LatentCache, c_data: DatasetConfig, rng):
    """Latents (B, 4, H/8, W/8), this step's caption variants and SDXL's size conditioning."""
    rows, captions, geometry = [], [], []
    for i in idx:
        example = scan.examples[i]
        flip = c_data.flip and rng.random() < 0.5
        latent, crop = latents.get(example, flip, c_data.crop, rng)
        rows.append(latent)
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
    return torch.cat(rows), captions, geometry


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def encode_text(
    base: Base, captions: list[str], device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning (B, 77, width) and, for SDXL, pooled embeddings (B, width_2)."""
    ids = tokenize(base.tokenizer, captions).to(device)
    if base.family != "sdxl":
        return base.text_encoder(ids)[0], None
    ids_2 = tokenize(base.tokenizer_2, captions).to(device)
    # SDXL conditions on both encoders' penultimate layers, side by side.
    out_1 = base.text_encoder(ids, output_hidden_states=True)
    out_2 = base.text_encoder_2(ids_2, output_hidden_states=True)
    text = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return text, out_2.text_embeds


def _added_cond(base: Base, pooled, geometry: list[tuple], device) -> dict | None:
    if base.family != "sdxl":
        return None
    # time ids per image: original (h, w), crop (top, left), target (h, w) = its bucket.
    ids = torch.tensor(geometry, dtype=pooled.dtype)
    return {"text_embeds": pooled, "time_ids": ids.to(device)}


def collect_lora(base: Base, accelerator: Accelerator) -> Lora:
    """The trained adapters of every component in the canonical form."""
    components = {"unet": extract_lora(accelerator.unwrap_model(base.unet))}
    for name, encoder in base.text_encoders.items():
        modules = extract_lora(accelerator.unwrap_model(encoder))
        if modules:
            components[name] = modules
    return Lora(components=components, family=base.family)


def sample(base: Base, config: Config, run_dir: Path, step: int, device) -> Path:
    """Render the sample prompts (same seeds every time) into samples/step_NNNNNN.png."""
    prompts = [p.format(trigger=config.dataset.trigger) for p in config.sample.prompts]
    pipe = base.pipeline(DDIMScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    modules = (base.unet, *base.text_encoders.values())
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    images = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(config.sample.seed + i)
            images += pipe(
                prompt,
                num_inference_steps=config.sample.steps,
                guidance_scale=config.sample.cfg,
                height=config.dataset.resolution,
                width=config.dataset.resolution,
                generator=generator,
            ).images
    for m, training in zip(modules, was_training, strict=True):
        m.train(training)
    path = run_dir / "samples" / f"step_{step:06d}.png"
    save_grid(images, prompts, path, title=f"step {step}")
    return path


def training_metadata(config: Config, scan: Scan, started: float, train_te: bool) -> dict:
    """The training-run `ss_*` fields (without prefix), all strings."""
    t = config.train
    te_lr = (t.text_encoder_lr if t.text_encoder_lr is not None else t.lr) if train_te else 0.0
    return {
        "learning_rate": str(t.lr),
        "unet_lr": str(t.lr),
        "text_encoder_lr": str(te_lr),
        "steps": str(t.steps),
        "max_train_steps": str(t.steps),
        "epoch": str(max(1, t.steps * t.batch_size * t.grad_accum // _per_epoch(scan))),
        "optimizer": "torch.optim.AdamW",
        "lr_scheduler": t.lr_scheduler,
        "lr_warmup_steps": str(t.warmup_steps),
        "mixed_precision": t.mixed_precision,
        "seed": str(t.seed),
        "batch_size_per_device": str(t.batch_size),
        "gradient_accumulation_steps": str(t.grad_accum),
        "max_grad_norm": str(t.max_grad_norm),
        "num_train_images": str(len(scan.examples)),
        "dataset_dirs": json.dumps(folder_counts(scan)),
        "enable_bucket": str(config.dataset.buckets),
        "bucket_info": json.dumps({"buckets": scan.bucket_counts()}),
        "flip_aug": str(config.dataset.flip),
        "random_crop": str(config.dataset.crop == "random"),
        "shuffle_caption": str(config.dataset.shuffle_tags),
        "keep_tokens": str(config.dataset.keep_tokens),
        "caption_dropout_rate": str(config.dataset.caption_dropout),
        "caption_tag_dropout_rate": str(config.dataset.tag_dropout),
        "training_started_at": str(started),
        "training_finished_at": str(time.time()),
        "clip_skip": "None",
        "noise_offset": "None",
        "min_snr_gamma": "None",
        "network_train_unet_only": str(not train_te),
    }


def _tensorboard(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def _per_epoch(scan: Scan) -> int:
    return max(1, sum(e.repeats for e in scan.examples))
