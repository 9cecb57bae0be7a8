"""The learning report: did the LoRA learn the style, and only behind its trigger word?

After training, the same prompts are rendered with the same seeds four ways: by the base and by
the base with the LoRA, each with and without the trigger word. Two style statistics of each
set are compared with the same statistics of the training images:

- `style_shift_with_trigger`: how far the LoRA's samples with the trigger moved from the base's
  samples (same prompts, same seeds) towards the training set, projected on the line between
  the two: 0 = like the base, 1 = like the style set (outside [0, 1]: short of the base or past
  the set).
- `drift_without_trigger`: how far the LoRA's samples *without* the trigger moved from the
  base's towards the training set, on the same line and scale: 0 = the style does not leak
  into prompts without the trigger. It is the median of the per-image moves: most images
  without the trigger stay as the base drew them, and some tip into another picture (the base
  picks a background colour at random, and a small change to the model can make it pick
  another one), each a jump of about ±1.3 of either sign. The plain mean of 48 such images
  swings by up to ±0.1 from one set of seeds to the next; the median is the typical image's
  move, and it stays with the images that were kept as long as fewer than half were re-drawn
  (README: Measured on the demo). A style that leaks into most images moves the median; one
  that leaks into a few shows in the re-drawn share, and the plain mean is kept as
  `drift_mean_without_trigger`.
- `redrawn_without_trigger`: the share of images without the trigger that came out as another
  picture (changed by more than half the base-to-style distance), in any direction.
- `change_without_trigger`: how far they moved in any direction (distance divided by the
  base-to-style distance). It also counts changes that are not the style, such as a different
  background colour drawn for a prompt that names none, so it is noisier than the drift.

Each image with the LoRA is paired with the base's image of the same prompt and seed, so a
score is a mean (the drift: the median) of per-image moves; `*_se` is its standard error (the
report's own noise: what another set of seeds would change; the drift's by bootstrap). The
prompts are fixed, so it counts how each prompt's images vary from seed to seed, not how the
prompts differ from each other: on the demo some prompts barely move and the others move by
more than 1, and the error taken over all images as one sample was three to six times the
scatter of other seeds (README: The learning report).

The statistics, both averaged over a set (the training images are read back through the VAE,
so the base is measured against what it can draw at all):

- `vae_encoder_gram` (the headline numbers): Gram matrices of the base's own VAE encoder
  features after each down block (sdlora.gram), one score per block, averaged. They see
  texture and colour combinations at a few scales: bands, stripes, strokes, hatching.
- `palette_histogram_4x4x4`: a colour histogram (4 levels per RGB channel, 64 bins).

Neither shows composition or whether the subject still follows the prompt, the Gram matrices
of a VAE trained to reconstruct pixels are not a judge of taste, and on a real base whose own
pictures already look like the style set the base-to-style axis is short and the scores noisy.
Read them beside the sample grids, not instead of them.

`ab_grid.png` shows the same four sets side by side for the first prompts.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from sdlora.gram import gram_features
from sdlora.images import save_grid
from sdlora.lora import adapters_off, lora_layers
from sdlora.schedule import guidance_rescale

GRAM = "vae_encoder_gram"
PALETTE = "palette_histogram_4x4x4"
STATISTIC = GRAM
"""The statistic of the headline numbers; every statistic's are under `statistics`."""
LEVELS = 4
GRID_ROWS = 4
HEADLINE = (
    "style_shift_with_trigger",
    "drift_without_trigger",
    "redrawn_without_trigger",
    "change_without_trigger",
)
REDRAWN = 0.5
"""An image without the trigger counts as re-drawn when it changed by more than this share of
the base-to-style distance (in the demo the changes are either under 0.2 or over 1)."""
BOOTSTRAP = 500
"""Resamples for the drift's standard error."""


def palette(image: Image.Image) -> np.ndarray:
    """Colour histogram of `image`: LEVELS**3 bins, summing to 1."""
    px = np.asarray(image.convert("RGB"), dtype=np.int64) * LEVELS // 256  # (H, W, 3)
    codes = (px[..., 0] * LEVELS + px[..., 1]) * LEVELS + px[..., 2]
    hist = np.bincount(codes.ravel(), minlength=LEVELS**3).astype(np.float64)
    return hist / hist.sum()


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


def features(base, images: list[Image.Image]) -> dict[str, list[np.ndarray]]:
    """Each statistic of each image: per statistic, a list of parts (the palette: one; the
    Gram matrices: one per encoder block), each (len(images), D)."""
    return {
        GRAM: gram_features(base.vae, images),
        PALETTE: [np.stack([palette(i) for i in images])],
    }


def paired_scores(
    sets: dict[str, dict], style: dict[str, list[np.ndarray]], prompts: list[str] | None = None
) -> dict[str, dict]:
    """Per statistic: shift (mean), drift (median) and the plain mean drift,
    change and the re-drawn share, with the standard errors of shift and drift over the
    paired images, and the parts' own shift and drift. `sets`: the features of base_with,
    lora_with, base_without and lora_without (the same prompts and seeds in the same order);
    `prompts`: each image's prompt, for errors within prompts (unset: every image its own)."""
    out = {}
    for name, style_parts in style.items():
        parts, shifts, drifts, changes = [], [], [], []
        for k, target in enumerate(style_parts):
            each = {who: sets[who][name][k] for who in sets}  # (N, D) per set
            axis = target.mean(axis=0) - each["base_with"].mean(axis=0)
            length2 = float(axis @ axis) or np.inf  # no axis: no move along it
            moved = each["lora_without"] - each["base_without"]
            shifts.append((each["lora_with"] - each["base_with"]) @ axis / length2)  # (N,)
            drifts.append(moved @ axis / length2)
            changes.append(np.linalg.norm(moved, axis=1) / length2**0.5)
            parts.append({  # the mean shift is the mean sets' shift (style_scores)
                "shift": float(shifts[-1].mean()),
                "drift": float(np.median(drifts[-1])),
                "change": float(np.linalg.norm(moved.mean(axis=0))) / length2**0.5,
            })  # fmt: skip
        shift, drift = np.mean(shifts, axis=0), np.mean(drifts, axis=0)  # per image
        out[name] = {
            "style_shift_with_trigger": round(float(shift.mean()), 4),
            "drift_without_trigger": round(float(np.median(drift)), 4),
            "change_without_trigger": round(float(np.mean([p["change"] for p in parts])), 4),
            "style_shift_se": round(standard_error(shift, prompts), 4),
            "drift_se": round(bootstrap_error(drift, np.median, prompts), 4),
            "drift_mean_without_trigger": round(float(drift.mean()), 4),
            "redrawn_without_trigger": round(float((np.mean(changes, axis=0) > REDRAWN).mean()), 4),
            "parts": [
                {"shift": round(p["shift"], 4), "drift": round(p["drift"], 4)} for p in parts
            ],  # fmt: skip
        }
    return out


def strata(labels: list[str] | None, n: int) -> list[np.ndarray]:
    """The indices of each label's values (no labels: one stratum of all n)."""
    if labels is None:
        return [np.arange(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} values")
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return [np.array(g) for g in groups.values()]


def standard_error(values: np.ndarray, labels: list[str] | None = None) -> float:
    """The standard error of the mean of `values` when each label's values are drawn anew and
    the labels stay (the report's prompts): the spread within labels, pooled. Without labels,
    the plain one. 0 when no label has two values."""
    groups = strata(labels, len(values))
    free = len(values) - len(groups)
    if free < 1:
        return 0.0
    within = sum(float(((values[g] - values[g].mean()) ** 2).sum()) for g in groups) / free
    return (within / len(values)) ** 0.5


def bootstrap_error(
    values: np.ndarray, estimate, labels: list[str] | None = None, draws: int = BOOTSTRAP
) -> float:
    """The standard error of `estimate(values)` from `draws` resamples of `values`, each
    label's values resampled among themselves (a fixed seed: the same values give the same
    error). 0 when no label has two values."""
    groups = strata(labels, len(values))
    if len(values) - len(groups) < 1:
        return 0.0
    rng = np.random.default_rng(0)
    picks = np.concatenate([rng.choice(g, size=(draws, len(g))) for g in groups], axis=1)
    return float(np.std([estimate(values[p]) for p in picks], ddof=1))


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


@contextmanager
def base_only(base):
    """`base` without its LoRA inside the block: every component's adapter layers off (the
    weights stay in place), on again after, also when the block fails."""
    modules = (base.unet, *base.text_encoders.values())
    with adapters_off([layer for m in modules for layer in lora_layers(m).values()]):
        yield


def decode_latents(base, latents: torch.Tensor) -> list[Image.Image]:
    """Images from scaled VAE latents (B, 4, h, w): the training set as the base sees it."""
    with torch.no_grad():
        z = latents.to(base.vae.dtype) / base.vae.config.scaling_factor
        pixels = base.vae.decode(z).sample
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(p.numpy()) for p in pixels]


def render_sets(
    base, prompts: list[str], with_trigger: list[str], seeds: list[int], steps, cfg, size
) -> dict[str, list[Image.Image]]:
    """base_with, base_without, lora_with, lora_without: the prompts with and without the
    trigger, the LoRA's adapters off and on, one image per seed."""
    modules = (base.unet, *base.text_encoders.values())
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    sets = {}
    with base_only(base):
        sets["base_with"] = render(base, with_trigger, seeds, steps, cfg, size)
        sets["base_without"] = render(base, prompts, seeds, steps, cfg, size)
    sets["lora_with"] = render(base, with_trigger, seeds, steps, cfg, size)
    sets["lora_without"] = render(base, prompts, seeds, steps, cfg, size)
    for m, training in zip(modules, was_training, strict=True):
        m.train(training)
    return sets


def style_set(base, folder: Path, trigger: str, resolution: int) -> tuple[list, list[str]]:
    """The images of a style folder as the base's VAE returns them, and their captions (for
    scoring outside a run: benchmarks, tests)."""
    from sdlora.cache import LatentCache  # the report itself gets the run's cache
    from sdlora.dataset import scan_folder

    scan = scan_folder(folder, trigger, resolution)
    latents = LatentCache(base.vae, scan, base.vae.device, enabled=False)
    images = [decode_latents(base, latents.get(e)[0])[0] for e in scan.examples]
    return images, [e.caption for e in scan.examples]


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
    sets = render_sets(base, prompts, with_trigger, seeds, steps, cfg, size)
    scores = paired_scores(
        {name: features(base, imgs) for name, imgs in sets.items()},
        features(base, style_images),
        prompts,
    )
    report = {
        "statistic": STATISTIC,
        **{k: scores[STATISTIC][k] for k in HEADLINE},
        "statistics": scores,
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
    """The terminal's lines: shift and drift (± their standard errors) per statistic."""
    lines = [f"learning report ({len(report['seeds'])} images per set, paired seeds; "
             "0 = like the base model, 1 = like the training set):"]  # fmt: skip
    for name, s in report["statistics"].items():
        lines.append(
            f"  {name}: style shift with trigger {s['style_shift_with_trigger']:.2f}"
            f" ± {s['style_shift_se']:.2f}, drift without trigger"
            f" {s['drift_without_trigger']:.2f} ± {s['drift_se']:.2f}"
            f" ({s['redrawn_without_trigger']:.0%} re-drawn, any change:"
            f" {s['change_without_trigger']:.2f})"
        )
    return "\n".join(lines)


SCORE_KEYS = (
    "style_shift_with_trigger",
    "drift_without_trigger",
    "palette_shift_with_trigger",
    "palette_drift_without_trigger",
)
"""A checkpoint's style scores in checkpoints.json (None without report images)."""


def probe_entry(scores: dict[str, dict]) -> dict[str, float]:
    """A checkpoint's style scores: the headline statistic's shift and drift, and the
    palette's as `palette_shift_with_trigger` / `palette_drift_without_trigger`."""
    head, pal = scores[STATISTIC], scores[PALETTE]
    values = (head["style_shift_with_trigger"], head["drift_without_trigger"],
              pal["style_shift_with_trigger"], pal["drift_without_trigger"])  # fmt: skip
    return dict(zip(SCORE_KEYS, values, strict=True))


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
        self.style_images = style_images
        self.style: dict | None = None
        self.base_sets: dict | None = None

    def __call__(self, base) -> dict[str, float]:
        """Shift and drift of the LoRA as it is now (see probe_entry)."""
        if self.base_sets is None:
            self.style = features(base, self.style_images)
            with base_only(base):
                self.base_sets = self._sets(base, "base")
        sets = {**self.base_sets, **self._sets(base, "lora")}
        return probe_entry(paired_scores(sets, self.style))

    def _sets(self, base, who: str) -> dict[str, dict]:
        shot = (self.seeds, self.steps, self.cfg, self.size)
        return {
            f"{who}_with": features(base, render(base, self.with_trigger, *shot)),
            f"{who}_without": features(base, render(base, self.prompts, *shot)),
        }
