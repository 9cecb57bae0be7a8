"""The validation images, and what the validation loss needs of them, prepared once.

Which images: `dataset.validation_split` holds a fraction of the training folder out of
training; `dataset.validation_path` names a folder of their own; with neither, or with a split
that would hold out no image or leave none to train on, the loss is measured on (up to
TRAINING_IMAGES_MAX of) the training images themselves, and every record of it says so: that
loss keeps falling as the LoRA memorises its images, so it cannot show overfitting.

What the loss needs, fixed for the whole run so that two evaluations differ only by the LoRA:
each image's latent (centre crop, not flipped), its caption's text conditioning (encoded once
when the text encoder is frozen, at each evaluation when it is trained), one noise tensor per
image drawn once from its own seeded generator, and TIMESTEP_SLICES fixed timesteps: the
midpoints of equal slices of the noise schedule (125, 375, 625 and 875 of 1000), so every part
of the schedule counts the same and a noisy draw of timesteps cannot move the number.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdlora.dataset import Example, Scan
from sdlora.errors import SdloraError

TIMESTEP_SLICES = 4
TRAINING_IMAGES_MAX = 16
"""When the loss is measured on the training images: at most this many, evenly spread."""
NOISE_SEED_OFFSET = 7919
"""Added to `train.seed` for the validation noise: a stream of its own, not the training's."""

HELD_OUT, FOLDER, TRAINING = "held-out images", "validation folder", "training images"


@dataclass(frozen=True)
class ValidationImages:
    """The images the validation loss is measured on, and where they come from."""

    examples: list[Example]
    scan: Scan
    """The scan they came from (its root, background and limits decode them)."""
    source: str
    """HELD_OUT, FOLDER or TRAINING."""
    note: str
    """One line for the terminal and run.json."""


def choose_validation(
    scan: Scan, split: float, seed: int, folder_scan: Scan | None = None
) -> tuple[Scan, ValidationImages]:
    """The training scan (without held-out images) and the validation images.

    `split`: the fraction of `scan`'s images held out, chosen with `seed`; `folder_scan`: a
    scanned validation folder instead. Neither, or a split that rounds to no image or to all
    of them: the training images themselves (the first TRAINING_IMAGES_MAX, evenly spread).
    """
    if folder_scan is not None:
        n = len(folder_scan.examples)
        if not n:
            raise SdloraError(
                f"dataset.validation_path {folder_scan.root} has no usable images "
                "(`sdlora check` says why); add images or leave validation_path unset"
            )
        note = f"validation loss on {n} images of {folder_scan.root}"
        return scan, ValidationImages(folder_scan.examples, folder_scan, FOLDER, note)
    total = len(scan.examples)
    held = round(split * total)
    if split and 0 < held < total:
        picked = set(random.Random(seed).sample(range(total), held))
        kept = [e for i, e in enumerate(scan.examples) if i not in picked]
        out = [e for i, e in enumerate(scan.examples) if i in picked]
        note = f"validation loss on {held} held-out images (dataset.validation_split={split})"
        return dataclasses.replace(scan, examples=kept), ValidationImages(out, scan, HELD_OUT, note)
    step = max(1, -(-total // TRAINING_IMAGES_MAX))
    examples = scan.examples[::step][:TRAINING_IMAGES_MAX]
    why = "no held-out set"
    if split:
        why = f"dataset.validation_split={split} of {total} images holds out {held}"
    note = (
        f"validation on training images ({len(examples)} of them; {why}): it shows progress, "
        "not overfitting"
    )
    return scan, ValidationImages(examples, scan, TRAINING, note)


def fixed_timesteps(num_train_timesteps: int, slices: int = TIMESTEP_SLICES) -> torch.Tensor:
    """The midpoints of `slices` equal slices of the schedule: (slices,) integer timesteps."""
    return torch.tensor([(2 * k + 1) * num_train_timesteps // (2 * slices) for k in range(slices)])


@dataclass
class ValidationSet:
    """The validation images as the loss takes them, each fixed for the run."""

    latents: list[torch.Tensor]  # (1, 4, h, w) each, scaled, on the CPU
    noise: list[torch.Tensor]  # like each latent
    captions: list[str]
    geometry: list[tuple]  # SDXL size conditioning (see step.added_cond)
    timesteps: torch.Tensor  # (TIMESTEP_SLICES,)
    text: list[tuple] | None
    """Per image (hidden (77, width), pooled or None), when the text encoder is frozen."""
    source: str
    note: str


def prepare_validation(
    images: ValidationImages,
    latent_of: Callable[[Example], tuple[torch.Tensor, tuple[int, int]]],
    encode: Callable[[list[str]], tuple] | None,
    num_train_timesteps: int,
    seed: int,
) -> ValidationSet:
    """Latents (via `latent_of`, e.g. a LatentCache's `get`), fixed noise and timesteps, and
    with `encode` (a frozen text encoder) the captions' text conditioning, computed now."""
    latents, geometry = [], []
    for example in images.examples:
        latent, crop = latent_of(example)
        latents.append(latent.cpu())
        width, height = example.size
        geometry.append((height, width, *crop, example.bucket[1], example.bucket[0]))
    generator = torch.Generator().manual_seed(seed + NOISE_SEED_OFFSET)
    noise = [torch.randn(latent.shape, generator=generator) for latent in latents]
    captions = [e.caption for e in images.examples]
    text = None
    if encode is not None:
        with torch.no_grad():
            text = [tuple(part[0] if part is not None else None for part in encode([c]))
                    for c in captions]  # fmt: skip
    return ValidationSet(
        latents,
        noise,
        captions,
        geometry,
        fixed_timesteps(num_train_timesteps),
        text,
        images.source,
        images.note,
    )
