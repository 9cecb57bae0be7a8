"""Looking at a run while and after it trains: sample grids, the validation loss, the
learning report.

Evaluation must not change what is trained: everything here runs without gradients, with the
models in eval mode, and restores every global random stream it may touch, so a run with
samples and validation gives the same LoRA as one without.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from sdlora.cache import LatentCache
from sdlora.config import Config
from sdlora.export import write_atomic
from sdlora.images import save_grid
from sdlora.lora import lora_layers
from sdlora.models import Base
from sdlora.progress import (
    best_line,
    best_step,
    checkpoint_grid,
    read_checkpoints,
    save_progress_plot,
    write_checkpoints,
)
from sdlora.report import SCORE_KEYS, StyleProbe, decode_latents, learning_report
from sdlora.schedule import guidance_rescale
from sdlora.step import added_cond, diffusion_loss, encode_text
from sdlora.validation import TRAINING, ValidationImages, ValidationSet, prepare_validation


@contextmanager
def evaluating(base: Base):
    """Eval mode and no gradients for a while; random streams and train modes restored."""
    modules = (base.unet, *base.text_encoders.values())
    was_training = [m.training for m in modules]
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
        try:
            for m in modules:
                m.eval()
            with torch.no_grad():
                yield
        finally:
            for m, training in zip(modules, was_training, strict=True):
                m.train(training)
            random.setstate(py_state)
            np.random.set_state(np_state)


def prompt_arguments(base: Base, prompt: str, clip_skip: int | None, device) -> dict:
    """The pipeline's prompt arguments: the prompt itself, or with a clip skip its embeddings
    made as training makes them (diffusers' own clip_skip reads a `text_model` level that
    transformers 5 no longer has). SDXL always conditions on the penultimate layers."""
    if base.family == "sdxl" or not clip_skip or clip_skip == 1:
        return {"prompt": prompt}
    text, _ = encode_text(base, [prompt], device, clip_skip=clip_skip)
    negative, _ = encode_text(base, [""], device, clip_skip=clip_skip)
    return {"prompt_embeds": text, "negative_prompt_embeds": negative}


def sample(base: Base, config: Config, run_dir: Path, step: int) -> Path:
    """Render the sample prompts (same seeds every time) into samples/step_NNNNNN.png."""
    prompts = [p.format(trigger=config.dataset.trigger) for p in config.sample.prompts]
    pipe = base.pipeline(DDIMScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    images = []
    with evaluating(base):
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(config.sample.seed + i)
            images += pipe(
                **prompt_arguments(base, prompt, config.train.clip_skip, base.unet.device),
                num_inference_steps=config.sample.steps,
                guidance_rescale=guidance_rescale(base.scheduler),
                guidance_scale=config.sample.cfg,
                height=config.dataset.resolution,
                width=config.dataset.resolution,
                generator=generator,
            ).images
    path = run_dir / "samples" / f"step_{step:06d}.png"
    save_grid(images, prompts, path, title=f"step {step}")
    return path


def final_report(base: Base, config: Config, run_dir: Path, scan, latents, device) -> dict:
    """The learning report of the finished LoRA against the style set as the VAE returns it
    (learning_report.json, ab_grid.png)."""
    c_data, c_sample = config.dataset, config.sample
    with evaluating(base):
        style = [decode_latents(base, latents.get(e)[0].to(device))[0] for e in scan.examples]
        return learning_report(
            base,
            style,
            [e.caption for e in scan.examples],
            c_data.trigger,
            run_dir,
            images=c_sample.report_images,
            seed=c_sample.seed + 1000,
            steps=c_sample.steps,
            cfg=c_sample.cfg,
            size=c_data.resolution,
        )


def validation_loss(
    base: Base, validation: ValidationSet, clip_skip: int | None = None, autocast=nullcontext
) -> float:
    """The mean diffusion loss of the validation images at their fixed timesteps and noise.

    Plain MSE against the base's own target (no Min-SNR weighting), so the number compares
    across runs of one base. `autocast`: the training's autocast (mixed precision)."""
    device = base.unet.device
    timesteps = validation.timesteps.to(device)
    n = len(timesteps)
    total = 0.0
    with evaluating(base):
        for i, latent in enumerate(validation.latents):
            if validation.text is not None:
                hidden, pooled = validation.text[i]
            else:  # a trained text encoder: as it is now
                caption = [validation.captions[i]]
                hidden, pooled = encode_text(base, caption, device, clip_skip=clip_skip)
                hidden, pooled = hidden[0], None if pooled is None else pooled[0]
            pooled = None if pooled is None else pooled.to(device).repeat(n, 1)
            with autocast():
                loss = diffusion_loss(
                    base.unet,
                    base.scheduler,
                    latent.to(device).repeat(n, 1, 1, 1),  # (n, 4, h, w): one per timestep
                    hidden.to(device).repeat(n, 1, 1),
                    validation.noise[i].to(device).repeat(n, 1, 1, 1),
                    timesteps,
                    added_cond(base, pooled, [validation.geometry[i]] * n, device),
                )
            total += loss.item()
    return total / len(validation.latents)


class Evaluation:
    """What a run shows of itself as it trains, on the main process (with `active` false, in
    the others, it does nothing).

    Sample grids at the start, every `sample.every` steps, at each checkpoint and at the end;
    the validation loss at the start, every `train.validate_every` steps, at each checkpoint
    and at the end (log.jsonl, the trackers, run.json). Each checkpoint and the end are also
    judged: validation loss and the style probe's shift and drift go to checkpoints.json; at
    the end a rule (progress.best_step) picks the step to use, copied as `<name>-best`, and
    progress.png and checkpoints.png show the run.
    """

    def __init__(
        self,
        base: Base,
        config: Config,
        record,
        offload,
        accelerator,
        images: ValidationImages,
        latents: LatentCache,
        active: bool = True,
    ):
        self.base, self.config, self.record, self.offload = base, config, record, offload
        self.accelerator, self.latents, self.active = accelerator, latents, active
        self.run_dir = record.run_dir
        self.samples: list[Path] = []
        self.val_losses: dict[int, float] = {}
        self.pending: list[tuple[dict, int]] = []
        self.val_seconds: dict[int, float] = {}
        self.checkpoints: list[dict] = []
        self.probe: StyleProbe | None = None
        self.best: tuple[dict, str] | None = None
        if not active:
            return
        c_data, c_train = config.dataset, config.train
        if images.source != TRAINING:  # not in the training's cache: a cache of their own
            folder = Path(c_data.cache_dir) if c_data.cache_dir else None
            latents = LatentCache(
                base.vae, images.scan, latents.device, folder, enabled=c_data.cache_latents
            )
        device = latents.device
        train_te = any(lora_layers(encoder) for encoder in base.text_encoders.values())
        frozen_text = None if train_te else (
            lambda captions: encode_text(base, captions, device, clip_skip=c_train.clip_skip)
        )  # fmt: skip
        self.validation = prepare_validation(
            images,
            latents.get,
            frozen_text,
            base.scheduler.config.num_train_timesteps,
            c_train.seed,
        )

    def begin(self, start: int, weights=nullcontext) -> None:
        """Step `start` (0, or where a run resumes): what is due and not done yet (`weights`:
        as in after_step)."""
        if not self.active:
            return
        self.val_losses = dict(self.record.validation_log())
        self.checkpoints = read_checkpoints(self.run_dir / "checkpoints.json", start)
        with weights():
            if not start and self.config.sample.prompts:
                with self.offload.use():
                    self.samples.append(sample(self.base, self.config, self.run_dir, 0))
            if start and self._is_checkpoint(start) and start not in self._judged():
                self._judge_checkpoint(start)  # stopped by a signal before it was judged
            elif start not in self.val_losses:
                self.validate(start)

    def after_step(self, step: int, steps: int, weights=nullcontext) -> None:
        """What step `step` is due: samples, validation, a judged checkpoint. The last step
        is only validated (the trackers close with the loop); `finish` does the rest.
        `weights`: a context that puts the weights the run saves in place for the measuring
        (the moving average when the run keeps one), restoring the trained ones after."""
        if not self.active:
            return
        self._to_trackers()
        c_train, every = self.config.train, self.config.sample.every
        last = step == steps
        checkpoint = not last and self._is_checkpoint(step)
        draw = bool(self.config.sample.prompts and every and not step % every)
        validate = bool(c_train.validate_every and not step % c_train.validate_every)
        if not (last or checkpoint or draw or validate):
            return
        with weights():
            if last:
                self.validate(step)
                self._to_trackers()
            elif checkpoint:
                self._judge_checkpoint(step)
            else:
                if draw:
                    with self.offload.use():
                        self.samples.append(sample(self.base, self.config, self.run_dir, step))
                if validate:
                    self.validate(step)

    def finish(self, steps: int, losses: list[float]) -> list[str]:
        """The end (after the LoRA is saved): last samples, validation and judgement; the best
        step chosen and copied, progress.png, checkpoints.png, run.json completed. Returns
        the terminal's lines."""
        if not self.active:
            return []
        name = self.config.output.name
        if self.config.sample.prompts:
            self.samples.append(sample(self.base, self.config, self.run_dir, steps))
        self._judge(steps, f"{name}.safetensors")  # validated in the loop: style scores
        self.best = best_step(self.checkpoints)
        eligible = [e for e in self.checkpoints if e.get("lora")]
        lines, best_path = [], self.run_dir / f"{name}-best.safetensors"
        best_path.unlink(missing_ok=True)  # an earlier run's choice
        if self.best is not None and len(eligible) > 1:  # a choice to make
            entry, reason = self.best
            write_atomic(best_path, (self.run_dir / entry["lora"]).read_bytes())
            lines.append(best_line(entry, reason, self.checkpoints))
        best = self.best[0]["step"] if self.best else None
        save_progress_plot(losses, sorted(self.val_losses.items()), self.checkpoints, best,
                           self.run_dir / "progress.png")  # fmt: skip
        if len(self.checkpoints) > 1:  # checkpoints before the end: their samples side by side
            shown = [0] + [e["step"] for e in self.checkpoints]
            grids = [self.run_dir / "samples" / f"step_{s:06d}.png" for s in shown]
            title = f"samples at step 0 and each checkpoint (best: step {best})"
            checkpoint_grid(grids, self.run_dir / "checkpoints.png", title)
        self.record.add_to_report({
            "validation": self.summary(),
            "checkpoints": self.checkpoints,
            "best_step": self.best and {"step": best, "why": self.best[1], "copied": bool(lines)},
        })  # fmt: skip
        return lines

    def validate(self, step: int) -> float:
        """The validation loss now, as of `step`, into log.jsonl (and soon the trackers)."""
        started = time.time()
        loss = validation_loss(
            self.base, self.validation, self.config.train.clip_skip, self.accelerator.autocast
        )
        self.val_losses[step], self.val_seconds[step] = loss, time.time() - started
        self.record.log_validation(step, loss, self.validation.source)
        self.pending.append(({"val/loss": loss}, step))
        return loss

    def _to_trackers(self) -> None:
        """Logged values the trackers have not seen: they are open only during the loop."""
        for values, step in self.pending:
            self.accelerator.log(values, step)
        self.pending = []

    def summary(self) -> dict:
        """The validation part of run.json."""
        v = self.validation
        return {
            "images": v.source,
            "count": len(v.latents),
            "note": v.note,
            "timesteps": v.timesteps.tolist(),
            "losses": [{"step": s, "val_loss": x} for s, x in sorted(self.val_losses.items())],
        }

    def _is_checkpoint(self, step: int) -> bool:
        every = self.config.train.save_every
        return bool(every) and not step % every

    def _judged(self) -> set[int]:
        return {e["step"] for e in self.checkpoints}

    def _judge_checkpoint(self, step: int) -> None:
        c_out = self.config.output
        lora = f"{c_out.name}-step{step:06d}.safetensors" if c_out.step_loras else None
        with self.offload.use():
            if self.config.sample.prompts:
                self.samples.append(sample(self.base, self.config, self.run_dir, step))
            self._judge(step, lora)

    def _judge(self, step: int, lora: str | None) -> None:
        """Validation loss and style scores of the LoRA as it is at `step`, into
        checkpoints.json and the trackers."""
        val_loss = self.val_losses.get(step)
        if val_loss is None:
            val_loss = self.validate(step)
        started = time.time()
        scores = dict.fromkeys(SCORE_KEYS)
        images = min(self.config.sample.checkpoint_images, self.config.sample.report_images)
        if images:
            with evaluating(self.base):
                scores = self._probe(images)(self.base)
        entry = {"step": step, "val_loss": val_loss, **scores, "lora": lora}
        entry["eval_s"] = round(time.time() - started + self.val_seconds.get(step, 0.0), 3)
        self.checkpoints = [e for e in self.checkpoints if e["step"] != step] + [entry]
        write_checkpoints(self.run_dir / "checkpoints.json", self.checkpoints)

    def _probe(self, images: int) -> StyleProbe:
        """The style probe, made at its first use: the training images as the VAE returns
        them, the first `images` prompts and seeds of the learning report."""
        if self.probe is None:
            c_data, c_sample = self.config.dataset, self.config.sample
            examples = self.latents.scan.examples
            device = self.latents.device
            style = [decode_latents(self.base, self.latents.get(e)[0].to(device))[0]
                     for e in examples]  # fmt: skip
            self.probe = StyleProbe(
                style,
                [e.caption for e in examples],
                c_data.trigger,
                images,
                seed=c_sample.seed + 1000,
                steps=c_sample.steps,
                cfg=c_sample.cfg,
                size=c_data.resolution,
            )
        return self.probe
