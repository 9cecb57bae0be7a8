"""Caches of frozen-model outputs: VAE latents per image, text-encoder outputs per caption.

A latent is keyed by the image file's content hash, the VAE (its config and a sample of its
weights), the bucket, the flip and the background colour, so an edited image or another VAE
never reuses a stale entry. Entries live in memory for the run and, when a cache folder is
given, also as one small safetensors file each, reused by later runs. The folder is never the
dataset folder: sdlora does not write there.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from sdlora.dataset import Example, Scan, load_pixels
from sdlora.errors import SdloraError
from sdlora.export import write_atomic


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's config and a few values of every weight (cheap, distinctive)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        flat = tensor.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:16].float().cpu().numpy().tobytes())
        h.update(flat[-16:].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_cache_folder(folder: Path, dataset: Path) -> None:
    """Refuse a cache folder inside the dataset folder (sdlora never writes there)."""
    if folder.resolve().is_relative_to(dataset.resolve()):
        raise SdloraError(
            f"dataset.cache_dir {folder} is inside the dataset folder {dataset}; "
            "sdlora never writes there: choose a folder outside it"
        )


class LatentCache:
    """VAE latents (1, 4, H/8, W/8), scaled by the VAE's factor, with the crop they came from.

    `enabled=False` encodes on every call (the uncached baseline); a random crop is never
    cached, since each call picks a new offset.
    """

    def __init__(self, vae, scan: Scan, device, folder: Path | None = None, enabled=True):
        self.vae, self.scan, self.device, self.enabled = vae, scan, device, enabled
        self.folder = folder
        if folder is not None:
            check_cache_folder(folder, scan.root)
        self.scale = vae.config.scaling_factor
        self.fingerprint = vae_fingerprint(vae)
        self.memory: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        self.hits = self.disk_hits = self.misses = 0

    def key(self, example: Example, flip: bool) -> str:
        parts = (
            example.sha256,
            self.fingerprint,
            str(self.vae.dtype),
            example.bucket,
            flip,
            self.scan.background,
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]

    def get(
        self, example: Example, flip: bool = False, crop: str = "center", rng=None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The latent of `example` (flipped or not) and its crop (top, left)."""
        if not self.enabled or crop == "random":
            return self._encode(example, flip, crop, rng)
        key = self.key(example, flip)
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        path = self.folder / f"{key}.safetensors" if self.folder is not None else None
        if path is not None and path.is_file():
            stored = load_file(path)
            entry = (stored["latent"], tuple(stored["crop"].tolist()))
            self.disk_hits += 1
        else:
            entry = self._encode(example, flip, crop, rng)
            self.misses += 1
            if path is not None:
                tensors = {"latent": entry[0].contiguous(), "crop": torch.tensor(entry[1])}
                write_atomic(path, save(tensors))
        self.memory[key] = entry
        return entry

    def fill(self, examples: list[Example], flips: tuple[bool, ...], progress=None) -> None:
        """Encode every (example, flip) up front, so the loop's time is training time."""
        if not self.enabled:
            return
        for example in examples:
            for flip in flips:
                self.get(example, flip)
            if progress is not None:
                progress.update(1)

    def _encode(self, example, flip, crop, rng: random.Random | None):
        pixels, crop_top_left = load_pixels(self.scan, example, crop, flip, rng)
        with torch.no_grad():
            pixels = pixels.unsqueeze(0).to(self.device, self.vae.dtype)  # (1, 3, H, W)
            latent = self.vae.encode(pixels).latent_dist.mean.float().cpu() * self.scale
        return latent, crop_top_left  # (1, 4, H/8, W/8)


class TextCache:
    """Text-encoder outputs per caption string, for a frozen text encoder.

    `encode(captions) -> (hidden (B, 77, width), pooled (B, width_2) or None)`.
    """

    def __init__(self, encode: Callable[[list[str]], tuple], enabled: bool = True):
        self.encode, self.enabled = encode, enabled
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.enabled:
            return self.encode(captions)
        missing = sorted({c for c in captions if c not in self.memory})
        if missing:
            with torch.no_grad():
                hidden, pooled = self.encode(missing)
            for i, caption in enumerate(missing):
                self.memory[caption] = (hidden[i], None if pooled is None else pooled[i])
        rows = [self.memory[c] for c in captions]
        hidden = torch.stack([r[0] for r in rows])
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return hidden, pooled
