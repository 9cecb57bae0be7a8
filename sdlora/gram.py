"""A texture statistic of images from the base's own VAE encoder: Gram matrices of its features
at several depths (Gatys, Ecker and Bethge, "Image Style Transfer Using Convolutional Neural
Networks", 2016, with the VAE encoder in place of VGG, so nothing is downloaded).

At each down block of the encoder, an image's feature map F (C channels, N positions) gives
the Gram matrix G = F Fᵀ / N: which channels fire together, wherever in the picture. It keeps
textures, strokes and colour combinations and drops the layout, which is what a style is
when the subject changes. The first blocks see small patches (edges, colour pairs), the last
ones larger patterns.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

BATCH = 8
"""Images through the encoder at once (a 1024 px image's first features are 0.5 GB in fp32)."""


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], as the VAE takes them."""
    arrays = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def gram_features(vae, images: list[Image.Image], batch: int = BATCH) -> list[np.ndarray]:
    """Per down block of `vae`'s encoder, each image's Gram matrix (upper triangle, float64):
    a list of (len(images), C(C+1)/2) arrays, shallowest block first."""
    encoder = vae.encoder
    parts: list[list[np.ndarray]] = [[] for _ in encoder.down_blocks]
    param = next(vae.parameters())
    with torch.no_grad():
        for start in range(0, len(images), batch):
            h = encoder.conv_in(pixels(images[start : start + batch]).to(param.device, param.dtype))
            for k, block in enumerate(encoder.down_blocks):
                h = block(h)  # (B, C, H', W')
                b, c = h.shape[:2]
                f = h.float().reshape(b, c, -1)
                g = f @ f.transpose(1, 2) / f.shape[-1]  # (B, C, C)
                rows, cols = torch.triu_indices(c, c, device=g.device)
                parts[k].append(g[:, rows, cols].double().cpu().numpy())
    return [np.concatenate(p) for p in parts]
