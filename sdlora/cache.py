"""Caches of frozen-model outputs: VAE latents per image, text-encoder outputs per caption.

A latent is keyed by the image file's content hash, the VAE (its config and a sample of its
weights), the bucket, the flip and the background colour, so an edited image or another VAE
never reuses a stale entry; a text output by the caption and the text encoders, tokenizers and
family (and `clip_skip`). Keys hold only what changes the outputs, and nothing that differs
between two runs of the same setup (diffusers' private `_`-keys list defaults in any order).
Entries live in memory for the run and, when a cache folder is given, also as one small
safetensors file each (`latents/` and `text/` in it), reused by later runs. The folder is never
the dataset folder: sdlora does not write there. A cache file that cannot be read (a disk
fault, a copy cut short) is sdlora's own: it is removed with a warning and computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from sdlora.dataset import Example, Scan, load_pixels
from sdlora.errors import SdloraError
from sdlora.export import write_atomic

TEXT_FORMAT = "text-1"
"""Part of every text key: changed when what `encode` returns for a caption changes meaning."""


def public_config(config) -> dict:
    """A model config without its private `_` keys (diffusers' `_use_default_values` lists
    the defaults in an order that differs between processes; names and versions do not
    change outputs)."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith("_")}


def _hash_module(h, module) -> None:
    """Feed `h` the module's public config and a few values of every weight (cheap, distinctive)."""
    h.update(json.dumps(public_config(module.config), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(flat[:16].float().cpu().numpy().tobytes())
        h.update(flat[-16:].float().cpu().numpy().tobytes())


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's architecture config and weights: the same in every process."""
    h = hashlib.sha256()
    _hash_module(h, vae)
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what turns a caption into token ids: vocabulary, merges, rules, length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # its JSON holds all of them
    rules = backend.to_str() if backend is not None else ""
    vocab = sorted(tokenizer.get_vocab().items())
    parts = (type(tokenizer).__name__, tokenizer.model_max_length, vocab, rules)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def text_fingerprint(base, clip_skip: int | None = None) -> str:
    """A short hash of everything besides the caption that decides the text encoders' output
    for `base` (a models.Base): family, encoders (config, weights, dtype), tokenizers and
    `clip_skip` when set."""
    h = hashlib.sha256(f"{TEXT_FORMAT} {base.family} clip_skip={clip_skip}".encode())
    for name, encoder in base.text_encoders.items():
        h.update(name.encode())
        _hash_module(h, encoder)
    for tokenizer in (base.tokenizer, base.tokenizer_2):
        if tokenizer is not None:
            h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


def check_cache_folder(folder: Path, dataset: Path) -> None:
    """Refuse a cache folder inside the dataset folder (sdlora never writes there)."""
    if folder.resolve().is_relative_to(dataset.resolve()):
        raise SdloraError(
            f"dataset.cache_dir {folder} is inside the dataset folder {dataset}; "
            "sdlora never writes there: choose a folder outside it"
        )


def _read_entry(path: Path, names: tuple[str, ...], device="cpu") -> dict[str, torch.Tensor] | None:
    """The tensors of the cache file `path`, or None when there is none. A file that cannot be
    read or lacks any of `names` is removed, with a warning, so its entry is computed again."""
    if not path.is_file():
        return None
    try:
        stored = load_file(path, device=str(device))
        missing = [name for name in names if name not in stored]
        if not missing:
            return stored
        reason = f"it holds no {missing[0]!r} tensor"
    except (SafetensorError, OSError) as e:
        reason = str(e) or type(e).__name__
    warnings.warn(
        f"cache file {path} cannot be used ({reason}); removed, its entry is computed again",
        stacklevel=3,
    )
    with contextlib.suppress(OSError):  # writing the new entry then names the problem
        path.unlink()
    return None


class LatentCache:
    """VAE latents (1, 4, H/8, W/8), scaled by the VAE's factor, with the crop they came from.

    `enabled=False` encodes on every call (the uncached baseline); a random crop is never
    cached, since each call picks a new offset.
    """

    def __init__(self, vae, scan: Scan, device, folder: Path | None = None, enabled=True):
        """`folder`: the cache folder (`dataset.cache_dir`); entries go to its `latents/`."""
        self.vae, self.scan, self.device, self.enabled = vae, scan, device, enabled
        self.folder = None
        if folder is not None:
            check_cache_folder(folder, scan.root)
            self.folder = Path(folder) / "latents"
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
        stored = _read_entry(path, ("latent", "crop")) if path is not None else None
        if stored is not None:
            entry = (stored["latent"], tuple(stored["crop"].tolist()))
            self.disk_hits += 1
        else:
            entry = self._encode(example, flip, crop, rng)
            self.misses += 1
            if path is not None:
                tensors = {"latent": entry[0].contiguous(), "crop": torch.tensor(entry[1])}
                path.parent.mkdir(parents=True, exist_ok=True)
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

    `encode(captions) -> (hidden (B, 77, width), pooled (B, width_2) or None)`. With
    `cache_dir` and `fingerprint` (`text_fingerprint` of the base), entries are also kept in
    `cache_dir/text/` and read back by later runs onto `device`. `enabled=False` (the text
    encoder is trained) calls `encode` every time and keeps nothing.
    """

    def __init__(
        self,
        encode: Callable[[list[str]], tuple],
        enabled: bool = True,
        *,
        cache_dir: str | Path | None = None,
        fingerprint: str | None = None,
        device=None,
    ):
        if cache_dir is not None and enabled and not fingerprint:
            raise ValueError("a text cache on disk needs the text encoders' fingerprint")
        self.encode, self.enabled, self.fingerprint = encode, enabled, fingerprint
        self.folder = Path(cache_dir) / "text" if cache_dir is not None and enabled else None
        self.device = device
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.disk_hits = self.misses = 0

    def key(self, caption: str) -> str:
        return hashlib.sha256(repr((self.fingerprint, caption)).encode()).hexdigest()[:32]

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.enabled:
            return self.encode(captions)
        missing = sorted({c for c in captions if c not in self.memory})
        if self.folder is not None:
            missing = [c for c in missing if not self._load(c)]
        if missing:
            with torch.no_grad():
                hidden, pooled = self.encode(missing)
            self.misses += len(missing)
            for i, caption in enumerate(missing):
                self.memory[caption] = (hidden[i], None if pooled is None else pooled[i])
                if self.folder is not None:
                    self._store(caption)
        rows = [self.memory[c] for c in captions]
        hidden = torch.stack([r[0] for r in rows])
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return hidden, pooled

    def _load(self, caption: str) -> bool:
        path = self.folder / f"{self.key(caption)}.safetensors"
        stored = _read_entry(path, ("hidden",), self.device or "cpu")
        if stored is None:
            return False
        self.memory[caption] = (stored["hidden"], stored.get("pooled"))
        self.disk_hits += 1
        return True

    def _store(self, caption: str) -> None:
        hidden, pooled = self.memory[caption]
        tensors = {"hidden": hidden.detach().contiguous().cpu()}  # (77, width)
        if pooled is not None:
            tensors["pooled"] = pooled.detach().contiguous().cpu()  # (width_2,)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / f"{self.key(caption)}.safetensors", save(tensors))
