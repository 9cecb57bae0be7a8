"""The learning report: did the LoRA learn the style, and only behind its trigger word?

After training, the same prompts are rendered with the same seeds four ways: by the base and by
the base with the LoRA, each with and without the trigger word. A style statistic of each set
is compared with the same statistic of the training images:

- `style_shift_with_trigger`: how far the LoRA's samples with the trigger moved from the base's
  samples (same prompts, same seeds) towards the training set, projected on the line between
  the two: 0 = like the base, 1 = like the style set (outside [0, 1]: short of the base or past
  the set).
- `drift_without_trigger`: how far the LoRA's samples *without* the trigger moved from the
  base's towards the training set, on the same line and scale: 0 = the style does not leak
  into prompts without the trigger.
- `change_without_trigger`: how far they moved in any direction (distance divided by the
  base-to-style distance). It also counts changes that are not the style, such as a different
  background colour drawn for a prompt that names none, so it is noisier than the drift.

The statistic is the palette: a colour histogram of each image (4 levels per RGB channel, 64
bins, normalised), averaged over a set. The training images are read back through the VAE,
so the base is measured against what it can draw at all. A palette shows a change of colours
(a palette style, a tint, a colour texture); it cannot show brushwork, line quality,
composition or whether the subject still follows the prompt, and on a real base a style set
whose colours resemble the base's own output gives a small, noisy axis. Read it as one
number beside the sample grids, not instead of them.

`ab_grid.png` shows the same four sets side by side for the first prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from sdlora.images import save_grid
from sdlora.lora import lora_layers
from sdlora.schedule import guidance_rescale

STATISTIC = "palette_histogram_4x4x4"
LEVELS = 4
GRID_ROWS = 4


def palette(image: Image.Image) -> np.ndarray:
    """Colour histogram of `image`: LEVELS**3 bins, summing to 1."""
    px = np.asarray(image.convert("RGB"), dtype=np.int64) * LEVELS // 256  # (H, W, 3)
    codes = (px[..., 0] * LEVELS + px[..., 1]) * LEVELS + px[..., 2]
    hist = np.bincount(codes.ravel(), minlength=LEVELS**3).astype(np.float64)
    return hist / hist.sum()


def mean_palette(images: list[Image.Image]) -> np.ndarray:
    return np.mean([palette(i) for i in images], axis=0)


def style_scores(
    base_with: np.ndarray,
    lora_with: np.ndarray,
    base_without: np.ndarray,
    lora_without: np.ndarray,
    style: np.ndarray,
) -> dict[str, float]:
    """Shift with the trigger, drift and change without it, from mean statistics (see above)."""
    axis = style - base_with
    length2 = float(axis @ axis)
    if length2 == 0:
        return {"shift": 0.0, "drift": 0.0, "change": 0.0}
    return {
        "shift": float((lora_with - base_with) @ axis) / length2,
        "drift": float((lora_without - base_without) @ axis) / length2,
        "change": float(np.linalg.norm(lora_without - base_without)) / length2**0.5,
    }


def strip_trigger(caption: str, trigger: str) -> str:
    """The caption without its trigger word (and the comma after it)."""
    words = [w.strip() for w in caption.split(",")]
    return ", ".join(w for w in words if w and w != trigger)


def report_prompts(captions: list[str], trigger: str, images: int) -> tuple[list, list]:
    """`images` prompts without the trigger (the captions' contents in turn) and with it."""
    contents = sorted({strip_trigger(c, trigger) for c in captions})
    prompts = [contents[i % len(contents)] for i in range(images)]
    return prompts, [f"{trigger}, {p}" if p else trigger for p in prompts]


def render(base, prompts: list[str], seeds: list[int], steps: int, cfg: float, size: int):
    """One image per (prompt, seed) pair, in one batch, deterministic per seed."""
    pipe = base.pipeline(DDIMScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_rescale=guidance_rescale(base.scheduler),
            guidance_scale=cfg,
            height=size,
            width=size,
            generator=generators,
        ).images


def set_adapters(base, enabled: bool) -> None:
    """Switch the LoRA layers of every component on or off (the weights stay in place)."""
    for module in (base.unet, *base.text_encoders.values()):
        if not lora_layers(module):  # e.g. a frozen text encoder: nothing to switch
            continue
        if enabled:
            module.enable_adapters()
        else:
            module.disable_adapters()


def decode_latents(base, latents: torch.Tensor) -> list[Image.Image]:
    """Images from scaled VAE latents (B, 4, h, w): the training set as the base sees it."""
    with torch.no_grad():
        z = latents.to(base.vae.dtype) / base.vae.config.scaling_factor
        pixels = base.vae.decode(z).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(p.numpy()) for p in pixels]


def learning_report(
    base,
    style_images: list[Image.Image],
    captions: list[str],
    trigger: str,
    run_dir: Path,
    images: int = 16,
    seed: int = 1000,
    steps: int = 20,
    cfg: float = 7.5,
    size: int = 512,
) -> dict:
    """Render the four sets, score them, write learning_report.json and ab_grid.png."""
    prompts, with_trigger = report_prompts(captions, trigger, images)
    seeds = [seed + i for i in range(images)]
    modules = (base.unet, *base.text_encoders.values())
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    sets = {}
    for enabled in (False, True):
        set_adapters(base, enabled)
        who = "lora" if enabled else "base"
        sets[f"{who}_with"] = render(base, with_trigger, seeds, steps, cfg, size)
        sets[f"{who}_without"] = render(base, prompts, seeds, steps, cfg, size)
    set_adapters(base, True)
    for m, training in zip(modules, was_training, strict=True):
        m.train(training)
    means = {name: mean_palette(imgs) for name, imgs in sets.items()}
    scores = style_scores(
        means["base_with"],
        means["lora_with"],
        means["base_without"],
        means["lora_without"],
        mean_palette(style_images),
    )
    report = {
        "statistic": STATISTIC,
        "style_shift_with_trigger": round(scores["shift"], 4),
        "drift_without_trigger": round(scores["drift"], 4),
        "change_without_trigger": round(scores["change"], 4),
        "trigger": trigger,
        "prompts_without_trigger": prompts,
        "prompts_with_trigger": with_trigger,
        "seeds": seeds,
        "sample_steps": steps,
        "cfg": cfg,
        "style_images": len(style_images),
        "scale": "0 = like the base model, 1 = like the training set",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "learning_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    ab_grid(sets, prompts, with_trigger, run_dir / "ab_grid.png")
    return report


def ab_grid(sets: dict, prompts: list[str], with_trigger: list[str], path: Path) -> Path:
    """Rows of: base and LoRA without the trigger, base and LoRA with it (same seed per row)."""
    cells, labels = [], []
    for i in range(min(GRID_ROWS, len(prompts))):
        for name, tag, prompt in (
            ("base_without", "base", prompts[i]),
            ("lora_without", "LoRA", prompts[i]),
            ("base_with", "base", with_trigger[i]),
            ("lora_with", "LoRA", with_trigger[i]),
        ):
            cells.append(sets[name][i])
            labels.append(f"{tag}: {prompt}")
    title = "base vs LoRA, without and with the trigger (same seed per row)"
    return save_grid(cells, labels, path, title=title, columns=4)


def summary(report: dict) -> str:
    """Two terminal lines."""
    return (
        f"learning report ({report['statistic']}, {len(report['seeds'])} images per set): "
        f"style shift with trigger {report['style_shift_with_trigger']:.2f}, "
        f"drift without trigger {report['drift_without_trigger']:.2f} "
        f"(any change: {report['change_without_trigger']:.2f})\n"
        "  (0 = like the base model, 1 = like the training set)"
    )


class StyleProbe:
    """The learning report's shift and drift on a few fixed prompts and seeds, cheap enough to
    measure at every checkpoint: the base's images are rendered once (the first call), each
    call renders the LoRA's as it is then. Call it in eval mode without gradients."""

    def __init__(
        self,
        style_images: list[Image.Image],
        captions: list[str],
        trigger: str,
        images: int,
        seed: int,
        steps: int,
        cfg: float,
        size: int,
    ):
        self.prompts, self.with_trigger = report_prompts(captions, trigger, images)
        self.seeds = [seed + i for i in range(images)]
        self.steps, self.cfg, self.size = steps, cfg, size
        self.style = mean_palette(style_images)
        self.base_means: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, base) -> dict[str, float]:
        """`style_shift_with_trigger` and `drift_without_trigger` of the LoRA as it is now."""
        if self.base_means is None:
            set_adapters(base, False)
            self.base_means = self._means(base)
            set_adapters(base, True)
        lora_with, lora_without = self._means(base)
        base_with, base_without = self.base_means
        scores = style_scores(base_with, lora_with, base_without, lora_without, self.style)
        return {
            "style_shift_with_trigger": round(scores["shift"], 4),
            "drift_without_trigger": round(scores["drift"], 4),
        }

    def _means(self, base) -> tuple[np.ndarray, np.ndarray]:
        shot = (self.seeds, self.steps, self.cfg, self.size)
        with_trigger = mean_palette(render(base, self.with_trigger, *shot))
        return with_trigger, mean_palette(render(base, self.prompts, *shot))
