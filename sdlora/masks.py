"""Loss masks: an optional `name.mask.png` beside an image says where the loss counts.

White is trained, black is ignored, grey is weighted in between. The mask is brought to the
image's training crop exactly as the image is (resized to cover the bucket, cropped at the
same offset, mirrored with it), then averaged down to the latent grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from sdlora.buckets import upscale_factor
from sdlora.errors import SdloraError

MASK_SUFFIX = ".mask.png"


def is_mask(path: Path) -> bool:
    """A mask file (never a training image of its own)."""
    return path.name.lower().endswith(MASK_SUFFIX)


def mask_for(image: Path) -> Path | None:
    """The mask file beside `image` (`a.png` -> `a.mask.png`), or None."""
    mask = image.with_name(image.stem + MASK_SUFFIX)
    return mask if mask.is_file() else None


def load_mask(
    mask: Path,
    image_size: tuple[int, int],
    bucket: tuple[int, int],
    crop_top_left: tuple[int, int],
    flip: bool,
    latent_size: tuple[int, int],
) -> torch.Tensor:
    """The mask (1, h, w) in [0, 1] on the latent grid of the image's training crop.

    `image_size` is the image's (width, height), `bucket` its (width, height) training size,
    `crop_top_left` where its crop starts in the resized image, as the latent cache returns it.
    """
    try:
        with Image.open(mask) as opened:
            grey = opened.convert("L")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise SdloraError(f"{mask}: the loss mask cannot be read ({e}); fix or remove it") from None
    width, height = bucket
    scale = upscale_factor(image_size, bucket)
    size = (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))
    top, left = crop_top_left
    # The mask may be drawn at another resolution: it covers the image whatever its size.
    grey = grey.resize(size, Image.Resampling.BILINEAR).crop(
        (left, top, left + width, top + height)
    )
    if flip:
        grey = grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(pixels, size=tuple(latent_size), mode="area")[0]  # (1, h, w)
