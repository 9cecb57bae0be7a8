"""Aspect-ratio buckets: train each image near its own shape instead of a centre square.

A bucket is a (width, height) whose sides are multiples of 64 and whose area is at most
resolution², as large as that allows; sides range from resolution/2 to resolution*2 (sd-scripts'
default range). Each image goes to the bucket nearest its aspect ratio, is resized to cover it
and cropped (centre, or a random offset each time it is drawn). A batch holds images of one
bucket, since latents of different shapes cannot be stacked.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

STEP = 64


def make_buckets(resolution: int, enabled: bool = True) -> list[tuple[int, int]]:
    """Every (width, height) bucket for `resolution`, sorted by aspect ratio (wide last)."""
    if not enabled:
        return [(resolution, resolution)]
    step = STEP if resolution % STEP == 0 else STEP // 2  # 32: small x4-VAE models
    area = resolution * resolution
    low, high = max(step, resolution // 2), resolution * 2
    buckets = {(resolution, resolution)}
    for width in range(resolution, high + 1, step):  # landscape; portrait mirrors
        height = area // width // step * step
        if height >= low:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to the image's `(w, h)`."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def upscale_factor(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """How much the image is enlarged to cover its bucket (> 1 means upscaled)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def fit_to_bucket(
    image: Image.Image,
    bucket: tuple[int, int],
    crop: str = "center",
    rng: random.Random | None = None,
    flip: bool = False,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize `image` to cover `bucket`, crop it to the bucket, optionally mirror it.

    Returns pixels (3, H, W) in [-1, 1] and the crop's (top, left) in resized pixels (SDXL
    conditions on it).
    """
    width, height = bucket
    scale = upscale_factor(image.size, bucket)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    if crop == "random":
        rng = rng or random.Random()
        left, top = rng.randint(0, size[0] - width), rng.randint(0, size[1] - height)
    else:
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


def batches_per_epoch(
    buckets: Sequence[tuple[int, int]], repeats: Sequence[int], batch_size: int
) -> int:
    """How many batches `bucket_batches` makes per epoch (each bucket's last may be short)."""
    sizes: dict[tuple[int, int], int] = {}
    for bucket, r in zip(buckets, repeats, strict=True):
        sizes[bucket] = sizes.get(bucket, 0) + r
    return sum(math.ceil(n / batch_size) for n in sizes.values())


def bucket_batches(
    buckets: Sequence[tuple[int, int]],
    repeats: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
) -> Iterator[list[int]]:
    """Endless batches of example indices, each batch from one bucket; reshuffled every epoch.

    `buckets[i]` and `repeats[i]` belong to example i. An epoch shows example i `repeats[i]`
    times. A bucket's last, short batch is kept (a small data set has few images per bucket),
    and the order of batches across buckets is shuffled too.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).extend([i] * repeats[i])
    while True:
        epoch = []
        for bucket in sorted(groups):
            members = groups[bucket]
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[j] for j in order]
            epoch += [shuffled[s : s + batch_size] for s in range(0, len(shuffled), batch_size)]
        for j in torch.randperm(len(epoch), generator=generator).tolist():
            yield epoch[j]
