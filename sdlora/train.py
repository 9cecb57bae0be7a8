"""The training recipe: a frozen base, LoRA layers on its attention, a diffusion loss.

`train()` reads top to bottom as setup -> loop -> finish. What one step does is `step.py`,
what a run shows of itself (samples, validation loss, checkpoints judged, the learning report)
is `evaluate.py` (which images validate: `validation.py`; the best step: `progress.py`), what a
checkpoint holds is `checkpoint.py` and what the run folder records is `record.py`.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from sdlora.buckets import bucket_batches
from sdlora.bundle import write_bundle
from sdlora.cache import LatentCache, TextCache, text_fingerprint
from sdlora.captions import augment_caption
from sdlora.checkpoint import (
    Interrupted,
    Rngs,
    StopOnSignal,
    check_finite,
    find_checkpoint,
    restore_checkpoint,
    training_state,
)
from sdlora.config import Config, DatasetConfig
from sdlora.configfile import load_config
from sdlora.dataset import Scan, scan_folder
from sdlora.decode import parse_colour
from sdlora.ema import LoraEma, make_ema
from sdlora.epochs import epoch_plan, steps_per_epoch
from sdlora.errors import SdloraError
from sdlora.evaluate import Evaluation, final_report
from sdlora.folders import Problem
from sdlora.guard import check_compatible
from sdlora.images import save_loss_curve
from sdlora.lora import (
    ADAPTER,
    TEXT_ENCODER_ATTENTION,
    UNET_TARGET_PRESETS,
    Lora,
    copy_lycoris,
    extract_lora,
    inject_lora,
    layer_algo,
    lora_layers,
    resolve_path,
)
from sdlora.lorafile import read_lora
from sdlora.models import Base, load_base
from sdlora.preflight import summarise_problems
from sdlora.prior import PriorSet, draw_prior
from sdlora.record import RunRecord, tidy_run_dir
from sdlora.report import summary
from sdlora.runtime import (
    Offload,
    PeakMemory,
    cast_frozen,
    configure_memory,
    make_accelerator,
    make_optimizer,
    prepare_model,
    ranks_agree,
    take_batch,
    trackers,
)
from sdlora.schedule import schedule_metadata
from sdlora.step import Stepper, assemble_batch, encode_text, vae_scale
from sdlora.validation import ValidationImages, choose_validation


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


def train(
    config: Config | str | Path, overrides: tuple[str, ...] = (), progress: bool = True
) -> TrainResult:
    """Train a style LoRA as `config` says; returns the paths written.

    Runs in one process, or in several under `accelerate launch` (data parallel: each process
    takes its own batches, accelerate averages the gradients; only the main process writes).
    """
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    c_data, c_train, c_out = config.dataset, config.train, config.output
    run_dir = Path(c_out.dir)
    lora_path = run_dir / f"{c_out.name}.safetensors"
    check_new_lora(lora_path, allowed=c_out.overwrite or bool(c_train.resume))
    resume_from = find_checkpoint(run_dir, c_train.resume) if c_train.resume else None

    # Devices, precision and processes; only the main process prints and writes.
    accelerator = make_accelerator(
        c_train.mixed_precision, c_train.device, run_dir, c_train.log_with
    )
    device, main = accelerator.device, accelerator.is_main_process
    processes = accelerator.num_processes
    say = print if main else _quiet
    for line in tidy_run_dir(run_dir, c_out.name, c_out.overwrite, bool(c_train.resume), main):
        say(line)

    # Data first: every file decoded, a bad folder fails before any model loads.
    scan = scan_dataset(c_data)
    scan.require_examples()
    scan, held_out = split_validation(scan, c_data, c_train.seed)
    steps = total_steps(scan, c_train, processes)
    for line in preflight_lines(scan, steps, c_train, processes, held_out):
        say(line)

    # The frozen base with LoRA layers; the trained models as accelerate wraps them.
    train_te = config.lora.text_encoder and c_train.te_lr > 0
    base, weight_dtype = base_with_lora(config, train_te, device)
    trained = {"unet": base.unet, **(base.text_encoders if train_te else {})}
    wrapped = {name: prepare_model(accelerator, model) for name, model in trained.items()}
    record = RunRecord(run_dir, config, scan, train_te, processes, base.name)
    if main:
        record.write_config()
    dtype = str(weight_dtype).removeprefix("torch.")
    say(f"sdlora: training {base.family} LoRA on {len(scan.examples)} images -> {run_dir} "
        f"(frozen weights in {dtype})")  # fmt: skip

    # Frozen models' outputs are computed once: latents per image and flip, text per caption.
    cache_dir = Path(c_data.cache_dir) if c_data.cache_dir else None
    latents = LatentCache(base.vae, scan, device, cache_dir, enabled=c_data.cache_latents)
    if c_data.crop == "center":
        latents.fill(scan.examples, (False, True) if c_data.flip else (False,))
    encoders = {name: model for name, model in wrapped.items() if name != "unet"}
    text_for = TextCache(
        lambda captions: encode_text(base, captions, device, encoders, c_train.clip_skip),
        not train_te,
        cache_dir=cache_dir,
        fingerprint=text_fingerprint(base, c_train.clip_skip) if cache_dir else None,
        device=device,
    )

    # Prior preservation: the base's own images for the captions without the trigger.
    prior = None
    if c_train.prior_images:  # the base's text conditioning: its own encoders, adapters off
        encode = partial(encode_text, base, device=device, clip_skip=c_train.clip_skip)
        prior = draw_prior(base, config, scan.examples, encode)
    if prior is not None:
        say(f"  prior preservation: {len(prior.captions)} images drawn by the base")

    # Frozen modules whose every output is cached wait elsewhere during the loop: in host
    # memory on a GPU, on disk on the CPU (in the run folder, which only the main process has).
    parked = []
    if device.type == "cuda" or main:
        parked = cached_out(base, scan, c_data, train_te, prior, text_for)
    offload = Offload(parked, device, run_dir)
    judge = Evaluation(base, config, record, offload, accelerator, held_out, latents, main)
    offload.park()

    # Optimizer, learning-rate schedule, random streams; a resumed run restores all of them.
    params = {name: dict(_named_lora_parameters(model)) for name, model in trained.items()}
    optimizer, lr_schedule = optimization(params, c_train, steps)
    rngs = Rngs.seeded(c_train.seed, accelerator.process_index)
    start, scaler = 0, accelerator.scaler
    if resume_from is not None:
        start = restore_checkpoint(
            resume_from, base.family, params, optimizer, lr_schedule, scaler, rngs
        )
        say(f"  resumed from {resume_from} at step {start}")
    optimizer = accelerator.prepare(optimizer)  # the schedule counts optimizer steps: not wrapped
    flat_params = {f"{c}.{n}": p for c, ps in params.items() for n, p in ps.items()}
    ema = make_ema(flat_params, c_train.ema_decay, resume_from)  # saved as the LoRA when on
    stepper = Stepper(base, accelerator, wrapped, text_for, prior, rngs, c_train, ema)

    # Batches: one order for all processes; each process takes every n-th batch.
    order = batch_order(scan, c_train, skip=start * c_train.grad_accum * processes)

    losses = record.resume_log(start) if main else []
    # What the judge measures: the weights the run saves (the moving average when it keeps one).
    saved_weights = ema.applied if ema is not None else nullcontext
    judge.begin(start, saved_weights)  # samples (no prompts: none) and validation at the start
    peak, started = PeakMemory(device), time.time()

    # The loop: a step on every process; logs, checkpoints and samples on the main one.
    bar = tqdm(total=steps, initial=start, unit="step", disable=not (progress and main))
    saved = None
    with StopOnSignal() as stop, trackers(accelerator):
        for step in range(start + 1, steps + 1):
            batches = [
                assemble_batch(scan, take_batch(order, accelerator), latents, c_data, rngs.augment)
                for _ in range(c_train.grad_accum)
            ]
            loss = stepper.forward_backward(batches, step)
            grad_norm = stepper.update(optimizer, lr_schedule, list(flat_params.values()))
            loss = accelerator.reduce(torch.tensor(loss, device=device), "mean").item()
            losses.append(loss)
            if main and (step % c_train.log_every == 0 or step == steps):
                record.log_step(accelerator, step, loss, lr_schedule.get_last_lr()[0], grad_norm)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if main and ((c_train.save_every and step % c_train.save_every == 0) or stop.signum):
                state = training_state(optimizer, lr_schedule, scaler, rngs, base.family, ema)
                saved = record.checkpoint(step, steps, flat_params, state, collect_lora(base, ema))
            if stop.signum is not None:
                accelerator.wait_for_everyone()
                raise Interrupted.after(step, stop.signum, saved, run_dir)
            judge.after_step(step, steps, saved_weights)  # samples, validation, checkpoints
    bar.close()
    wall, peak_mb = time.time() - started, peak.megabytes()  # the loop's, before the last samples
    agree = ranks_agree(flat_params, accelerator)

    # The LoRA file and run.json first; then the last samples and the report.
    check_finite(flat_params, steps)
    learning = None
    if ema is not None:  # the average is the result: saved, sampled and reported
        ema.copy_to_params()
    if main:
        record.write_lora(lora_path, collect_lora(base), steps, steps)
        record.write_report(steps, start, losses, wall, peak_mb, agree, accelerator)
        offload.close()  # the rest of the run only samples
        with record.after_save(lora_path):
            for line in judge.finish(steps, losses):
                say(line)
            save_loss_curve(losses, run_dir / "loss.png")
            if config.sample.report_images:  # learned, and only behind the trigger?
                learning = final_report(base, config, run_dir, scan, latents, device)
                say(summary(learning))
            if c_out.bundle:  # ready to publish: previews, model card, civitai.json
                say(f"bundle:  {write_bundle(run_dir, overwrite=True, device=c_train.device)}")
    accelerator.wait_for_everyone()
    return TrainResult(
        run_dir, lora_path, base, judge.samples, losses, scan.skipped, learning, main
    )


def check_new_lora(lora_path: Path, allowed: bool) -> None:
    """Refuse to replace an existing LoRA unless `allowed` (overwrite, or a resumed run)."""
    if lora_path.exists() and not allowed:
        raise SdloraError(
            f"{lora_path} already exists; choose another output.dir or output.name, "
            "or set output.overwrite=true"
        )


def batch_order(scan: Scan, c_train, skip: int = 0):
    """The run's endless sequence of batches (example indices, one bucket each), seeded by
    `train.seed`; `skip` batches are passed over, so a resumed run continues the sequence."""
    order = bucket_batches(
        [e.bucket for e in scan.examples],
        [e.repeats for e in scan.examples],
        c_train.batch_size,
        torch.Generator().manual_seed(c_train.seed),
    )
    for _ in range(skip):
        next(order)
    return order


def optimization(params: dict[str, dict[str, torch.Tensor]], c_train, steps: int):
    """The optimizer over the LoRA parameters and its learning-rate schedule over `steps`."""
    groups = param_groups(params, c_train)
    optimizer = make_optimizer(c_train.optimizer, groups, c_train.weight_decay)
    schedule = get_scheduler(
        c_train.lr_scheduler,
        optimizer,
        num_warmup_steps=c_train.warmup_steps,
        num_training_steps=steps,
    )
    return optimizer, schedule


def preflight_lines(
    scan: Scan, steps: int, c_train, processes: int, held_out: ValidationImages | None = None
) -> list[str]:
    """What the run prints about its data before any model loads."""
    buckets = ", ".join(f"{b} ({n})" for b, n in scan.bucket_counts().items())
    return [
        f"sdlora: {scan.root}: {len(scan.examples)} usable images, {len(scan.skipped)} skipped",
        *(f"  {line}" for line in summarise_problems(scan)),
        f"  {epoch_plan(scan, steps, c_train.batch_size, c_train.grad_accum, processes)}",
        f"  buckets: {buckets}",
        *([f"  {held_out.note}"] if held_out is not None else []),
    ]


def split_validation(scan: Scan, c_data: DatasetConfig, seed: int):
    """The training scan and the validation images: held out of `scan`, scanned from
    `dataset.validation_path` with the dataset's settings, or the training images."""
    folder = None
    if c_data.validation_path:
        folder = scan_dataset(dataclasses.replace(c_data, path=c_data.validation_path,
                                                  validation_path=""))  # fmt: skip
    return choose_validation(scan, c_data.validation_split, seed, folder)


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
        follow_external_links=c_data.follow_external_links,
    )


def total_steps(scan: Scan, c_train, processes: int = 1) -> int:
    """`train.steps`, or `train.epochs` passes over the (repeated) images by all processes."""
    if c_train.epochs is None:
        return c_train.steps
    per_epoch = steps_per_epoch(scan, c_train.batch_size, c_train.grad_accum, processes)
    return c_train.epochs * per_epoch


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
        prediction_type=config.model.prediction_type,
        zero_terminal_snr=c_train.zero_terminal_snr,
    )
    if c_train.clip_skip and c_train.clip_skip != 2 and base.family == "sdxl":
        raise SdloraError(
            f"train.clip_skip={c_train.clip_skip}: SDXL always conditions on the penultimate "
            "layers of its text encoders (clip skip 2); leave train.clip_skip unset or 2"
        )
    weight_dtype = cast_frozen(base, c_train.mixed_precision)
    torch.manual_seed(c_train.seed)  # the LoRA's initial down matrices
    targets = UNET_TARGET_PRESETS[c_lora.unet_targets]
    convs = {"conv_rank": c_lora.conv_rank, "conv_alpha": c_lora.conv_alpha}
    kind = {"dora": c_lora.dora, "algo": c_lora.algo}
    if c_lora.algo == "lokr":
        kind.update(lokr_factor=c_lora.lokr_factor, decompose_both=c_lora.lokr_decompose_both)
    inject_lora(base.unet, c_lora.rank, c_lora.alpha, targets, **convs, **kind)
    for encoder in base.text_encoders.values():
        if train_te:
            inject_lora(encoder, c_lora.rank, c_lora.alpha, TEXT_ENCODER_ATTENTION, **kind)
        else:
            encoder.requires_grad_(False)
    base.vae.requires_grad_(False)
    cast_training_params([base.unet, *base.text_encoders.values()], dtype=torch.float32)
    if c_lora.init_from:
        start_from_lora(base, Path(c_lora.init_from))
    for module in (base.unet, base.vae, *base.text_encoders.values()):
        module.to(device)
    check_resolution(base, config.dataset.resolution)
    configure_memory(base, c_train, device)
    base.unet.train()
    for encoder in base.text_encoders.values():
        encoder.train(train_te)
    return base, weight_dtype


def check_resolution(base: Base, resolution: int) -> None:
    """Refuse a training size the VAE and the UNet's down blocks cannot divide evenly."""
    multiple = vae_scale(base) * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise SdloraError(
            f"dataset.resolution {resolution} does not suit {base.name}: it must be a multiple "
            f"of {multiple} (64 for Stable Diffusion checkpoints)"
        )


def start_from_lora(base: Base, path: Path) -> None:
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
            if module.algo != "lora" or layer_algo(layer) != "lora":
                copy_lycoris(layer, module, f"lora.init_from {path.name}")
                continue
            if module.rank != layer.r[ADAPTER]:
                raise SdloraError(
                    f"lora.init_from {path.name} has rank {module.rank}; set lora.rank to match"
                )
            with torch.no_grad():
                down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                down.copy_(module.down.reshape(down.shape))
                # The update stays the file's own: its alpha may differ from lora.alpha.
                up.copy_(module.up.reshape(up.shape) * (module.alpha / layer.lora_alpha[ADAPTER]))
                if module.dora != (ADAPTER in layer.lora_magnitude_vector):
                    raise SdloraError(
                        f"lora.init_from {path.name} "
                        + ("is" if module.dora else "is not")
                        + " a DoRA file; set lora.dora to match"
                    )
                if module.dora:
                    magnitude = layer.lora_magnitude_vector[ADAPTER].weight
                    magnitude.copy_(module.extra["dora_scale"].reshape(magnitude.shape))


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


def fixed_captions(scan: Scan, c_data: DatasetConfig, prior: PriorSet | None) -> list[str]:
    """Every caption a run without tag shuffling or tag dropout can show the text encoder."""
    captions = [augment_caption(e.caption, None, c_data.keep_tokens) for e in scan.examples]
    if c_data.caption_dropout:
        captions.append("")
    return captions + (prior.captions if prior is not None else [])


def param_groups(params: dict[str, dict[str, torch.Tensor]], c_train) -> list[dict]:
    """Optimizer groups: the UNet's LoRA at `train.lr`, the text encoders' (when trained) at
    `train.text_encoder_lr` (default `train.lr`)."""
    groups = [{"params": list(params["unet"].values()), "lr": c_train.lr}]
    te_params = [p for name, ps in params.items() if name != "unet" for p in ps.values()]
    if te_params:
        groups.append({"params": te_params, "lr": c_train.te_lr})
    return groups


def collect_lora(base: Base, ema: LoraEma | None = None) -> Lora:
    """The trained adapters of every component in the canonical form (their moving average
    when `ema` is given), with the metadata of the noise schedule they were trained under."""
    with ema.applied() if ema is not None else nullcontext():
        components = {"unet": extract_lora(base.unet)}
        for name, encoder in base.text_encoders.items():
            modules = extract_lora(encoder)
            if modules:
                components[name] = modules
    return Lora(components, family=base.family, metadata=schedule_metadata(base.scheduler))


def _named_lora_parameters(model: torch.nn.Module):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _quiet(*args, **kwargs) -> None:
    """`print` for the processes that are not the main one."""
