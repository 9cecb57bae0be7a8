"""Looking at a run while and after it trains: sample grids and the learning report.

Evaluation must not change what is trained: everything here runs without gradients, with the
models in eval mode, and restores every global random stream it may touch, so a run with
samples gives the same LoRA as one without.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from sdlora.config import Config
from sdlora.images import save_grid
from sdlora.models import Base
from sdlora.report import decode_latents, learning_report
from sdlora.schedule import guidance_rescale
from sdlora.step import encode_text


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
