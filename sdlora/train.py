"""The training loop: a frozen base, LoRA layers on its attention, a diffusion loss.

`train()` reads top to bottom: data, base, adapters, latent cache, optimizer, loop, save.
The per-step maths is `diffusion_loss()`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from tqdm.auto import tqdm

from sdlora import export
from sdlora.buckets import bucket_batches
from sdlora.cache import LatentCache, TextCache
from sdlora.captions import augment_caption
from sdlora.checkpoint import (
    Interrupted,
    Rngs,
    StopOnSignal,
    check_finite,
    find_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from sdlora.config import Config, DatasetConfig, config_to_toml, load_config
from sdlora.dataset import (
    Problem,
    Scan,
    epoch_plan,
    folder_counts,
    scan_folder,
    steps_per_epoch,
    summarise_problems,
    tag_frequency,
)
from sdlora.decode import parse_colour
from sdlora.errors import SdloraError
from sdlora.guard import check_compatible
from sdlora.images import save_grid, save_loss_curve
from sdlora.lora import (
    ADAPTER,
    TEXT_ENCODER_ATTENTION,
    UNET_TARGET_PRESETS,
    Lora,
    extract_lora,
    inject_lora,
    lora_layers,
    resolve_path,
)
from sdlora.lorafile import read_lora
from sdlora.models import Base, load_base
from sdlora.prior import PriorSet, generate_prior
from sdlora.report import decode_latents, learning_report, set_adapters, summary
from sdlora.runtime import (
    OPTIMIZER_NAMES,
    Offload,
    PeakMemory,
    cast_frozen,
    configure_memory,
    make_accelerator,
    make_optimizer,
    out_of_memory_advice,
    ranks_agree,
    take_batch,
    training_autocast,
)


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
    is_main: bool = True
    """False in the other processes of a multi-process run (they write nothing)."""


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,  # (B, 4, H/8, W/8), already scaled
    text: torch.Tensor,  # (B, 77, cross_attention_dim)
    noise: torch.Tensor,  # like latents
    timesteps: torch.Tensor,  # (B,) ints in [0, num_train_timesteps)
    added_cond: dict | None = None,  # SDXL: pooled text embeddings and time ids
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and its target (ε or v).

    With `min_snr_gamma`, each sample's error is weighted by min(SNR, γ) / SNR (ε) or
    min(SNR, γ) / (SNR + 1) (v), so easy low-noise steps stop dominating (Hang et al. 2023).
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text, added_cond_kwargs=added_cond).sample
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma:
        snr = compute_snr(noise_scheduler, timesteps)
        loss = loss * snr.clamp(max=min_snr_gamma) / (snr + 1 if v_prediction else snr)
    return loss.mean()


def make_noise(shape, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise; with `offset`, plus a per-channel constant that lets the model learn
    overall brightness (offset noise)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise += offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


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
    """Train a style LoRA as `config` says; returns the paths written.

    Runs in one process, or in several under `accelerate launch` (each process takes its own
    batches; gradients are averaged; only the main process writes).
    """
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    c_data, c_lora, c_train, c_out = config.dataset, config.lora, config.train, config.output
    run_dir = Path(c_out.dir)
    lora_path = run_dir / f"{c_out.name}.safetensors"
    if lora_path.exists() and not (c_out.overwrite or c_train.resume):
        raise SdloraError(
            f"{lora_path} already exists; choose another output.dir or output.name, "
            "or set output.overwrite=true"
        )
    resume_from = find_checkpoint(run_dir, c_train.resume) if c_train.resume else None

    # Devices, precision and processes.
    if c_train.device == "cuda" and not torch.cuda.is_available():
        raise SdloraError("train.device is cuda but no CUDA device is available; use cpu or auto")
    if c_train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SdloraError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    accelerator = make_accelerator(c_train.mixed_precision, cpu=c_train.device == "cpu")
    device, main = accelerator.device, accelerator.is_main_process
    say = print if main else _quiet

    # Data first: every file decoded, a bad folder fails before any model loads.
    scan = scan_dataset(c_data)
    scan.require_examples()
    steps = total_steps(scan, c_train)
    say(f"sdlora: {scan.root}: {len(scan.examples)} usable images, {len(scan.skipped)} skipped")
    for line in summarise_problems(scan):
        say(f"  {line}")
    say(f"  {epoch_plan(scan, steps, c_train.batch_size, c_train.grad_accum)}")
    say(f"  buckets: {', '.join(f'{b} ({n})' for b, n in scan.bucket_counts().items())}")

    # The frozen base, with LoRA layers on its attention.
    train_te = c_lora.text_encoder and c_train.te_lr > 0
    base, weight_dtype = base_with_lora(config, train_te, device)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config_to_toml(config), encoding="utf-8")
    say(
        f"sdlora: training {base.family} LoRA on {len(scan.examples)} images -> {run_dir} "
        f"(frozen weights in {str(weight_dtype).removeprefix('torch.')})"
    )

    # Frozen models' outputs are computed once: latents per image and flip, text per caption.
    cache_dir = Path(c_data.cache_dir) if c_data.cache_dir else None
    latents = LatentCache(base.vae, scan, device, cache_dir, enabled=c_data.cache_latents)
    if c_data.crop == "center":
        latents.fill(scan.examples, (False, True) if c_data.flip else (False,))
    text_for = TextCache(lambda captions: encode_text(base, captions, device), not train_te)

    # Prior preservation: the base's own images for the captions without the trigger.
    prior = draw_prior(base, config, scan) if c_train.prior_images else None
    if prior is not None:
        say(f"  prior preservation: {len(prior.captions)} images drawn by the base")

    # Frozen modules whose every output is cached wait elsewhere during the loop: in host
    # memory on a GPU, on disk on the CPU (in the run folder, which only the main process has).
    parked = []
    if device.type == "cuda" or main:
        parked = cached_out(base, scan, c_data, train_te, prior, text_for)
    offload = Offload(parked, device, run_dir)
    offload.park()

    # Optimizer, learning-rate schedule, random streams; a resumed run restores all of them.
    params = {
        name: dict(_named_lora_parameters(model))
        for name, model in {"unet": base.unet, **base.text_encoders}.items()
        if name == "unet" or train_te
    }
    groups = param_groups(params, c_train)
    optimizer = make_optimizer(c_train.optimizer, groups, c_train.weight_decay)
    lr_schedule = get_scheduler(
        c_train.lr_scheduler,
        optimizer,
        num_warmup_steps=c_train.warmup_steps,
        num_training_steps=steps,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=c_train.mixed_precision == "fp16")
    rngs = Rngs.seeded(c_train.seed, accelerator.process_index)
    start = 0
    if resume_from is not None:
        start = restore_checkpoint(
            resume_from, base.family, params, optimizer, lr_schedule, scaler, rngs
        )
        say(f"  resumed from {resume_from} at step {start}")
    flat_params = {f"{c}.{n}": p for c, ps in params.items() for n, p in ps.items()}
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    # Batches: one order for all processes; each process takes every n-th batch.
    order = bucket_batches(
        [e.bucket for e in scan.examples],
        [e.repeats for e in scan.examples],
        c_train.batch_size,
        torch.Generator().manual_seed(c_train.seed),
    )
    for _ in range(start * c_train.grad_accum * accelerator.num_processes):
        next(order)  # a resumed run continues the same sequence of batches

    # Sampling, logs, the loop.
    samples = []
    sampling = main and bool(config.sample.prompts)  # no prompts: no sample grids
    if sampling and not start:
        with offload.use():
            samples.append(sample(base, config, run_dir, step=0, device=device))
    writer = _tensorboard(run_dir / "logs") if main else None
    log_path = run_dir / "log.jsonl"
    if main:
        _truncate_log(log_path, start)
    losses = [json.loads(line)["loss"] for line in _read_lines(log_path)] if main else []
    peak = PeakMemory(device)
    started = time.time()

    def write_lora(path: Path, at_step: int) -> None:
        """The LoRA as trained up to `at_step`, in the file sd-scripts writes."""
        metadata = export.build_metadata(
            family=base.family,
            title=c_out.name,
            rank=c_lora.rank,
            alpha=c_lora.alpha,
            trigger_words=[c_data.trigger],
            resolution=c_data.resolution,
            base_name=base.name,
            tag_frequency=tag_frequency(scan),
            training=training_metadata(config, scan, started, train_te, steps, at_step),
        )
        export.save_kohya(path, collect_lora(base), base.family, metadata, dtype=c_out.dtype)

    bar = tqdm(
        total=steps, initial=start, desc="train", unit="step", disable=not (progress and main)
    )
    lora_models = [base.unet, *(base.text_encoders.values() if train_te else ())]
    base.unet.train()
    for encoder in base.text_encoders.values():
        encoder.train(train_te)
    saved = None
    with StopOnSignal() as stop:
        for step in range(start + 1, steps + 1):
            step_loss, names = 0.0, []
            for _ in range(c_train.grad_accum):
                idx = take_batch(order, accelerator)
                batch_latents, captions, geometry = _batch(scan, idx, latents, c_data, rngs.augment)
                batch_latents = batch_latents.to(device)  # (B, 4, H/8, W/8), one bucket
                names += [scan.examples[i].path.name for i in idx]
                text, pooled = text_for(captions)
                noise = make_noise(batch_latents.shape, rngs.noise, c_train.noise_offset)
                timesteps = torch.randint(
                    0, base.scheduler.config.num_train_timesteps, (len(idx),), generator=rngs.noise
                )
                with training_autocast(accelerator, lora_models), out_of_memory_advice(step):
                    loss = diffusion_loss(
                        base.unet,
                        base.scheduler,
                        batch_latents,
                        text,
                        noise.to(device),
                        timesteps.to(device),
                        _added_cond(base, pooled, geometry, device),
                        min_snr_gamma=c_train.min_snr_gamma,
                    )
                    if prior is not None:
                        loss = loss + c_train.prior_weight * prior_loss(
                            base, prior, text_for, len(idx), rngs.prior, device
                        )
                    scaler.scale(loss / c_train.grad_accum).backward()
                step_loss += loss.item() / c_train.grad_accum
            if not math.isfinite(step_loss):
                raise SdloraError(
                    f"loss became {step_loss} at step {step} (batch: {', '.join(names)}); "
                    "nothing was saved from this step. Lower train.lr or use "
                    "train.mixed_precision=no, then resume from the last checkpoint"
                )

            # One optimizer step on gradients averaged over processes.
            grad_norm = apply_gradients(
                optimizer, scaler, lr_schedule, trainable, accelerator, c_train.max_grad_norm
            )

            step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), "mean").item()
            losses.append(step_loss)
            lr = lr_schedule.get_last_lr()[0]
            if main and (step % c_train.log_every == 0 or step == steps):
                log_step(log_path, writer, step, step_loss, lr, grad_norm)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            bar.update(1)
            should_save = c_train.save_every and step % c_train.save_every == 0
            if main and (should_save or stop.signum is not None):
                check_finite(flat_params, step)
                state = {
                    "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_schedule.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rngs": rngs.state(),
                    "family": base.family,
                }
                saved = save_checkpoint(run_dir, step, flat_params, state, c_train.keep_last)
                if c_out.step_loras:
                    write_lora(run_dir / f"{c_out.name}-step{step:06d}.safetensors", step)
            if stop.signum is not None:
                accelerator.wait_for_everyone()
                raise Interrupted(
                    f"stopped by signal {stop.signum} after step {step}; checkpoint {saved}. "
                    f"Resume with: sdlora train {run_dir / 'config.toml'} train.resume=latest",
                    stop.signum,
                )
            if (
                sampling
                and config.sample.every
                and step % config.sample.every == 0
                and step < steps
            ):
                with offload.use():
                    samples.append(sample(base, config, run_dir, step=step, device=device))
    bar.close()
    wall, peak_mb = time.time() - started, peak.megabytes()  # the loop's, before the last samples
    agree = ranks_agree(flat_params, accelerator)

    # The LoRA file first, then the last samples and the report (main process only).
    check_finite(flat_params, steps)
    learning = None
    if main:
        writer.close()
        write_lora(lora_path, steps)
        offload.close()  # the rest of the run only samples
        if sampling:
            samples.append(sample(base, config, run_dir, step=steps, device=device))
        save_loss_curve(losses, run_dir / "loss.png")

        # Did it learn the style, and only behind the trigger? (learning_report.json, ab_grid.png)
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
            say(summary(learning))
        per_step = c_train.batch_size * c_train.grad_accum * accelerator.num_processes
        report = {
            "steps": steps,
            "resumed_at": start,
            "wall_time_s": round(wall, 3),
            "samples_per_s": round((steps - start) * per_step / wall, 3),
            "peak_memory_mb": peak_mb,
            "processes": accelerator.num_processes,
            "ranks_agree": agree,
            "final_loss": losses[-1],
            "lora": str(lora_path),
            **scan_summary(scan),
        }
        (run_dir / "run.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, lora_path, base, samples, losses, scan.skipped, learning, main)


def draw_prior(base: Base, config: Config, scan: Scan) -> PriorSet:
    """`train.prior_images` images drawn by the base itself (adapters off) for the training
    captions without the trigger."""
    set_adapters(base, False)
    prior = generate_prior(
        base,
        [e.caption for e in scan.examples],
        config.dataset.trigger,
        config.train.prior_images,
        seed=config.train.seed,
        steps=config.sample.steps,
        cfg=config.sample.cfg,
        size=config.dataset.resolution,
    )
    set_adapters(base, True)
    return prior


def cached_out(
    base: Base, scan: Scan, c_data: DatasetConfig, train_te: bool, prior, text_for: TextCache
) -> list[torch.nn.Module]:
    """The frozen modules the loop will not call: the VAE when every latent is cached (centre
    crops), the frozen text encoders when every caption the loop can draw (no tag shuffling
    or dropout) is cached, which is done here."""
    modules = []
    if c_data.cache_latents and c_data.crop == "center":
        modules.append(base.vae)
    if not train_te and not c_data.shuffle_tags and not c_data.tag_dropout:
        captions = fixed_captions(scan, c_data, prior)
        for i in range(0, len(captions), 16):
            text_for(captions[i : i + 16])
        modules += list(base.text_encoders.values())
    return modules


def param_groups(params: dict[str, dict[str, torch.Tensor]], c_train) -> list[dict]:
    """Optimizer groups: the UNet's LoRA at `train.lr`, the text encoders' (when trained) at
    `train.text_encoder_lr` (default `train.lr`)."""
    groups = [{"params": list(params["unet"].values()), "lr": c_train.lr}]
    te_params = [p for name, ps in params.items() if name != "unet" for p in ps.values()]
    if te_params:
        groups.append({"params": te_params, "lr": c_train.te_lr})
    return groups


def log_step(log_path: Path, writer, step: int, loss: float, lr: float, grad_norm: float):
    """One line of log.jsonl and the step's TensorBoard scalars."""
    with log_path.open("a", encoding="utf-8") as log:
        log.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
    writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/grad_norm", grad_norm, step)


def base_with_lora(config: Config, train_te: bool, device) -> tuple[Base, torch.dtype]:
    """The frozen base on `device`, its weights in the mixed-precision dtype, with float32 LoRA
    layers on the UNet's targets (and the text encoders' attention when `train_te`).
    Returns it and the dtype of its frozen weights."""
    c_lora, c_train = config.lora, config.train
    base = load_base(
        config.model.base,
        config.model.family,
        seed=c_train.seed,
        config_dir=config.model.config_dir,
        allow_pickle=config.model.allow_pickle,
    )
    weight_dtype = cast_frozen(base, c_train.mixed_precision)
    torch.manual_seed(c_train.seed)  # the LoRA's initial down matrices
    inject_lora(base.unet, c_lora.rank, c_lora.alpha, UNET_TARGET_PRESETS[c_lora.unet_targets])
    for encoder in base.text_encoders.values():
        if train_te:
            inject_lora(encoder, c_lora.rank, c_lora.alpha, TEXT_ENCODER_ATTENTION)
        else:
            encoder.requires_grad_(False)
    base.vae.requires_grad_(False)
    cast_training_params([base.unet, *base.text_encoders.values()], dtype=torch.float32)
    if c_lora.init_from:
        start_from_lora(base, Path(c_lora.init_from), c_lora.alpha)
    for module in (base.unet, base.vae, *base.text_encoders.values()):
        module.to(device)
    check_resolution(base, config.dataset.resolution)
    configure_memory(base, c_train, device)
    return base, weight_dtype


def apply_gradients(optimizer, scaler, lr_schedule, trainable, accelerator, max_grad_norm) -> float:
    """One optimizer step on the gradients averaged over processes, clipped to
    `max_grad_norm` (0: not clipped); returns their norm before clipping."""
    scaler.unscale_(optimizer)
    if accelerator.num_processes > 1:
        for p in trainable:
            p.grad = accelerator.reduce(p.grad, reduction="mean")
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, limit).item()
    scaler.step(optimizer)
    scaler.update()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def scan_summary(scan: Scan) -> dict:
    """The dataset part of run.json: images used, and the files skipped or warned about."""
    return {
        "images": len(scan.examples),
        "skipped": [{"file": str(p.path), "reason": p.reason} for p in scan.skipped],
        "warnings": [{"file": str(p.path), "reason": p.reason} for p in scan.warnings],
    }


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


def fixed_captions(scan: Scan, c_data: DatasetConfig, prior: PriorSet | None) -> list[str]:
    """Every caption a run without tag shuffling or tag dropout can show the text encoder."""
    captions = [augment_caption(e.caption, None, c_data.keep_tokens) for e in scan.examples]
    if c_data.caption_dropout:
        captions.append("")
    return captions + (prior.captions if prior is not None else [])


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


def collect_lora(base: Base) -> Lora:
    """The trained adapters of every component in the canonical form."""
    components = {"unet": extract_lora(base.unet)}
    for name, encoder in base.text_encoders.items():
        modules = extract_lora(encoder)
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


def training_metadata(
    config: Config, scan: Scan, started: float, train_te: bool, steps: int, at_step: int
) -> dict:
    """The training-run `ss_*` fields (without prefix), all strings, for the LoRA as it is
    after `at_step` of `steps`."""
    t = config.train
    te_lr = t.te_lr if train_te else 0.0
    return {
        "learning_rate": str(t.lr),
        "unet_lr": str(t.lr),
        "text_encoder_lr": str(te_lr),
        "steps": str(at_step),
        "max_train_steps": str(steps),
        "epoch": str(-(-at_step // steps_per_epoch(scan, t.batch_size, t.grad_accum))),
        "optimizer": OPTIMIZER_NAMES[t.optimizer],
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
        "noise_offset": str(t.noise_offset) if t.noise_offset else "None",
        "min_snr_gamma": str(t.min_snr_gamma),
        "network_train_unet_only": str(not train_te),
    }


def _tensorboard(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def total_steps(scan: Scan, c_train) -> int:
    """`train.steps`, or `train.epochs` passes over the (repeated) images."""
    if c_train.epochs is None:
        return c_train.steps
    return c_train.epochs * steps_per_epoch(scan, c_train.batch_size, c_train.grad_accum)


def start_from_lora(base: Base, path: Path, alpha: float) -> None:
    """Load an existing LoRA into the freshly injected adapters (after the version guard)."""
    lora = read_lora(path)
    check_compatible(base, lora, path.name)
    for component, modules in lora.components.items():
        model = {"unet": base.unet, **base.text_encoders}[component]
        layers = lora_layers(model)
        names = set(layers)
        for module_path, module in modules.items():
            try:
                layer = layers[resolve_path(names, module_path)]
            except KeyError:
                raise SdloraError(
                    f"lora.init_from {path.name} adapts {component}:{module_path}, which this "
                    "run does not train; match lora.unet_targets and lora.text_encoder to it"
                ) from None
            if module.rank != layer.r[ADAPTER]:
                raise SdloraError(
                    f"lora.init_from {path.name} has rank {module.rank}; set lora.rank to match"
                )
            with torch.no_grad():
                down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                down.copy_(module.down.reshape(down.shape))
                # The update stays the file's own: its alpha may differ from lora.alpha.
                up.copy_(module.up.reshape(up.shape) * (module.alpha / alpha))


def _named_lora_parameters(model: torch.nn.Module):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log's lines up to `step` (all of a fresh run's are dropped)."""
    kept = [line for line in _read_lines(path) if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _quiet(*args, **kwargs) -> None:
    """`print` for the processes that are not the main one."""
